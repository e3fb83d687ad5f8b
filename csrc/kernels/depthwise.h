// Depthwise convolutions: per pixel (dw_pixel), sliding windows of outputs held in registers
// (dw_slide, dw_rows, dw_same_rows: the RepMixer / ConvFFN convs and dwconv's 'same' path), packed
// 16-channel blocks (dwb_*: RepCPE's 7x7, the RepMixer's mix_dw), and dwconv's general path (any
// stride and channel multiplier, dw_general_rows).

// Depthwise KxK (BN folded) of one pixel, channels [c0, C), into out: channel vectors held in
// registers across the taps, four at a time.
template <typename T_>
static inline void dw_pixel(const T_* x, int64_t H, int64_t Wd, int64_t C, int64_t Kk, const float* dw_w,
                            const float* dw_b, int64_t h, int64_t w, int64_t c0, float* out) {
  const int64_t pad = Kk / 2, Cv = C / VL * VL;
  const int64_t kh0 = pad - h > 0 ? pad - h : 0, kh1 = H - h + pad < Kk ? H - h + pad : Kk;
  const int64_t kw0 = pad - w > 0 ? pad - w : 0, kw1 = Wd - w + pad < Kk ? Wd - w + pad : Kk;
  int64_t c = c0;
  for (; c + 4 * VL <= Cv; c += 4 * VL) {
    vf s0 = vload(dw_b + c), s1 = vload(dw_b + c + VL), s2 = vload(dw_b + c + 2 * VL), s3 = vload(dw_b + c + 3 * VL);
    for (int64_t kh = kh0; kh < kh1; ++kh) {
      const T_* xr = x + ((h + kh - pad) * Wd + (w - pad)) * C + c;
      const float* wr = dw_w + kh * Kk * C + c;
      for (int64_t kw = kw0; kw < kw1; ++kw) {
        const T_* xp = xr + kw * C;
        const float* wp = wr + kw * C;
        s0 += vld(xp) * vload(wp);
        s1 += vld(xp + VL) * vload(wp + VL);
        s2 += vld(xp + 2 * VL) * vload(wp + 2 * VL);
        s3 += vld(xp + 3 * VL) * vload(wp + 3 * VL);
      }
    }
    vstore(out + c, s0), vstore(out + c + VL, s1), vstore(out + c + 2 * VL, s2), vstore(out + c + 3 * VL, s3);
  }
  for (; c < Cv; c += VL) {
    vf s = vload(dw_b + c);
    for (int64_t kh = kh0; kh < kh1; ++kh)
      for (int64_t kw = kw0; kw < kw1; ++kw)
        s += vld(x + ((h + kh - pad) * Wd + (w + kw - pad)) * C + c) * vload(dw_w + (kh * Kk + kw) * C + c);
    vstore(out + c, s);
  }
  for (; c < C; ++c) {
    float s = dw_b[c];
    for (int64_t kh = kh0; kh < kh1; ++kh)
      for (int64_t kw = kw0; kw < kw1; ++kw)
        s += ld(x, ((h + kh - pad) * Wd + (w + kw - pad)) * C + c) * dw_w[(kh * Kk + kw) * C + c];
    out[c] = s;
  }
}

#undef FVK_DUP2  // defined once per ISA namespace (AVX2's dup2 below takes its own route)
#if FVK_VL == 16
#define FVK_DUP2 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7
#elif FVK_VL == 4
#define FVK_DUP2 0, 0, 1, 1
#endif
typedef float vfh __attribute__((vector_size(FVK_VL * 2), aligned(4)));  // half a vector, unaligned
// On AVX2 as vbroadcastf128 (a load, no shuffle uop) + vpermilps (one in-lane shuffle): GCC's form,
// a 16-byte load + vpermd, held patch_embed's 7x7 s2 multiplier-2 window to 44-47 GFLOP/s per thread on
// L1-resident data against 68 now (Zen 3; 7x7 stride 1 without the duplication: 77).
static inline vf dup2(const float* p) {  // p[0], p[0], p[1], p[1], ... (VL / 2 inputs)
#if FVK_VL == 8
  const vf b = __builtin_ia32_vbroadcastf128_ps256(reinterpret_cast<const vfh*>(p));
  return __builtin_ia32_vpermilvarps256(b, vi{0, 0, 1, 1, 2, 2, 3, 3});
#else
  const vfh h = *reinterpret_cast<const vfh*>(p);
  return __builtin_shufflevector(h, h, FVK_DUP2);
#endif
}
static inline vf dup2(const uint16_t* p) {
  alignas(64) float f[VL / 2];
  for (int l = 0; l < VL / 2; ++l) f[l] = ld(p, l);
  return dup2(f);
}

