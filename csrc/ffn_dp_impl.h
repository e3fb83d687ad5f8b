// The bfloat16 ConvFFN (and attention's qkv / proj) on AVX512_BF16: the GEMMs multiply bf16 pairs into fp32 accumulators
// (vdpbf16ps: acc[i] += a[2i+1] b[2i+1] + a[2i] b[2i], 16 fp32 lanes per instruction, twice the
// multiply-adds of an fp32 FMA), on weights packed once by pack_linear_bf16. Included by ffn.cpp,
// after ffn_impl.h and attn_impl.h, in the ffn_avx512bf16 namespace only (FVK_VL = 16), which defines
//   vf fvk_dpbf16(vf acc, uint32_t a2, vf w): acc + the products of the bf16 pair a2 (low half:
//   the even k) with the 16 bf16 pairs of w (the bits of a vf), high (odd) products added first.
//
// Numerics: bf16 storage, fp32 accumulation, like the fp32-compute bf16 path (ffn_impl.h), except
// that the GEMM operands are bf16: the depthwise output d and the GELU output (fc2's input) are
// rounded to bf16 (nearest even) before they are multiplied, as eager PyTorch in bf16 rounds every
// layer's output. The weights of a bf16 model are bf16 already, so packing them loses nothing.
//
// Layout (pack_linear_bf16): an (N, K) weight as (P, ceil(K / 2), 32) bf16, P = packed_panels(N):
// out[p][j][2i + e] = w[16p + i][2j + e], zero padded (channels past N, and k = K when K is odd).
// One 64-byte row [p][j] is a vector of 16 channel lanes, each holding the pair (k = 2j, 2j + 1).
// A GEMM operand row is bf16 with an even length: an odd K gets a zero partner at k = K.

static_assert(VL == PW, "the bf16-pair panels hold one 16-lane vector per pair of k");

typedef float vfa __attribute__((vector_size(FVK_VL * 4), aligned(2), may_alias));  // 32 bf16 as a vf
static inline vf vload_pairs(const uint16_t* p) { return *reinterpret_cast<const vfa*>(p); }
static inline uint32_t load_pair(const uint16_t* p) {
  uint32_t v;
  __builtin_memcpy(&v, p, 4);
  return v;
}

constexpr int64_t KP_MAX = 256;  // pairs per K block: a block's 2-panel weight slice is 32 KB, as fp32's
// Pixels per micro-tile: 8 x 2 = 16 accumulators (+ 2 weight vectors and a broadcast: 19 of the 32
// zmm registers). vdpbf16ps has a latency of several cycles and this project's Zen 5 issues two per
// cycle (performance.md: ~900 GFLOP/s on 2 threads), so the 12 independent sums of the fp32 6 x 2
// tile would leave no slack. (Chosen from that arithmetic; not yet timed on an AVX512_BF16 CPU.)
constexpr int MRD = 8;

// One MRD x NR tile (M <= MRD pixels, 2 vectors = 2 panels of channels) of a K block of kp pairs.
//   a: bf16 pixel rows (pair j of row t at a + t * lda + 2 j); w0, w1: the two panels at the block's
//   first pair (32 bf16 per pair). first: start from bias (else from the fp32 partial sums in buf);
//   last: run the epilogue (else store the partial sums to buf).
//   EPI 0 (fc1): last block writes h[t][n] = bf16(GELU(acc)) (row stride ldh).
//   EPI 1 (fc2, attention's proj): last block writes y[t][n] = x[t][n] + gamma[n] * acc, n < N
//   (x bf16, or fp32: TX; y bf16).
//   EPI 3 (attention's qkv): buf is the output, acc as is.
template <int M, int EPI, typename TX>
static inline void ptile_dp(const uint16_t* __restrict__ a, int64_t lda, int64_t kp, const uint16_t* __restrict__ w0,
                            const uint16_t* __restrict__ w1, bool first, bool last, const float* bias, float* buf,
                            int64_t ldb, int64_t n0, int64_t N, uint16_t* h, int64_t ldh, const TX* x,
                            uint16_t* y, int64_t ldy, const float* gamma) {
  vf acc0[M], acc1[M];
  acc_start<M>(acc0, acc1, first, bias, buf, ldb, n0);
  for (int64_t j = 0; j < kp; ++j) {
    const vf b0 = vload_pairs(w0 + j * 2 * PW), b1 = vload_pairs(w1 + j * 2 * PW);
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      const uint32_t s = load_pair(a + r * lda + 2 * j);  // broadcast: one bf16 pair of pixel r
      acc0[r] = fvk_dpbf16(acc0[r], s, b0);
      acc1[r] = fvk_dpbf16(acc1[r], s, b1);
    }
  }
  if (!last || EPI == 3) {
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) vstore(buf + r * ldb + n0, acc0[r]), vstore(buf + r * ldb + n0 + VL, acc1[r]);
    return;
  }
  if (EPI == 0) {
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) vst(h + r * ldh + n0, vgelu(acc0[r])), vst(h + r * ldh + n0 + VL, vgelu(acc1[r]));
    return;
  }
  residual_out<M>(acc0, acc1, n0, N, x, y, ldy, gamma);
}

