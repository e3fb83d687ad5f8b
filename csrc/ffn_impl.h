// The fused ConvFFN tile kernel, written once against a vector type `vf` of VL floats and included
// by ffn.cpp once per ISA (AVX2 with VL = 8, AVX-512 with VL = 16), each inside its own
// `#pragma GCC target` region and namespace. Self-contained: plain C++ and GCC vector extensions
// only (no intrinsics headers, no library calls), so it compiles under any target pragma.
//
// Layout trick: the 1x1 convs run transposed, hidden(4C x T) = W1(4C x C) . tile(C x T), with the
// activation tile stored channel-major. The micro-kernel then broadcasts one weight W[n][k] and
// multiplies it by a vector of NR = 2*VL pixels, so it streams W in its canonical (Cout, Cin)
// layout: the weights need no per-backend packing, and each weight row is read sequentially.

#ifndef FVK_VL
#error "define FVK_VL (and the vf / vi types) before including ffn_impl.h"
#endif

typedef float vfu __attribute__((vector_size(FVK_VL * 4), aligned(4)));  // unaligned access

constexpr int VL = FVK_VL;
constexpr int NR = 2 * VL;  // pixels per micro-tile (two vectors)
constexpr int MR = 6;       // output channels per micro-tile (MR x 2 accumulators)