// out[2i] = e[i], out[2i + 1] = o[i], i < VL: two vectors of even / odd channels back in channel order.
static inline void zip_store(float* out, vf e, vf o) {
#if FVK_VL == 16
  vstore(out, __builtin_shufflevector(e, o, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23));
  vstore(out + VL, __builtin_shufflevector(e, o, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31));
#else  // (dw_slide_rows uses PAIR on AVX-512 only)
  for (int i = 0; i < VL; ++i) out[2 * i] = e[i], out[2 * i + 1] = o[i];
#endif
}

// Sliding-window depthwise KK x KK (stride ST, padding KK / 2, channel multiplier M = 1 or 2; BN
// folded) of R outputs along one output row, (oh, ow0 .. ow0 + R - 1), output channels [c, c + VL)
// (input channels from c / M): per kernel row the KK weights sit in registers and each of the
// ST (R - 1) + KK input columns is loaded once (M = 2: as a duplicated half vector) and fed to every
// output whose window covers it. KK = 7, ST = 1, R = 8: 21 loads per 56 FMAs per kernel row (dw_rows'
// 4-pixel runs need 1.25 per FMA and measured 8-26% slower on the FastViTHD 7x7 shapes); ST = 2,
// M = 2, R = 6 (patch_embed): 0.6 per FMA instead of dwm_pixel's 2. Input columns outside the image
// are skipped (the zero padding); outputs past the row are computed from what lies inside and not
// stored: the first `nst` outputs go to out (row stride ldo), GELU'd if GELU.
// PAIR (M = 2; AVX-512, dw_slide_rows): two output vectors at once, channels [c, c + 2 VL), c a
// multiple of 2 VL. Their inputs are the VL channels from c / 2, so one plain vector load per input
// column feeds both, with no duplicating shuffle (dup2 put one vpermps, a port-5 operation beside
// the FMAs, on every half-vector load). The even output channels c + 2i and the odd ones c + 2i + 1
// accumulate apart; dw_w / dw_b are then in pair layout (each block of 2 VL channels re-ordered to
// its VL even channels, then its VL odd ones: pair_layout in ops/common.cpp) and zip_store interleaves the
// two back. Registers: 2R accumulators, 2KK weights, one input (27 of the 32 for KK = 7, R = 6).
// Same products, summed in the same order as without PAIR: bitwise equal.
template <int KK, int R, int ST, int M, bool GELU, bool PAIR, typename T_>
static inline void dw_slide(const T_* x, int64_t H, int64_t Wd, int64_t Cin, int64_t Co, const float* dw_w,
                            const float* dw_b, int64_t oh, int64_t ow0, int64_t c, float* out, int64_t ldo,
                            int64_t nst) {
  static_assert(!PAIR || M == 2, "PAIR is the multiplier-2 form");
  constexpr int NV = PAIR ? 2 : 1;                    // output vectors per input vector
  constexpr int pad = KK / 2, S = ST * (R - 1) + KK;  // S input columns feed R outputs
  vf acc[NV][R];
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v) {
    const vf b = vload(dw_b + c + v * VL);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[v][r] = b;
  }
  const int64_t ih0 = ST * oh - pad, u0 = ST * ow0 - pad;  // the window's first input row and column
  const int64_t kh0 = -ih0 > 0 ? -ih0 : 0, kh1 = H - ih0 < KK ? H - ih0 : KK;
  const bool inside = u0 >= 0 && u0 + S <= Wd;
  // One kernel row. Two copies (check: std::true_type / std::false_type): one that skips the input
  // columns outside the image (a row's ends) and one without those tests, whose column loads then
  // follow a running pointer.
  auto row = [&](auto check, int64_t kh) {
    const T_* xp = x + ((ih0 + kh) * Wd + u0) * Cin + c / M;
    const float* wr = dw_w + kh * KK * Co + c;
    vf wk[NV][KK];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v)