// C(np x N) for one tile over the K range [0, K) of a longer sum, pgemm_part's blocking on bf16
// pairs: a (np x K bf16, row stride lda, even; an odd K's partner column zero); Wp points at the
// range's first pair in the bf16-pair panels of a weight with ldp pairs per panel row (panel p at
// Wp + p * ldp * 32). first_part / last_part as pgemm_part's (fp32 partial sums through buf).
// TX: the storage of the epilogue's x (EPI 1).
template <int EPI, typename TX>
static void pgemm_dp_part(const uint16_t* a, int64_t lda, int64_t np, int64_t K, const uint16_t* Wp, int64_t ldp,
                          int64_t N, const float* bias, float* buf, int64_t ldb, uint16_t* h, int64_t ldh,
                          const TX* x, uint16_t* y, int64_t ldy, const float* gamma, bool first_part,
                          bool last_part) {
  const int64_t KP = (K + 1) / 2, nkb = (KP + KP_MAX - 1) / KP_MAX, kpb = (KP + nkb - 1) / nkb;
  for (int64_t j0 = 0; j0 < KP; j0 += kpb) {
    const int64_t kc = KP - j0 < kpb ? KP - j0 : kpb;
    const bool first = first_part && j0 == 0, last = last_part && j0 + kc == KP;
    for (int64_t n0 = 0; n0 < N; n0 += NR) {  // n0 is a multiple of 2 panels
      const uint16_t* w0 = Wp + (n0 / PW) * ldp * 2 * PW + j0 * 2 * PW;
      const uint16_t* w1 = w0 + ldp * 2 * PW;
      for (int64_t t0 = 0; t0 < np; t0 += MRD) {
        const int m = static_cast<int>(np - t0 < MRD ? np - t0 : MRD);
        const uint16_t* at = a + t0 * lda + 2 * j0;
        float* bt = buf + t0 * ldb;
        uint16_t* ht = h ? h + t0 * ldh : nullptr;
        const TX* xt = x ? x + t0 * ldy : nullptr;
        uint16_t* yt = y ? y + t0 * ldy : nullptr;
        switch (m) {
#define FVK_PT(MM)                                                                                             \
  case MM:                                                                                                     \
    ptile_dp<MM, EPI>(at, lda, kc, w0, w1, first, last, bias, bt, ldb, n0, N, ht, ldh, xt, yt, ldy, gamma); \
    break;
          FVK_PT(8) FVK_PT(7) FVK_PT(6) FVK_PT(5) FVK_PT(4) FVK_PT(3) FVK_PT(2) FVK_PT(1)
#undef FVK_PT
        }
      }
    }
  }
}

// np fp32 rows of C (stride C) -> bf16 rows of Ce = C rounded up to even (round to nearest even);
// an odd C gets a zero partner for its last k.
static void to_bf16_rows(const float* a, int64_t np, int64_t C, uint16_t* out) {
  const int64_t Ce = (C + 1) / 2 * 2;
  if (Ce == C) {  // one flat run
    const int64_t n = np * C, nv = n / VL * VL;
    for (int64_t i = 0; i < nv; i += VL) vst(out + i, vload(a + i));
    for (int64_t i = nv; i < n; ++i) st(out, i, a[i]);
    return;
  }
  const int64_t cv = C / VL * VL;
  for (int64_t t = 0; t < np; ++t) {
    for (int64_t c = 0; c < cv; c += VL) vst(out + t * Ce + c, vload(a + t * C + c));
    for (int64_t c = cv; c < C; ++c) st(out, t * Ce + c, a[t * C + c]);
    out[t * Ce + C] = 0;  // its weight is 0, but scratch bits could read as Inf / NaN, and 0 * Inf is NaN
  }
}

// Scratch floats per thread of ffn_dp_tiles for tiles of T pixels: d (T x C fp32), the fc1 partial
// sums (T x ldh fp32), fc2's accumulator (T x Cp fp32), then bf16 rows: d (T x Ce), hid (T x ldh).
static inline int64_t ffn_dp_scratch(int64_t T, int64_t C, int64_t Hd) {
  const int64_t ldh = hid_stride(Hd), Cp = (C + NR - 1) / NR * NR, Ce = (C + 1) / 2 * 2;
  return T * (C + ldh + Cp) + (T * (Ce + ldh) + 1) / 2;
}