static inline vf vload(const float* p) { return *reinterpret_cast<const vfu*>(p); }
static inline void vstore(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
static inline vf vset(float s) { return vf{} + s; }  // for constants and per-call values only

// exp(x) for x in [-87, 88]: 2^n * p(r), Cody-Waite reduction, degree-6 polynomial (~2 ulp).
static inline vf vexp(vf x) {
  x = x < vset(-87.f) ? vset(-87.f) : x;
  x = x > vset(88.f) ? vset(88.f) : x;
  const vf magic = vset(12582912.f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  vf t = x * vset(1.44269504088896341f) + magic;
  vf n = t - magic;
  vf r = x - n * vset(0.693145751953125f);
  r = r - n * vset(1.428606765330187e-06f);
  vf p = vset(1.f / 720);
  p = p * r + vset(1.f / 120);
  p = p * r + vset(1.f / 24);
  p = p * r + vset(1.f / 6);
  p = p * r + vset(0.5f);
  p = p * r + vset(1.f);
  p = p * r + vset(1.f);
  vi ni = (vi)t - (vi)magic;  // vector casts of equal size reinterpret the bits
  vi bits = (vi)p + (ni << 23);
  return (vf)bits;
}

// Exact-form GELU 0.5 x (1 + erf(x / sqrt 2)), erf by Abramowitz-Stegun 7.1.26 (|error| <= 1.5e-7).
static inline vf vgelu(vf x) {
  vf z = x * vset(0.70710678118654752f);
  vf az = z < vset(0.f) ? -z : z;
  vf t = vset(1.f) / (vset(1.f) + vset(0.3275911f) * az);
  vf poly = vset(1.061405429f);
  poly = poly * t + vset(-1.453152027f);
  poly = poly * t + vset(1.421413741f);
  poly = poly * t + vset(-0.284496736f);
  poly = poly * t + vset(0.254829592f);
  vf e = vset(1.f) - poly * t * vexp(-az * az);
  e = z < vset(0.f) ? -e : e;
  return vset(0.5f) * x * (vset(1.f) + e);
}

// C[n][t] (n < mr, t < NR) = bias[n] + sum_k W[n][k] * B[k][t]; W rows of length K (stride ldw),
// B rows of stride ldb, C rows of stride ldc. Optional GELU on the result.
template <int M>
static inline void micro(const float* __restrict__ W, int64_t ldw, const float* __restrict__ B, int64_t ldb,
                         int64_t K, const float* __restrict__ bias, float* __restrict__ C, int64_t ldc, bool gelu) {
  vf acc0[M], acc1[M];
#pragma GCC unroll 6
  for (int r = 0; r < M; ++r) {
    acc0[r] = vset(bias[r]);
    acc1[r] = acc0[r];
  }
  for (int64_t k = 0; k < K; ++k) {
    const vf b0 = vload(B + k * ldb), b1 = vload(B + k * ldb + VL);
#pragma GCC unroll 6
    for (int r = 0; r < M; ++r) {
      // scalar * vector: GCC broadcasts the weight straight from memory (vbroadcastss m32)
      const float a = W[r * ldw + k];
      acc0[r] += a * b0;
      acc1[r] += a * b1;
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < M; ++r) {
    if (gelu) {
      acc0[r] = vgelu(acc0[r]);
      acc1[r] = vgelu(acc1[r]);
    }
    vstore(C + r * ldc, acc0[r]);
    vstore(C + r * ldc + VL, acc1[r]);
  }
}

// out(N x T) (row stride ldo) = [GELU](W(N x K) (row stride ldw) . in(K x T) (row stride ldi) + bias);
// T a multiple of NR. For each block of MR weight rows (kept in L1), sweep all columns (kept in L2).
static void gemm_s(const float* W, int64_t ldw, const float* bias, int64_t N, int64_t K, const float* in, int64_t ldi,
                   int64_t T, float* out, int64_t ldo, bool gelu) {
  for (int64_t n0 = 0; n0 < N; n0 += MR) {
    const int m = static_cast<int>(N - n0 < MR ? N - n0 : MR);
    for (int64_t t0 = 0; t0 < T; t0 += NR) {
      const float* w = W + n0 * ldw;
      const float* b = in + t0;
      float* c = out + n0 * ldo + t0;
      switch (m) {
        case 6: micro<6>(w, ldw, b, ldi, K, bias + n0, c, ldo, gelu); break;
        case 5: micro<5>(w, ldw, b, ldi, K, bias + n0, c, ldo, gelu); break;
        case 4: micro<4>(w, ldw, b, ldi, K, bias + n0, c, ldo, gelu); break;
        case 3: micro<3>(w, ldw, b, ldi, K, bias + n0, c, ldo, gelu); break;
        case 2: micro<2>(w, ldw, b, ldi, K, bias + n0, c, ldo, gelu); break;
        default: micro<1>(w, ldw, b, ldi, K, bias + n0, c, ldo, gelu); break;
      }
    }
  }
}

// The packed case: W (N x K) and in (K x T) contiguous, out (N x T).
static inline void gemm_t(const float* W, const float* bias, int64_t N, int64_t K, const float* in, int64_t T,
                          float* out, bool gelu) {
  gemm_s(W, K, bias, N, K, in, T, T, out, T, gelu);
}

// Storage <-> float. bf16 is carried as uint16_t bits; the store rounds to nearest even.
static inline float ld(const float* p, int64_t i) { return p[i]; }
static inline float ld(const uint16_t* p, int64_t i) {
  uint32_t b = static_cast<uint32_t>(p[i]) << 16;
  float f;
  __builtin_memcpy(&f, &b, 4);
  return f;
}
static inline void st(float* p, int64_t i, float v) { p[i] = v; }
static inline void st(uint16_t* p, int64_t i, float v) {
  uint32_t b;
  __builtin_memcpy(&b, &v, 4);
  if (v != v) {
    p[i] = 0x7FC0;  // NaN stays NaN
    return;
  }
  p[i] = static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

// One tile: pixels [p0, p0 + np) of one image x (H x Wd x C, flattened row-major h * Wd + w).
//   dwT(C x T)   = depthwise KxK (BN folded) of the input around each pixel, channel-major
//   hid(Hd x T)  = GELU(W1 . dwT + b1)        -- the 4C-wide hidden, never leaves this buffer
//   o(C x T)     = W2 . hid + b2
//   y[p][c]      = x[p][c] + gamma[c] * o[c][p]
template <typename T_>
static void ffn_tile(const T_* x, T_* y, int64_t H, int64_t Wd, int64_t C, int64_t Hd, int64_t Kk,
                     const float* dw_w, const float* dw_b, const float* w1, const float* b1, const float* w2,
                     const float* b2, const float* gamma, int64_t p0, int64_t np, int64_t T, float* dwT, float* hid,
                     float* o, float* pix) {
  const int64_t pad = Kk / 2;
  for (int64_t j = 0; j < T; ++j) {
    if (j >= np) {  // columns past the image: zeros, computed and dropped
      for (int64_t c = 0; c < C; ++c) dwT[c * T + j] = 0.f;
      continue;
    }
    const int64_t p = p0 + j, h = p / Wd, w = p % Wd;
    for (int64_t c = 0; c < C; ++c) pix[c] = dw_b[c];
    for (int64_t kh = 0; kh < Kk; ++kh) {
      const int64_t ih = h + kh - pad;
      if (ih < 0 || ih >= H) continue;
      for (int64_t kw = 0; kw < Kk; ++kw) {
        const int64_t iw = w + kw - pad;
        if (iw < 0 || iw >= Wd) continue;
        const T_* xp = x + (ih * Wd + iw) * C;
        const float* wp = dw_w + (kh * Kk + kw) * C;
        for (int64_t c = 0; c < C; ++c) pix[c] += ld(xp, c) * wp[c];
      }
    }
    for (int64_t c = 0; c < C; ++c) dwT[c * T + j] = pix[c];
  }
  gemm_t(w1, b1, Hd, C, dwT, T, hid, true);
  gemm_t(w2, b2, C, Hd, hid, T, o, false);
  for (int64_t j = 0; j < np; ++j) {
    const int64_t base = (p0 + j) * C;
    for (int64_t c = 0; c < C; ++c) st(y, base + c, ld(x, base + c) + gamma[c] * o[c * T + j]);
  }
}

// Tiles [t_begin, t_end) of a batch: tile t covers image t / tiles_per_image, pixels from
// (t % tiles_per_image) * T. `scratch` holds (2C + Hd) * T + C floats.
static void ffn_tiles(const void* x, void* y, bool bf16, int64_t H, int64_t Wd, int64_t C, int64_t Hd, int64_t Kk,
                      const float* dw_w, const float* dw_b, const float* w1, const float* b1, const float* w2,
                      const float* b2, const float* gamma, int64_t T, int64_t t_begin, int64_t t_end,
                      float* scratch) {
  const int64_t HW = H * Wd, per_image = (HW + T - 1) / T;
  float *dwT = scratch, *hid = dwT + C * T, *o = hid + Hd * T, *pix = o + C * T;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t b = t / per_image, p0 = (t % per_image) * T;
    const int64_t np = HW - p0 < T ? HW - p0 : T;
    if (bf16) {
      const uint16_t* xb = static_cast<const uint16_t*>(x) + b * HW * C;
      uint16_t* yb = static_cast<uint16_t*>(y) + b * HW * C;
      ffn_tile(xb, yb, H, Wd, C, Hd, Kk, dw_w, dw_b, w1, b1, w2, b2, gamma, p0, np, T, dwT, hid, o, pix);
    } else {
      const float* xb = static_cast<const float*>(x) + b * HW * C;
      float* yb = static_cast<float*>(y) + b * HW * C;
      ffn_tile(xb, yb, H, Wd, C, Hd, Kk, dw_w, dw_b, w1, b1, w2, b2, gamma, p0, np, T, dwT, hid, o, pix);
    }
  }
}

// ---- stem: GELU(conv3x3 s2, Cin -> C) -> GELU(dw3x3 s2) -> GELU(1x1 C -> C), fused --------------
// Per tile of final-grid pixels, the intermediate conv3x3 values each dw window needs are computed
// on the fly (each intermediate pixel is used by 2.25 windows on average), so the full-resolution
// intermediate (C x H/2 x W/2) is never written to memory. w0p: (3, 3, Cin, C), channel-contiguous.
// `mid` and `acc` hold C rounded up to VL floats (the GELU runs on whole vectors).
static inline void gelu_inplace(float* v, int64_t n) {
  for (int64_t c = 0; c < n; c += VL) vstore(v + c, vgelu(vload(v + c)));
}

template <typename T_>
static void stem_tile(const T_* x, T_* y, int64_t H, int64_t Wd, int64_t Cin, int64_t C, const float* w0p,
                      const float* b0, const float* w1, const float* b1, const float* w2, const float* b2,
                      int64_t H1, int64_t W1, int64_t W2, int64_t p0, int64_t np, int64_t T, float* dwT, float* o,
                      float* mid, float* acc) {
  const int64_t Cv = (C + VL - 1) / VL * VL;
  for (int64_t j = 0; j < T; ++j) {
    if (j >= np) {
      for (int64_t c = 0; c < C; ++c) dwT[c * T + j] = 0.f;
      continue;
    }
    const int64_t p = p0 + j, oh = p / W2, ow = p % W2;
    for (int64_t c = 0; c < C; ++c) acc[c] = b1[c];
    for (int64_t kh = 0; kh < 3; ++kh) {
      const int64_t ih1 = oh * 2 - 1 + kh;
      if (ih1 < 0 || ih1 >= H1) continue;
      for (int64_t kw = 0; kw < 3; ++kw) {
        const int64_t iw1 = ow * 2 - 1 + kw;
        if (iw1 < 0 || iw1 >= W1) continue;
        for (int64_t c = 0; c < C; ++c) mid[c] = b0[c];
        for (int64_t th = 0; th < 3; ++th) {
          const int64_t ih = ih1 * 2 - 1 + th;
          if (ih < 0 || ih >= H) continue;
          for (int64_t tw = 0; tw < 3; ++tw) {
            const int64_t iw = iw1 * 2 - 1 + tw;
            if (iw < 0 || iw >= Wd) continue;
            const T_* xp = x + (ih * Wd + iw) * Cin;
            const float* wp = w0p + (th * 3 + tw) * Cin * C;
            for (int64_t ci = 0; ci < Cin; ++ci) {
              const float xv = ld(xp, ci);
              const float* wc = wp + ci * C;
              for (int64_t c = 0; c < C; ++c) mid[c] += xv * wc[c];
            }
          }
        }
        gelu_inplace(mid, Cv);
        const float* wd = w1 + (kh * 3 + kw) * C;
        for (int64_t c = 0; c < C; ++c) acc[c] += mid[c] * wd[c];
      }
    }
    gelu_inplace(acc, Cv);
    for (int64_t c = 0; c < C; ++c) dwT[c * T + j] = acc[c];
  }
  gemm_t(w2, b2, C, C, dwT, T, o, true);
  for (int64_t j = 0; j < np; ++j) {
    const int64_t base = (p0 + j) * C;
    for (int64_t c = 0; c < C; ++c) st(y, base + c, o[c * T + j]);
  }
}

// Tiles [t_begin, t_end) of a batch of images (H x Wd x Cin) -> (H2 x W2 x C).
// `scratch`: 2 * C * T + 2 * Cv floats, 64-byte aligned.
static void stem_tiles(const void* x, void* y, bool bf16, int64_t H, int64_t Wd, int64_t Cin, int64_t C,
                       const float* w0p, const float* b0, const float* w1, const float* b1, const float* w2,
                       const float* b2, int64_t T, int64_t t_begin, int64_t t_end, float* scratch) {
  const int64_t H1 = (H - 1) / 2 + 1, W1 = (Wd - 1) / 2 + 1, H2 = (H1 - 1) / 2 + 1, W2 = (W1 - 1) / 2 + 1;
  const int64_t HW2 = H2 * W2, per_image = (HW2 + T - 1) / T, Cv = (C + VL - 1) / VL * VL;
  float *dwT = scratch, *o = dwT + C * T, *mid = o + C * T, *acc = mid + Cv;
  for (int64_t c = C; c < Cv; ++c) mid[c] = acc[c] = 0.f;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t b = t / per_image, p0 = (t % per_image) * T;
    const int64_t np = HW2 - p0 < T ? HW2 - p0 : T;
    if (bf16) {
      stem_tile(static_cast<const uint16_t*>(x) + b * H * Wd * Cin, static_cast<uint16_t*>(y) + b * HW2 * C, H, Wd,
                Cin, C, w0p, b0, w1, b1, w2, b2, H1, W1, W2, p0, np, T, dwT, o, mid, acc);
    } else {
      stem_tile(static_cast<const float*>(x) + b * H * Wd * Cin, static_cast<float*>(y) + b * HW2 * C, H, Wd, Cin,
                C, w0p, b0, w1, b1, w2, b2, H1, W1, W2, p0, np, T, dwT, o, mid, acc);
    }
  }
}

// ---- patch_embed: GELU(dw KxK stride s, channel multiplier M) -> GELU(1x1), fused ---------------
// Per tile of output pixels: the grouped conv output (Co = M * Cin channels) goes channel-major
// into the tile, then the 1x1 runs on the GEMM micro-kernel; the Co-wide intermediate never
// leaves the tile. dw_w: (K, K, Co); pw_w: (Co, Co).
template <typename T_>
static void dwpw_tile(const T_* x, T_* y, int64_t H, int64_t Wd, int64_t Cin, int64_t Co, int64_t Kk, int64_t s,
                      const float* dw_w, const float* dw_b, const float* pw_w, const float* pw_b, int64_t Wo,
                      int64_t p0, int64_t np, int64_t T, float* dwT, float* o, float* acc) {
  const int64_t M = Co / Cin, pad = Kk / 2, Cv = (Co + VL - 1) / VL * VL;
  for (int64_t j = 0; j < T; ++j) {
    if (j >= np) {
      for (int64_t c = 0; c < Co; ++c) dwT[c * T + j] = 0.f;
      continue;
    }
    const int64_t p = p0 + j, oh = p / Wo, ow = p % Wo;
    for (int64_t c = 0; c < Co; ++c) acc[c] = dw_b[c];
    for (int64_t kh = 0; kh < Kk; ++kh) {
      const int64_t ih = oh * s - pad + kh;
      if (ih < 0 || ih >= H) continue;
      for (int64_t kw = 0; kw < Kk; ++kw) {
        const int64_t iw = ow * s - pad + kw;
        if (iw < 0 || iw >= Wd) continue;
        const T_* xp = x + (ih * Wd + iw) * Cin;
        const float* wp = dw_w + (kh * Kk + kw) * Co;
        if (M == 2) {
          for (int64_t ci = 0; ci < Cin; ++ci) {
            const float xv = ld(xp, ci);
            acc[2 * ci] += xv * wp[2 * ci];
            acc[2 * ci + 1] += xv * wp[2 * ci + 1];
          }
        } else {
          for (int64_t co = 0; co < Co; ++co) acc[co] += ld(xp, co / M) * wp[co];
        }
      }
    }
    gelu_inplace(acc, Cv);
    for (int64_t c = 0; c < Co; ++c) dwT[c * T + j] = acc[c];
  }
  gemm_t(pw_w, pw_b, Co, Co, dwT, T, o, true);
  for (int64_t j = 0; j < np; ++j) {
    const int64_t base = (p0 + j) * Co;
    for (int64_t c = 0; c < Co; ++c) st(y, base + c, o[c * T + j]);
  }
}

// Tiles [t_begin, t_end) of a batch. `scratch`: 2 * Co * T + Cv floats, 64-byte aligned.
static void dwpw_tiles(const void* x, void* y, bool bf16, int64_t H, int64_t Wd, int64_t Cin, int64_t Co, int64_t Kk,
                       int64_t s, const float* dw_w, const float* dw_b, const float* pw_w, const float* pw_b,
                       int64_t T, int64_t t_begin, int64_t t_end, float* scratch) {
  const int64_t pad = Kk / 2, Ho = (H + 2 * pad - Kk) / s + 1, Wo = (Wd + 2 * pad - Kk) / s + 1;
  const int64_t HWo = Ho * Wo, per_image = (HWo + T - 1) / T, Cv = (Co + VL - 1) / VL * VL;
  float *dwT = scratch, *o = dwT + Co * T, *acc = o + Co * T;
  for (int64_t c = Co; c < Cv; ++c) acc[c] = 0.f;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t b = t / per_image, p0 = (t % per_image) * T;
    const int64_t np = HWo - p0 < T ? HWo - p0 : T;
    if (bf16) {
      dwpw_tile(static_cast<const uint16_t*>(x) + b * H * Wd * Cin, static_cast<uint16_t*>(y) + b * HWo * Co, H, Wd,
                Cin, Co, Kk, s, dw_w, dw_b, pw_w, pw_b, Wo, p0, np, T, dwT, o, acc);
    } else {
      dwpw_tile(static_cast<const float*>(x) + b * H * Wd * Cin, static_cast<float*>(y) + b * HWo * Co, H, Wd, Cin,
                Co, Kk, s, dw_w, dw_b, pw_w, pw_b, Wo, p0, np, T, dwT, o, acc);
    }
  }
}