#pragma GCC unroll 16
      for (int kw = 0; kw < KK; ++kw) wk[v][kw] = vload(wr + kw * Co + v * VL);
#pragma GCC unroll 32
    for (int j = 0; j < S; ++j, xp += Cin) {
      if (decltype(check)::value && (u0 + j < 0 || u0 + j >= Wd)) continue;
      vf in;
      if constexpr (M == 2 && !PAIR) in = dup2(xp);
      else in = vld(xp);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        if (j - ST * r >= 0 && j - ST * r < KK)
#pragma GCC unroll 2
          for (int v = 0; v < NV; ++v) acc[v][r] += in * wk[v][j - ST * r];
    }
  };
  if (inside)
    for (int64_t kh = kh0; kh < kh1; ++kh) row(std::false_type{}, kh);
  else
    for (int64_t kh = kh0; kh < kh1; ++kh) row(std::true_type{}, kh);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    if (r >= nst) continue;
    if constexpr (PAIR) {
      zip_store(out + r * ldo, GELU ? vgelu(acc[0][r]) : acc[0][r], GELU ? vgelu(acc[1][r]) : acc[1][r]);
    } else {
      vstore(out + r * ldo, GELU ? vgelu(acc[0][r]) : acc[0][r]);
    }
  }
}

// Output pixels [p0, p0 + np) of an output grid Wo wide, pixel-major into d (np x Co): per segment
// along one output row, runs of R outputs x channel vectors through dw_slide (the row ends
// included); the channels past a multiple of VL go to tail(oh, ow, first channel, out pixel).
// M = 2 with w2 / b2 (dw_w / dw_b in pair layout; AVX-512 only, else null): whole blocks of 2 VL
// channels through dw_slide's PAIR form, the rest through its one-vector form.
template <int KK, int R, int ST, int M, bool GELU, typename T_, typename Tail>
static void dw_slide_rows(const T_* x, int64_t H, int64_t Wd, int64_t Cin, int64_t Co, const float* dw_w,
                          const float* dw_b, const float* w2, const float* b2, int64_t Wo, int64_t p0, int64_t np,
                          float* d, Tail tail) {
  const int64_t Cv = Co / VL * VL;
  // channels [0, Cpair) in pairs of vectors (pair_layout's blocks are 32 channels: AVX-512's 2 VL)
  const int64_t Cpair = M == 2 && w2 && VL == 16 ? Co / (2 * VL) * (2 * VL) : 0;
  for (int64_t j = 0; j < np;) {
    const int64_t p = p0 + j, oh = p / Wo, ow = p % Wo, n = np - j < Wo - ow ? np - j : Wo - ow;
    for (int64_t r0 = 0; r0 < n; r0 += R) {
      if constexpr (M == 2)
        for (int64_t c = 0; c < Cpair; c += 2 * VL)
          dw_slide<KK, R, ST, M, GELU, true>(x, H, Wd, Cin, Co, w2, b2, oh, ow + r0, c, d + (j + r0) * Co + c, Co,
                                             n - r0);
      for (int64_t c = Cpair; c < Cv; c += VL)
        dw_slide<KK, R, ST, M, GELU, false>(x, H, Wd, Cin, Co, dw_w, dw_b, oh, ow + r0, c, d + (j + r0) * Co + c, Co,
                                            n - r0);
    }
    if (Cv < Co)
      for (int64_t i = 0; i < n; ++i) tail(oh, ow + i, Cv, d + (j + i) * Co);
    j += n;
  }
}