// One tile of the bf16 ConvFFN (ffn_tile's steps, the GEMMs on bf16 pairs): pixels [p0, p0 + np)
// of one image x (H x Wd x C, bf16; or fp32, the bf16 RepMixer block's mixer output), y bf16:
//   d(np x C)   = depthwise KxK (BN folded) of x in fp32, then rounded to bf16 rows dh (np x Ce)
//   hid         = bf16(GELU(dh . W1^T + b1)), HC hidden channels at a time (np x hc, stride ldh)
//   y[p]        = x[p] + gamma * (hid . W2^T + b2)  (fc2's chunks accumulate in fp32 in acc)
// w1p, w2p: pack_linear_bf16 of fc1_w (Hd, C) and fc2_w (C, Hd).
template <typename TX>
static void ffn_tile_dp(const TX* x, uint16_t* y, int64_t H, int64_t Wd, int64_t C, int64_t Hd, int64_t Kk,
                        const float* dw_w, const float* dw_b, const uint16_t* w1p, const float* b1,
                        const uint16_t* w2p, const float* b2, const float* gamma, int64_t p0, int64_t np, float* d,
                        float* hacc, float* acc, uint16_t* dh, uint16_t* hid) {
  const int64_t ldh = hid_stride(Hd), Cp = (C + NR - 1) / NR * NR, Ce = (C + 1) / 2 * 2;
  const int64_t KP1 = Ce / 2, KP2 = (Hd + 1) / 2;
  dw_rows(x, H, Wd, C, Kk, dw_w, dw_b, p0, np, d);
  to_bf16_rows(d, np, C, dh);
  for (int64_t h0 = 0; h0 < Hd; h0 += HC) {
    const int64_t hc = Hd - h0 < HC ? Hd - h0 : HC;
    // fc1 + GELU, hidden channels [h0, h0 + hc) into hid's columns [0, hc rounded up to NR): the
    // columns past hc are GELU(0) = 0 (zero padded weights and bias), so an odd hc's partner is 0
    pgemm_dp_part<0, uint16_t>(dh, Ce, np, C, w1p + (h0 / PW) * KP1 * 2 * PW, KP1, hc, b1 + h0, hacc, ldh, hid, ldh,
                               nullptr, nullptr, 0, nullptr, true, true);
    // fc2's pairs [h0 / 2, (h0 + hc + 1) / 2) of its Hd-long sum (h0 is even: HC is)
    pgemm_dp_part<1>(hid, ldh, np, hc, w2p + (h0 / 2) * 2 * PW, KP2, C, b2, acc, Cp, nullptr, 0, x + p0 * C,
                     y + p0 * C, C, gamma, h0 == 0, h0 + hc == Hd);
  }
}
static_assert(HC % 2 == 0, "fc2's hidden chunks start on a pair");

// Tiles [t_begin, t_end) of a batch (ffn_tiles' tiling), `scratch`: ffn_dp_scratch(T, C, Hd) floats.
// x bf16 (TX = uint16_t) or fp32 (the bf16 RepMixer block's mixer output); y bf16.
template <typename TX>
static void ffn_dp_tiles(const TX* x, uint16_t* y, int64_t H, int64_t Wd, int64_t C, int64_t Hd, int64_t Kk,
                         const float* dw_w, const float* dw_b, const uint16_t* w1p, const float* b1,
                         const uint16_t* w2p, const float* b2, const float* gamma, int64_t per_image, int64_t T,
                         int64_t t_begin, int64_t t_end, float* scratch) {
  const int64_t HW = H * Wd, ldh = hid_stride(Hd), Cp = (C + NR - 1) / NR * NR, Ce = (C + 1) / 2 * 2;
  float *d = scratch, *hacc = d + T * C, *acc = hacc + T * ldh;
  uint16_t* dh = reinterpret_cast<uint16_t*>(acc + T * Cp);
  uint16_t* hid = dh + T * Ce;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t b = t / per_image, p0 = tile_start(HW, per_image, t % per_image);
    const int64_t np = tile_start(HW, per_image, t % per_image + 1) - p0;
    ffn_tile_dp(x + b * HW * C, y + b * HW * C, H, Wd, C, Hd, Kk, dw_w, dw_b, w1p, b1, w2p, b2, gamma, p0, np, d,
                hacc, acc, dh, hid);
  }
}

