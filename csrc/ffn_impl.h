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

// out(N x T) = [GELU](W(N x K) . in(K x T) + bias); T a multiple of NR. For each block of MR weight
// rows (kept in L1), sweep all pixel columns of the tile (kept in L2).
static void gemm_t(const float* W, const float* bias, int64_t N, int64_t K, const float* in, int64_t T, float* out,
                   bool gelu) {
  for (int64_t n0 = 0; n0 < N; n0 += MR) {
    const int m = static_cast<int>(N - n0 < MR ? N - n0 : MR);
    for (int64_t t0 = 0; t0 < T; t0 += NR) {
      const float* w = W + n0 * K;
      const float* b = in + t0;
      float* c = out + n0 * T + t0;
      switch (m) {
        case 6: micro<6>(w, K, b, T, K, bias + n0, c, T, gelu); break;
        case 5: micro<5>(w, K, b, T, K, bias + n0, c, T, gelu); break;
        case 4: micro<4>(w, K, b, T, K, bias + n0, c, T, gelu); break;
        case 3: micro<3>(w, K, b, T, K, bias + n0, c, T, gelu); break;
        case 2: micro<2>(w, K, b, T, K, bias + n0, c, T, gelu); break;
        default: micro<1>(w, K, b, T, K, bias + n0, c, T, gelu); break;
      }
    }
  }
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