// Depthwise KxK (BN folded) of pixels [p0, p0 + np) of one image x (H x Wd x C), pixel-major into
// d (np x C), reading NHWC rows in place (the ConvFFN's tiles, and the RepMixer / dwconv shapes that
// the packed-block kernels below, dwb_row, do not take). K = 7: dw_slide_rows. Other K: runs of 4
// pixels of one image row whose windows lie inside the row share each weight load (2 channel
// vectors x 4 pixels of accumulators; for the RepMixer's 3x3 a sliding window on the NHWC rows
// measured slower at 256x256x96, memory-bound there, before the packed blocks); other pixels and the
// channels past a multiple of 2 vectors take dw_pixel.
template <typename T_>
static void dw_rows(const T_* x, int64_t H, int64_t Wd, int64_t C, int64_t Kk, const float* dw_w, const float* dw_b,
                    int64_t p0, int64_t np, float* d) {
  if (Kk == 7)  // R = 8 accumulators + 7 weights + 1 input: the 16 vector registers of AVX2
    return dw_slide_rows<7, 8, 1, 1, false>(x, H, Wd, C, C, dw_w, dw_b, nullptr, nullptr, Wd, p0, np, d,
                                           [&](int64_t h, int64_t w, int64_t c0, float* out) {
                                             dw_pixel(x, H, Wd, C, Kk, dw_w, dw_b, h, w, c0, out);
                                           });
  constexpr int R = 4;
  const int64_t pad = Kk / 2, C2 = C / (2 * VL) * (2 * VL);
  int64_t j = 0;
  while (j < np) {
    const int64_t p = p0 + j, h = p / Wd, w = p % Wd;
    if (w >= pad && w + R - 1 + pad < Wd && j + R <= np) {  // R pixels, full windows along the row
      const int64_t kh0 = pad - h > 0 ? pad - h : 0, kh1 = H - h + pad < Kk ? H - h + pad : Kk;
      for (int64_t c = 0; c < C2; c += 2 * VL) {
        vf a0[R], a1[R];
        const vf b0 = vload(dw_b + c), b1 = vload(dw_b + c + VL);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) a0[r] = b0, a1[r] = b1;
        for (int64_t kh = kh0; kh < kh1; ++kh) {
          const T_* xr = x + ((h + kh - pad) * Wd + (w - pad)) * C + c;
          const float* wr = dw_w + kh * Kk * C + c;
          for (int64_t kw = 0; kw < Kk; ++kw) {
            const vf w0 = vload(wr + kw * C), w1 = vload(wr + kw * C + VL);
            const T_* xp = xr + kw * C;
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) {
              a0[r] += vld(xp + r * C) * w0;
              a1[r] += vld(xp + r * C + VL) * w1;
            }
          }
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) vstore(d + (j + r) * C + c, a0[r]), vstore(d + (j + r) * C + c + VL, a1[r]);
      }
      if (C2 < C)
        for (int r = 0; r < R; ++r) dw_pixel(x, H, Wd, C, Kk, dw_w, dw_b, h, w + r, C2, d + (j + r) * C);
      j += R;
    } else {
      dw_pixel(x, H, Wd, C, Kk, dw_w, dw_b, h, w, 0, d + j * C);
      j += 1;
    }
  }
}

// Depthwise KxK, stride 1, 'same' padding, multiplier 1 (the RepMixer and RepCPE convs) through
// dw_rows: image rows [r_begin, r_end) of a batch (row r: image r / H, row r % H), optional GELU.
// x and y both bf16 or both fp32 (bf16). `scratch` holds Wd * C floats (bf16).
FVK_ENTRY void dw_same_rows(const void* x, void* y, bool bf16, int64_t H, int64_t Wd, int64_t C, int64_t Kk,
                         const float* w, const float* b, bool gelu, int64_t r_begin, int64_t r_end, float* scratch) {
  const int64_t n = Wd * C, nv = n / VL * VL;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const int64_t bi = r / H, h = r % H, img = bi * H * Wd * C;
    float* row = bf16 ? scratch : static_cast<float*>(y) + r * n;
    if (bf16)
      dw_rows(static_cast<const uint16_t*>(x) + img, H, Wd, C, Kk, w, b, h * Wd, Wd, row);
    else
      dw_rows(static_cast<const float*>(x) + img, H, Wd, C, Kk, w, b, h * Wd, Wd, row);
    if (gelu) {
      for (int64_t i = 0; i < nv; i += VL) vstore(row + i, vgelu(vload(row + i)));
      for (int64_t i = nv; i < n; ++i) row[i] = ::fastvlm::gelu_scalar(row[i]);
    }
    if (bf16) {
      uint16_t* out = static_cast<uint16_t*>(y) + r * n;
      for (int64_t i = 0; i < nv; i += VL) vst(out + i, vload(row + i));
      for (int64_t i = nv; i < n; ++i) st(out, i, row[i]);
    }
  }
}