// ---- attention's qkv and proj GEMMs on bf16 pairs (attn_impl.h's phases 1 and 3) ----------------
// wq = pack_linear_bf16(qkv_w (3C, C)), wp = pack_linear_bf16(proj_w (C, C)). The LayerNorm output
// and the attention output O (fp32) are rounded to bf16 rows, the GEMM operands; phase 2 (flash
// attention) stays fp32.

// Phase 1. scratch: qkv_dp_scratch(T, C, ldq) floats (ln, qkv as attn's, then ln in bf16).
static inline int64_t qkv_dp_scratch(int64_t T, int64_t C, int64_t ldq) {
  return T * (C + ldq) + (T * ((C + 1) / 2 * 2) + 1) / 2;
}
static void qkv_dp_tiles(const uint16_t* x, int64_t N, int64_t C, int64_t hd, const float* ln_w, const float* ln_b,
                         const uint16_t* wq, const float* zeros, float scale, float* Qt, float* Kb, float* Vt,
                         int64_t Np, int64_t ldq, int64_t per_image, int64_t T, int64_t t_begin, int64_t t_end,
                         float* scratch) {
  const int64_t Ce = (C + 1) / 2 * 2;
  float *ln = scratch, *qkv = ln + C * T;
  uint16_t* lnh = reinterpret_cast<uint16_t*>(qkv + T * ldq);
  const auto gemm = [&](const float* a, int64_t n, float* out) {
    to_bf16_rows(a, n, C, lnh);
    pgemm_dp_part<3, uint16_t>(lnh, Ce, n, C, wq, Ce / 2, 3 * C, zeros, out, ldq, nullptr, 0, nullptr, nullptr, 0,
                               nullptr, true, true);
  };
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t b = t / per_image, p0 = tile_start(N, per_image, t % per_image);
    const int64_t np = tile_start(N, per_image, t % per_image + 1) - p0;
    qkv_tile(x + b * N * C, N, C, hd, ln_w, ln_b, scale, p0, np, ln, qkv, ldq, Qt + b * C * Np, Kb + b * N * C,
             Vt + b * C * Np, Np, gemm);
  }
}

// Phase 3: y = x + gamma * (O . Wproj^T + bp). scratch: proj_dp_scratch(T, C, Cp) floats.
static inline int64_t proj_dp_scratch(int64_t T, int64_t C, int64_t Cp) {
  return T * Cp + (T * ((C + 1) / 2 * 2) + 1) / 2;
}
static void proj_dp_tiles(const uint16_t* x, uint16_t* y, int64_t N, int64_t C, const float* O, const uint16_t* wp,
                          const float* bp, const float* gamma, int64_t Cp, int64_t per_image, int64_t T,
                          int64_t t_begin, int64_t t_end, float* scratch) {
  const int64_t Ce = (C + 1) / 2 * 2;
  uint16_t* oh = reinterpret_cast<uint16_t*>(scratch + T * Cp);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t b = t / per_image, p0 = tile_start(N, per_image, t % per_image);
    const int64_t np = tile_start(N, per_image, t % per_image + 1) - p0, off = (b * N + p0) * C;
    to_bf16_rows(O + off, np, C, oh);
    pgemm_dp_part<1>(oh, Ce, np, C, wp, Ce / 2, C, bp, scratch, Cp, nullptr, 0, x + off, y + off, C, gamma, true, true);
  }
}

// The vdpbf16ps peak (fastvlm_C::peak_gflops with bf16_dot): `iters` rounds of NCH_DP independent
// chains acc = dpbf16(acc, pair, w), 4 VL flops each (VL lanes x 2 products x multiply + add). 16
// chains: vdpbf16ps has a longer latency than an FMA. Values stay normal (no denormal slow paths or
// flushing): the products are 2^-40.
constexpr int NCH_DP = 16;
constexpr int DP_CHAIN_FLOPS = 4 * VL * NCH_DP;  // per iteration of dp_chains
static float dp_chains(int64_t iters, float seed) {
  typedef uint32_t vu __attribute__((vector_size(FVK_VL * 4)));
  vf a[NCH_DP];
#pragma GCC unroll 16
  for (int i = 0; i < NCH_DP; ++i) a[i] = vset(seed * static_cast<float>(i + 1));
  const vf w = (vf)(vu{} + 0x2B802B80u);  // bf16 pairs (2^-40, 2^-40)
  const uint32_t one = 0x3F803F80u;     // the pair (1, 1)
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < NCH_DP; ++i) a[i] = fvk_dpbf16(a[i], one, w);
  }
  return sum_chains<NCH_DP>(a);
}