// ---- Depthwise convs on packed channel blocks (RepCPE's 7x7; the RepMixer's 3x3 and 7x7, mix_dw) ---
// dw_rows reads NHWC rows in place: each input pixel's C channels lie C floats apart, so at
// FastViTHD's RepCPE shapes (32x32x768, 16x16x1536) the 7 input rows one output row needs (0.7 MB)
// and the 49 x C weights (0.15-0.3 MB) outrun a 512 KB L2, and the input columns, 3-6 KB apart, fall
// into a few L1 sets. dwb_tiles instead copies one block of DB = 16 channels (one 64-byte line per
// pixel) of a band of rows into a zero-bordered buffer (rows of Wp pixels of DB floats, contiguous),
// with that block's weights (49 x DB), and slides dw_slide's R = 8 window over it: the 7-row
// window is 7 x Wp x 64 bytes (17 KB at a 32-pixel row), in L1 with the weights, and the kernel needs
// no border tests. Standalone, one Zen 3 thread: 67-72 GFLOP/s at 32x32x768 and 16x16x1536 against
// dw_rows' 25-31 (84 / 79 without the copy). The same products summed in the same order as dw_slide
// (bias, then kernel rows, then columns), the zero border adding exact zeros (outputs bitwise equal
// to dw_rows' up to the sign of a zero). Per op on the Zen 3 (python -m bench.ab, 4 process pairs x
// 100 calls, against dw_rows): RepCPE 32x32x768 0.71x, 16x16x1536 0.70x; in mix_dw (the RepMixer,
// 15 calls): stage 0 0.92x, stage 1 0.90x, stage 2 (GEMM-bound) 0.97x.
constexpr int64_t DB = 16;   // channels per packed block
constexpr int DWB_R = 8;     // outputs per run: 8 accumulators + 7 weights + 1 input (AVX2's 16 registers)
static inline int64_t dwb_wp(int64_t Wd) { return (Wd + DWB_R - 1) / DWB_R * DWB_R + 6; }
// Output rows per band: the whole image up to 64 rows, else bands of 32 (6 rows of halo copied twice).
FVK_ENTRY int64_t dwb_band(int64_t H) { return H <= 64 ? H : 32; }
FVK_ENTRY int64_t dwb_scratch(int64_t H, int64_t Wd) { return (dwb_band(H) + 6) * dwb_wp(Wd) * DB + 50 * DB; }

// Output row `oh` of a KK x KK depthwise over the packed rows in buf (Wp pixels of DB floats each;
// output (oh, ow) reads buf rows oh .. oh + KK - 1, columns ow .. ow + KK - 1), Wd outputs of DB
// channels (the first nc valid), GELU'd if gelu, to out + ow * ldo. Reads columns up to
// ceil(Wd / R) R + KK - 2. wb: KK x KK x DB weights, bb: DB.
template <int KK, typename T_>
static void dwb_row(const float* buf, int64_t Wp, int64_t Wd, const float* wb, const float* bb, bool gelu,
                    int64_t oh, T_* out, int64_t ldo, int64_t nc) {
  constexpr int R = DWB_R, S = R + KK - 1, NV = DB / VL;
  for (int64_t ow0 = 0; ow0 < Wd; ow0 += R) {
    const int64_t nst = Wd - ow0 < R ? Wd - ow0 : R;
#pragma GCC unroll 1
    for (int v = 0; v < NV; ++v) {
      vf acc[R];
      const vf b = vload(bb + v * VL);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r] = b;
#pragma GCC unroll 1
      for (int kh = 0; kh < KK; ++kh) {
        const float* xr = buf + ((oh + kh) * Wp + ow0) * DB + v * VL;
        vf wk[KK];
#pragma GCC unroll 8
        for (int kw = 0; kw < KK; ++kw) wk[kw] = vload(wb + (kh * KK + kw) * DB + v * VL);
#pragma GCC unroll 32
        for (int j = 0; j < S; ++j) {
          const vf in = vload(xr + j * DB);
#pragma GCC unroll 16
          for (int r = 0; r < R; ++r)
            if (j - r >= 0 && j - r < KK) acc[r] += in * wk[j - r];
        }
      }
      for (int r = 0; r < nst; ++r) {
        const vf o = gelu ? vgelu(acc[r]) : acc[r];
        T_* op = out + (ow0 + r) * ldo + v * VL;
        if (nc == DB) {
          vst(op, o);
        } else {  // the last, partial block: its first nc channels
          float t[VL];
          vstore(t, o);
          for (int i = 0; i < VL && v * VL + i < nc; ++i) st(op, i, t[i]);
        }
      }
    }
  }
}

// Channels [c0, c0 + nc) of a KxK depthwise weight w (K, K, C) and its bias b (C) into wb (K K x DB)
// and bb (DB), zero padded; taps = K K.
static inline void dwb_weights(const float* w, const float* b, int64_t C, int64_t c0, int64_t nc, float* wb, float* bb,
                               int64_t taps = 49) {
  for (int64_t k = 0; k < taps; ++k)
    for (int64_t i = 0; i < DB; ++i) wb[k * DB + i] = i < nc ? w[k * C + c0 + i] : 0.f;
  for (int64_t i = 0; i < DB; ++i) bb[i] = i < nc ? b[c0 + i] : 0.f;
}

// One packed row of Wp pixels of DB floats (dwb_row's layout) into dst: packed columns [j0, j1) take
// channels [c0, c0 + nc) of consecutive image pixels, src pointing at the first one's channel c0
// (pixel stride C); the other columns (all of them where j0 >= j1) are zero.
template <typename T_>
static inline void dwb_pack_row(const T_* src, int64_t C, int64_t nc, int64_t j0, int64_t j1, int64_t Wp, float* dst) {
  if (j0 >= j1) j0 = j1 = Wp;
  for (int64_t q = 0; q < j0 * DB; q += VL) vstore(dst + q, vf{});
  for (int64_t q = j1 * DB; q < Wp * DB; q += VL) vstore(dst + q, vf{});
  dst += j0 * DB;
  if (nc == DB) {
    for (int64_t j = j0; j < j1; ++j, src += C, dst += DB)
#pragma GCC unroll 4
      for (int64_t q = 0; q < DB; q += VL) vstore(dst + q, vld(src + q));
  } else {
    for (int64_t j = j0; j < j1; ++j, src += C, dst += DB)
      for (int64_t q = 0; q < DB; ++q) dst[q] = q < nc ? ld(src, q) : 0.f;
  }
}

// Tiles [t_begin, t_end) of B x ceil(C / DB) x ceil(H / band): (image, channel block, band of output
// rows). x, y (B, H, Wd, C), both fp32 or both bf16; w (7, 7, C), b (C) fp32. scratch: dwb_scratch.
FVK_ENTRY void dwb_tiles(const void* x, void* y, bool bf16, int64_t H, int64_t Wd, int64_t C, const float* w,
                      const float* b, bool gelu, int64_t t_begin, int64_t t_end, float* scratch) {
  const int64_t RB = dwb_band(H), nband = (H + RB - 1) / RB, ncb = (C + DB - 1) / DB, Wp = dwb_wp(Wd);
  float* buf = scratch;
  float* wb = scratch + (RB + 6) * Wp * DB;
  float* bb = wb + 49 * DB;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t bi = t / (ncb * nband), cb = t / nband % ncb, band = t % nband;
    const int64_t c0 = cb * DB, nc = C - c0 < DB ? C - c0 : DB, oh0 = band * RB, nr = H - oh0 < RB ? H - oh0 : RB;
    dwb_weights(w, b, C, c0, nc, wb, bb);
    // the band's input rows oh0 - 3 .. oh0 + nr + 2, zero outside the image and its columns
    auto pack = [&](const auto* xi) {
      for (int64_t r = 0; r < nr + 6; ++r) {
        const int64_t ih = oh0 + r - 3;
        const bool in = ih >= 0 && ih < H;
        dwb_pack_row(xi + (in ? ih : 0) * Wd * C + c0, C, nc, 3, in ? Wd + 3 : 0, Wp, buf + r * Wp * DB);
      }
    };
    const int64_t img = bi * H * Wd * C, orow = Wd * C;
    if (bf16) {
      pack(static_cast<const uint16_t*>(x) + img);
      uint16_t* yo = static_cast<uint16_t*>(y) + img + c0;
      for (int64_t r = 0; r < nr; ++r) dwb_row<7>(buf, Wp, Wd, wb, bb, gelu, r, yo + (oh0 + r) * orow, C, nc);
    } else {
      pack(static_cast<const float*>(x) + img);
      float* yo = static_cast<float*>(y) + img + c0;
      for (int64_t r = 0; r < nr; ++r) dwb_row<7>(buf, Wp, Wd, wb, bb, gelu, r, yo + (oh0 + r) * orow, C, nc);
    }
  }
}

// ---- dwconv's general path: any stride, channel multiplier M = Co / Cin and padding -------------
// One output pixel's Co channels into acc: bias (or 0), then the valid taps row by row,
// acc[c] += x[tap][c / M] * w[tap][c]. Scalar code that the compiler vectorises for the ISA; each
// output is summed in the same order whatever the ISA or thread.
template <typename T_>
static inline void dwg_pixel(const T_* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
                             float* __restrict__ acc, int64_t H, int64_t Wd, int64_t Cin, int64_t Co, int64_t M,
                             int64_t K, int64_t ih0, int64_t iw0) {
  if (bias) {
    for (int64_t c = 0; c < Co; ++c) acc[c] = bias[c];
  } else {
    for (int64_t c = 0; c < Co; ++c) acc[c] = 0.f;
  }
  for (int64_t kh = 0; kh < K; ++kh) {
    const int64_t ih = ih0 + kh;
    if (ih < 0 || ih >= H) continue;
    for (int64_t kw = 0; kw < K; ++kw) {
      const int64_t iw = iw0 + kw;
      if (iw < 0 || iw >= Wd) continue;
      const T_* xp = x + (ih * Wd + iw) * Cin;
      const float* wp = w + (kh * K + kw) * Co;
      if (M == 1) {
        for (int64_t c = 0; c < Co; ++c) acc[c] += ld(xp, c) * wp[c];
      } else {
        for (int64_t ci = 0; ci < Cin; ++ci) {
          const float xv = ld(xp, ci);
          for (int64_t m = 0; m < M; ++m) acc[ci * M + m] += xv * wp[ci * M + m];
        }
      }
    }
  }
}

template <typename T_>
static void dwg_rows(const T_* x, T_* y, int64_t H, int64_t Wd, int64_t Cin, int64_t Co, int64_t K, int64_t stride,
                     int64_t pad, int64_t Ho, int64_t Wo, const float* w, const float* b, bool gelu, int64_t r_begin,
                     int64_t r_end, float* acc) {
  for (int64_t r = r_begin; r < r_end; ++r) {
    const int64_t bi = r / Ho, oh = r % Ho;
    const T_* xb = x + bi * H * Wd * Cin;
    T_* row = y + r * Wo * Co;
    for (int64_t ow = 0; ow < Wo; ++ow) {
      dwg_pixel<T_>(xb, w, b, acc, H, Wd, Cin, Co, Co / Cin, K, oh * stride - pad, ow * stride - pad);
      T_* op = row + ow * Co;
      if (gelu) {
        for (int64_t c = 0; c < Co; ++c) st(op, c, ::fastvlm::gelu_scalar(acc[c]));
      } else {
        for (int64_t c = 0; c < Co; ++c) st(op, c, acc[c]);
      }
    }
  }
}

// Output rows [r_begin, r_end) of the B x Ho rows; acc: Co floats of scratch. b may be null.
FVK_ENTRY void dw_general_rows(const void* x, void* y, bool bf16, int64_t H, int64_t Wd, int64_t Cin, int64_t Co,
                               int64_t K, int64_t stride, int64_t pad, int64_t Ho, int64_t Wo, const float* w,
                               const float* b, bool gelu, int64_t r_begin, int64_t r_end, float* acc) {
  if (bf16)
    dwg_rows(static_cast<const uint16_t*>(x), static_cast<uint16_t*>(y), H, Wd, Cin, Co, K, stride, pad, Ho, Wo, w, b,
             gelu, r_begin, r_end, acc);
  else
    dwg_rows(static_cast<const float*>(x), static_cast<float*>(y), H, Wd, Cin, Co, K, stride, pad, Ho, Wo, w, b, gelu,
             r_begin, r_end, acc);
}
