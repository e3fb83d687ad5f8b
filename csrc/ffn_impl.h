// The tile kernels of the ConvFFN, stem, patch_embed and the RepMixer / RepCPE depthwise convs,
// written once against a vector type `vf` of VL floats and included by ffn.cpp once per ISA (AVX2
// with VL = 8, AVX-512 with VL = 16, SSE with VL = 4), each inside its own `#pragma GCC target`
// region and namespace. Self-contained: plain C++ and GCC vector extensions only (no intrinsics
// headers, no library calls; gelu.h is plain C++ too; std::true_type from <type_traits>, which
// ffn.cpp includes first), so it compiles under any target pragma. Optional hooks replace the
// portable bf16 conversions where ffn.cpp defines them with the ISA's instructions: FVK_LD_BF16(p)
// (VL bf16 -> floats; GCC lowers the portable 16-lane widening as two 256-bit halves) and
// FVK_CVT_BF16(v) (floats -> bf16, round to nearest even: VCVTNEPS2BF16 on AVX512_BF16); and
// FVK_VMIN(a, b) / FVK_VMAX(a, b) (the ISA's minps / maxps: a < b ? a : b, b when either is NaN; and
// a > b ? a : b likewise) for clamp_sym.
//
// Two GEMM drivers on the same 6 x 2-vector register tile (12 accumulators, the AVX2 maximum with
// one broadcast and two loads live):
//  - gemm_s, channel-major: out(N x T) = W(N x K) . in(K x T), broadcasting weights from their
//    canonical (Cout, Cin) rows and loading vectors of pixels; attention's S = K Q^T and P V
//    products (attn_impl.h) use it, queries along the vector;
//  - pgemm, pixel-major: C(T x N) = A(T x K) . W^T on weights packed once into 16-channel panels,
//    broadcasting activations; the ConvFFN, the stem's conv3x3 and 1x1, patch_embed and attention's
//    qkv and proj use it (no transposes in the tile, the epilogue writes NHWC rows of y directly).

#ifndef FVK_VL
#error "define FVK_VL (and the vf / vi types) before including ffn_impl.h"
#endif
#ifndef FVK_GELU_BODY
#error "include gelu.h (outside any namespace) before ffn_impl.h"
#endif

typedef float vfu __attribute__((vector_size(FVK_VL * 4), aligned(4)));  // unaligned access

constexpr int VL = FVK_VL;
constexpr int NR = 2 * VL;  // pixels per micro-tile (two vectors)
constexpr int MR = 6;       // output channels per micro-tile (MR x 2 accumulators)

static inline vf vload(const float* p) { return *reinterpret_cast<const vfu*>(p); }
static inline void vstore(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
static inline vf vset(float s) { return vf{} + s; }  // for constants and per-call values only

// z clamped to [lo, hi] (lo < hi), a NaN z kept: exactly `z > hi ? hi : z`, then `z < lo ? lo : z`.
// With FVK_VMIN / FVK_VMAX (ffn.cpp: the ISA's minps / maxps, which return their second operand when
// either is NaN) that is one instruction each; GCC lowers the portable selects against a constant
// bound as a compare and a blend each (in standalone loops on the Zen 3 of bench/results/zen3, bitwise
// the same results: the GELU 12.6 -> 10.8 cycles per AVX2 vector, vexp 3.0 -> 2.5 ns).
static inline vf vmin_hi(vf z, vf hi) {  // z > hi ? hi : z
#if defined(FVK_VMIN)
  return FVK_VMIN(hi, z);
#else
  return z > hi ? hi : z;
#endif
}
static inline vf vmax_lo(vf z, vf lo) {  // z < lo ? lo : z
#if defined(FVK_VMAX)
  return FVK_VMAX(lo, z);
#else
  return z < lo ? lo : z;
#endif
}
static inline vf vclamp(vf z, vf lo, vf hi) { return vmax_lo(vmin_hi(z, hi), lo); }
static inline vf clamp_sym(vf z, vf hi) { return vclamp(z, -hi, hi); }  // gelu.h's CLAMP

// exp(x) for x in [-87, 88]: 2^n * p(r), Cody-Waite reduction, degree-6 polynomial (~2 ulp).
static inline vf vexp(vf x) {
  x = vclamp(x, vset(-87.f), vset(88.f));
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

// 2^x for x <= 0 (attention's softmax: log2(e) is folded into q's scale, so its arguments are
// differences of base-2 scores), NaN kept, ~1.2e-7 relative error. x is clamped below at -125, where
// 2^x is still a normal float; n = round(x), r = x - n in [-0.5, 0.5] exactly; 2^r by a degree-6
// minimax polynomial, evaluated in two levels of r^2 (a chain of 4 multiply-adds instead of 6).
// Against vexp: no upper clamp, no Cody-Waite multiply-adds; 2.6 -> 2.0 ns per AVX2 vector in the
// softmax's load / exp / store / sum loop (scripts/softmax_check.cpp, on the Zen 3 of bench/results/zen3).
static inline vf vexp2_neg(vf x) {
  x = vmax_lo(x, vset(-125.f));  // a NaN x kept
  const vf magic = vset(12582912.f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  const vf t = x + magic;
  const vf r = x - (t - magic), r2 = r * r;
  const vf a = r * vset(6.93147206e-01f) + vset(1.f), b = r * vset(5.55032878e-02f) + vset(2.40226469e-01f);
  vf c = r * vset(1.33999314e-03f) + vset(9.61848896e-03f);
  c = r2 * vset(1.53458118e-04f) + c;
  const vf p = (c * r2 + b) * r2 + a;
  vi ni = (vi)t - (vi)magic;
  return (vf)((vi)p + (ni << 23));
}

// Exact-form GELU (gelu.h: erf by a rational approximation; max error 9.5e-7 on [-10, 10] in float32).
static inline vf vgelu(vf x) {
  vf fvk_gelu_out;
  FVK_GELU_BODY(vf, x, vset(1.f), clamp_sym);
  return fvk_gelu_out;
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

// ---- ConvFFN: pixel-major GEMMs on pre-packed weight panels --------------------------------------
// The FFN's two 1x1 convs run pixel-major, C(T x N) = A(T x K) . W^T, the classic GEMM orientation:
// the micro-kernel broadcasts one activation A[t][k] and multiplies it by NR consecutive output
// channels of a weight panel. Activations then stay in their natural NHWC layout (the depthwise
// output feeds fc1 and the residual epilogue writes y rows directly, with no transposes), and the
// weights are pre-packed once (ffn.cpp's pack_linear, called at accelerate() time through the cpu backend)
// into panels of 16 output channels: panel p holds W[16p .. 16p+15][k] at [p][k][0..15], zero
// padded, the panel count rounded up to even so a 32-channel AVX-512 micro-tile never reads past it.
//
// Blocking (per tile of T pixels): K in blocks of at most KC_MAX; for each block, for each NR-wide
// column of panels (KC x NR floats, kept in L1), for each MR-row group of pixels (the T x KC
// activation block, kept in L2). Every weight is read from L3/memory once per tile. The ConvFFN
// runs its hidden dimension in chunks of HC channels (ffn_tile), each a K range of fc2 (pgemm_part).
constexpr int PW = 16;          // packed panel width (output channels)
#ifndef FVK_KC_MAX
#define FVK_KC_MAX 256
#endif
constexpr int64_t KC_MAX = FVK_KC_MAX;  // K block: a KC x NR weight panel slice is 16 KB (AVX2), 32 KB (AVX-512)

static inline int64_t packed_panels(int64_t n) { return (n + 2 * PW - 1) / (2 * PW) * 2; }

// First pixel of tile i of the n tiles of an HW-pixel image (i = n gives HW): whole MR-pixel
// groups spread evenly, so tile sizes differ by at most one group (n <= ceil(HW / MR)).
static inline int64_t tile_start(int64_t HW, int64_t n, int64_t i) {
  const int64_t p = i * ((HW + MR - 1) / MR) / n * MR;
  return p < HW ? p : HW;
}

// bf16 <-> float on whole vectors (bf16 bits in uint16; round to nearest even, NaN kept).
typedef uint16_t vh __attribute__((vector_size(FVK_VL * 2), aligned(2)));
typedef uint32_t vu __attribute__((vector_size(FVK_VL * 4)));
static inline vf vld(const float* p) { return vload(p); }
static inline vf vld(const uint16_t* p) {
#ifdef FVK_LD_BF16  // the ISA's one-instruction widening (ffn.cpp)
  return FVK_LD_BF16(p);
#else
  const vu u = __builtin_convertvector(*reinterpret_cast<const vh*>(p), vu) << 16;
  return (vf)u;
#endif
}
static inline void vst(float* p, vf v) { vstore(p, v); }
// v rounded to bf16 (nearest even), as the high half of each lane's float bits (NaN not special-cased).
static inline vu vround_hi(vf v) {
  const vu b = (vu)v;
  return (b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u;
}
static inline void vst(uint16_t* p, vf v) {
#ifdef FVK_CVT_BF16  // the ISA's conversion instruction (ffn.cpp): same rounding, fewer instructions
  const auto r = FVK_CVT_BF16(v);
  static_assert(sizeof r == sizeof(vh), "one bf16 per lane");
  __builtin_memcpy(p, &r, sizeof r);
#else
  vu r = vround_hi(v) >> 16;
  r = (v != v) ? vu{} + 0x7FC0u : r;
  *reinterpret_cast<vh*>(p) = __builtin_convertvector(r, vh);
#endif
}

// A micro-tile's M x 2 accumulator vectors (channels n0 .. n0 + 2 VL): from the bias (first K
// block) or from the fp32 partial sums in buf (row stride ldb).
template <int M>
__attribute__((always_inline)) static inline void acc_start(vf* acc0, vf* acc1, bool first, const float* bias,
                                                            const float* buf, int64_t ldb, int64_t n0) {
  if (first) {
    const vf b0 = vload(bias + n0), b1 = vload(bias + n0 + VL);
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) acc0[r] = b0, acc1[r] = b1;
  } else {
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) acc0[r] = vload(buf + r * ldb + n0), acc1[r] = vload(buf + r * ldb + n0 + VL);
  }
}

// fc2's epilogue (EPI 1) for M pixel rows of two accumulator vectors (channels n0 .. n0 + 2 VL):
// y[t][n] = x[t][n] + gamma[n] * acc[t][n], n < N (storage T_ of x and y; gamma padded to whole vectors).
template <int M, typename T_>
__attribute__((always_inline)) static inline void residual_out(const vf* acc0, const vf* acc1, int64_t n0, int64_t N,
                                                               const T_* x, T_* y, int64_t ldy, const float* gamma) {
  const vf g0 = vload(gamma + n0), g1 = vload(gamma + n0 + VL);
  if (n0 + 2 * VL <= N) {
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      vst(y + r * ldy + n0, vld(x + r * ldy + n0) + g0 * acc0[r]);
      vst(y + r * ldy + n0 + VL, vld(x + r * ldy + n0 + VL) + g1 * acc1[r]);
    }
    return;
  }
  alignas(64) float o[2 * VL];
  for (int r = 0; r < M; ++r) {  // the last, partial column of channels
    vstore(o, g0 * acc0[r]);
    vstore(o + VL, g1 * acc1[r]);
    for (int64_t n = n0; n < N; ++n) st(y, r * ldy + n, ld(x, r * ldy + n) + o[n - n0]);
  }
}

// The 1x1 + GELU epilogue (EPI 2) for M pixel rows of two accumulator vectors (channels n0 .. n0 + 2 VL):
// y[t][n] = GELU(acc[t][n]), n < N (storage T_).
template <int M, typename T_>
__attribute__((always_inline)) static inline void gelu_out(vf* acc0, vf* acc1, int64_t n0, int64_t N, T_* y,
                                                           int64_t ldy) {
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r) acc0[r] = vgelu(acc0[r]), acc1[r] = vgelu(acc1[r]);
  if (n0 + 2 * VL <= N) {
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) vst(y + r * ldy + n0, acc0[r]), vst(y + r * ldy + n0 + VL, acc1[r]);
    return;
  }
  alignas(64) float o[2 * VL];
  for (int r = 0; r < M; ++r) {  // the last, partial column of channels
    vstore(o, acc0[r]);
    vstore(o + VL, acc1[r]);
    for (int64_t n = n0; n < N; ++n) st(y, r * ldy + n, o[n - n0]);
  }
}

// One MR x NR (M <= MR pixels, 2 vectors of channels) tile of a K block.
//   A: pixel rows (A[t][k] at a[t * lda + k]); w0, w1: the two vectors' panel columns (16 floats per k)
//   first: start from bias (else from the fp32 accumulator buf); last: run the epilogue (else store to buf)
//   EPI 0 (fc1): buf is also the output: GELU(acc) on the last block.
//   EPI 1 (fc2): last block writes y[t][n] = x[t][n] + gamma[n] * acc, n < N (storage T_).
//   EPI 2 (the stem's and patch_embed's 1x1): last block writes y[t][n] = GELU(acc), n < N.
//   EPI 3 (attention's qkv): buf is the output, acc as is.
template <int M, int EPI, typename T_>
static inline void ptile(const float* __restrict__ a, int64_t lda, int64_t kc, const float* __restrict__ w0,
                         const float* __restrict__ w1, bool first, bool last, const float* bias, float* buf,
                         int64_t ldb, int64_t n0, int64_t N, const T_* x, T_* y, int64_t ldy, const float* gamma,
                         const float* pf) {
  vf acc0[M], acc1[M];
  acc_start<M>(acc0, acc1, first, bias, buf, ldb, n0);
  // The K loops unrolled 8 times: on the Xeon of bench/results the loop's own counter, compare and
  // branch per k cost 3% of the whole fp32 forward (0.968x with the unroll, bench.ab; 0.975x with 4).
  if (pf) {  // the last pixel group of a weight slice: pull the next slice into L1 meanwhile
#pragma GCC unroll 8
    for (int64_t k = 0; k < kc; ++k) {
      __builtin_prefetch(pf + k * PW);
      const vf b0 = vload(w0 + k * PW), b1 = vload(w1 + k * PW);
#pragma GCC unroll 8
      for (int r = 0; r < M; ++r) {
        const float s = a[r * lda + k];
        acc0[r] += s * b0;
        acc1[r] += s * b1;
      }
    }
  } else
#pragma GCC unroll 8
  for (int64_t k = 0; k < kc; ++k) {
    const vf b0 = vload(w0 + k * PW), b1 = vload(w1 + k * PW);
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      const float s = a[r * lda + k];  // broadcast straight from memory
      acc0[r] += s * b0;
      acc1[r] += s * b1;
    }
  }
  if (!last || EPI == 0 || EPI == 3) {
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      if (EPI == 0 && last) acc0[r] = vgelu(acc0[r]), acc1[r] = vgelu(acc1[r]);
      vstore(buf + r * ldb + n0, acc0[r]);
      vstore(buf + r * ldb + n0 + VL, acc1[r]);
    }
    return;
  }
  if (EPI == 2) return gelu_out<M>(acc0, acc1, n0, N, y, ldy);
  residual_out<M>(acc0, acc1, n0, N, x, y, ldy, gamma);
}

// C(np x N) for one tile over the K range [0, K) of a longer sum (see the blocking note above):
// Wp points at the range's first k in the packed panels of a (N x ldk) weight (panel p at
// Wp + p * ldk * PW); first_part: start from bias (else from buf); last_part: the range ends the
// sum (run the epilogue; else leave the fp32 partial sums in buf). A K range split this way sums in
// the same order as one call: partial sums go through buf in fp32, exactly. T_: the storage of the
// epilogue's x (EPI 1) and y (EPI 1, 2).
template <int EPI, typename T_>
static void pgemm_part(const float* a, int64_t lda, int64_t np, int64_t K, const float* Wp, int64_t ldk, int64_t N,
                       const float* bias, float* buf, int64_t ldb, const T_* x, T_* y, int64_t ldy,
                       const float* gamma, bool first_part, bool last_part) {
  const int64_t nkb = (K + KC_MAX - 1) / KC_MAX, kcb = (K + nkb - 1) / nkb;
  for (int64_t k0 = 0; k0 < K; k0 += kcb) {
    const int64_t kc = K - k0 < kcb ? K - k0 : kcb;
    const bool first = first_part && k0 == 0, last = last_part && k0 + kc == K;
    for (int64_t n0 = 0; n0 < N; n0 += NR) {
      // the two vectors' columns: panel n / PW, offset n % PW
      const int64_t na = n0, nb = n0 + VL;
      const float* w0 = Wp + (na / PW) * ldk * PW + k0 * PW + na % PW;
      const float* w1 = Wp + (nb / PW) * ldk * PW + k0 * PW + nb % PW;
      // the next weight slice (next column of panels, else the next K block's first column)
      const int64_t nn = n0 + NR < N ? n0 + NR : 0, nk0 = n0 + NR < N ? k0 : k0 + kc;
      const float* wn = nk0 < K ? Wp + (nn / PW) * ldk * PW + nk0 * PW + nn % PW : nullptr;
      for (int64_t t0 = 0; t0 < np; t0 += MR) {
        const int m = static_cast<int>(np - t0 < MR ? np - t0 : MR);
        const float* pf = t0 + MR >= np ? wn : nullptr;
        const float* at = a + t0 * lda + k0;
        float* bt = buf + t0 * ldb;
        const T_* xt = x ? x + t0 * ldy : nullptr;
        T_* yt = y ? y + t0 * ldy : nullptr;
        switch (m) {
#define FVK_PT(MM) \
  case MM: ptile<MM, EPI>(at, lda, kc, w0, w1, first, last, bias, bt, ldb, n0, N, xt, yt, ldy, gamma, pf); break;
          FVK_PT(6) FVK_PT(5) FVK_PT(4) FVK_PT(3) FVK_PT(2) FVK_PT(1)
#undef FVK_PT
        }
      }
    }
  }
}

// C(np x N) = the whole sum over K (Wp: packed panels of a (N x K) weight); x and y share storage T_.
template <int EPI, typename T_>
static void pgemm(const float* a, int64_t lda, int64_t np, int64_t K, const float* Wp, int64_t N, const float* bias,
                  float* buf, int64_t ldb, const T_* x, T_* y, int64_t ldy, const float* gamma) {
  pgemm_part<EPI, T_>(a, lda, np, K, Wp, K, N, bias, buf, ldb, x, y, ldy, gamma, true, true);
}

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
// its VL even channels, then its VL odd ones: pair_layout in ffn.cpp) and zip_store interleaves the
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
static void dw_same_rows(const void* x, void* y, bool bf16, int64_t H, int64_t Wd, int64_t C, int64_t Kk,
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
static inline int64_t dwb_band(int64_t H) { return H <= 64 ? H : 32; }
static inline int64_t dwb_scratch(int64_t H, int64_t Wd) { return (dwb_band(H) + 6) * dwb_wp(Wd) * DB + 50 * DB; }

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
static void dwb_tiles(const void* x, void* y, bool bf16, int64_t H, int64_t Wd, int64_t C, const float* w,
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

// One tile of the ConvFFN: pixels [p0, p0 + np) of one image x (H x Wd x C):
//   d(np x C)    = depthwise KxK (BN folded) of x, pixel-major
//   hid(np x HC) = GELU(d . W1^T + b1) for one chunk of HC hidden channels at a time
//   y[p]         = x[p] + gamma * (hid . W2^T + b2)   (fc2's K ranges accumulate in `acc`)
// The hidden activation goes through in chunks of HC channels: fc1 + GELU for a chunk's channels
// (T x HC, in L2), then that chunk's share of fc2's sum into the fp32 accumulator (T x Cp), so the
// tile's hidden activation is never in cache whole (T x 4C was 0.6-1.6 MB at FastViTHD's stages 2-4
// with T = 96: more than a Zen 3 L2). Bitwise the same as fc1 over all Hd then fc2: each fc2 output
// still sums k = 0 .. Hd - 1 in order. HC is a multiple of NR on every ISA.
#ifndef FVK_HC
#define FVK_HC 256
#endif
constexpr int64_t HC = FVK_HC;
// Row strides: d C, hid hid_stride(Hd), acc Cp (C rounded up to NR so whole vectors can be stored).
// hid's row stride: the chunk width rounded up to NR, plus 16 floats. Without the 16, rows a multiple
// of 4 KB apart would put the 6 rows a micro-tile broadcasts from into the same L1 set, beside the
// weight panel slice: conflict misses in fc2's inner loop.
static inline int64_t hid_stride(int64_t Hd) { return ((Hd < HC ? Hd : HC) + NR - 1) / NR * NR + 16; }
// Scratch floats of ffn_tiles for tiles of T pixels: d (T x C), hid (T x hid_stride), acc (T x Cp).
static inline int64_t ffn_scratch(int64_t T, int64_t C, int64_t Hd) {
  return T * (C + hid_stride(Hd) + (C + NR - 1) / NR * NR);
}

// fc1 + GELU and fc2 (+ layer scale + residual) of one tile's depthwise output d (np x C, fp32):
//   hid(np x HC) = GELU(d . W1^T + b1) for one chunk of HC hidden channels at a time
//   y[t]         = x[t] + gamma * (hid . W2^T + b2)   (fc2's K ranges accumulate in `acc`, np x Cp)
// x, y: the tile's first pixel (row stride C). x null: no epilogue; fc2's finished sums are left in
// acc for the caller's (mix_tile's pixels are not one run of rows).
template <typename T_>
static void ffn_gemms(const float* d, int64_t np, int64_t C, int64_t Hd, const float* w1p, const float* b1,
                      const float* w2p, const float* b2, const float* gamma, const T_* x, T_* y, float* hid,
                      float* acc) {
  const int64_t ldh = hid_stride(Hd), Cp = (C + NR - 1) / NR * NR;
  for (int64_t h0 = 0; h0 < Hd; h0 += HC) {
    const int64_t hc = Hd - h0 < HC ? Hd - h0 : HC;
    // fc1 + GELU, hidden channels [h0, h0 + hc): panels from h0 / PW (h0 is a multiple of PW)
    pgemm_part<0, float>(d, C, np, C, w1p + (h0 / PW) * C * PW, C, hc, b1 + h0, hid, ldh, nullptr, nullptr, 0,
                         nullptr, true, true);
    // fc2's k range [h0, h0 + hc) of its Hd-long sum
    pgemm_part<1, T_>(hid, ldh, np, hc, w2p + h0 * PW, Hd, C, b2, acc, Cp, x, y, C, gamma, h0 == 0,
                      x && h0 + hc == Hd);
  }
}

// One tile of the ConvFFN: pixels [p0, p0 + np) of one image x (H x Wd x C): d(np x C) = depthwise
// KxK (BN folded) of x, pixel-major, then ffn_gemms.
template <typename T_>
static void ffn_tile(const T_* x, T_* y, int64_t H, int64_t Wd, int64_t C, int64_t Hd, int64_t Kk,
                     const float* dw_w, const float* dw_b, const float* w1p, const float* b1, const float* w2p,
                     const float* b2, const float* gamma, int64_t p0, int64_t np, float* d, float* hid, float* acc) {
  dw_rows(x, H, Wd, C, Kk, dw_w, dw_b, p0, np, d);
  ffn_gemms(d, np, C, Hd, w1p, b1, w2p, b2, gamma, x + p0 * C, y + p0 * C, hid, acc);
}

// Tiles [t_begin, t_end) of a batch: tile t covers image t / tiles_per_image, pixels from
// (t % tiles_per_image) * T. b1, b2 and gamma are zero padded to Hdp / Cp floats. x and y both fp32,
// or both bf16 (bf16). `scratch`: ffn_scratch(T, C, Hd) floats.
static void ffn_tiles(const void* x, void* y, bool bf16, int64_t H, int64_t Wd, int64_t C, int64_t Hd, int64_t Kk,
                      const float* dw_w, const float* dw_b, const float* w1p, const float* b1, const float* w2p,
                      const float* b2, const float* gamma, int64_t per_image, int64_t T, int64_t t_begin,
                      int64_t t_end, float* scratch) {
  const int64_t HW = H * Wd;
  float *d = scratch, *hid = d + C * T, *acc = hid + hid_stride(Hd) * T;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t b = t / per_image, p0 = tile_start(HW, per_image, t % per_image);
    const int64_t np = tile_start(HW, per_image, t % per_image + 1) - p0;
    const auto tile = [&](const auto* xi, auto* yi) {
      ffn_tile(xi + b * HW * C, yi + b * HW * C, H, Wd, C, Hd, Kk, dw_w, dw_b, w1p, b1, w2p, b2, gamma, p0, np, d, hid,
               acc);
    };
    if (bf16) tile(static_cast<const uint16_t*>(x), static_cast<uint16_t*>(y));
    else tile(static_cast<const float*>(x), static_cast<float*>(y));
  }
}

// ---- the RepMixer block, fused: m = dwKm(x), y = m + gamma * ConvFFN(m) ---------------------------
// A tile is a rectangle of one image (mix_rect). Its mixer output m is computed over the rectangle
// grown by the ConvFFN depthwise's padding and clipped to the image (the window) into per-thread
// scratch, so m never reaches memory: the KxK reads a tile pixel's neighbours from the window (any
// neighbour outside it lies outside the image: the zero padding, so the window is an image of its
// own to dw_rows) and the residual reads its centre. Neighbouring tiles recompute the window's
// border: for 6 x 32 tiles and a 7x7, 456 window pixels per 192, at the mixer's Km^2 = 9 multiply-
// adds per pixel and channel against the GEMMs' 8C. Each output is the same sum, in the same order,
// as repmixer_nhwc's earlier form (m through memory, then convffn_nhwc's 1-D tiles) computed it.
struct Rect {
  int64_t b, h0, h1, w0, w1;  // image b, rows [h0, h1), columns [w0, w1)
};
// Tile t of a batch cut into gh x gw rectangles per image (boundaries spread evenly), row-major.
static inline Rect mix_rect(int64_t H, int64_t Wd, int64_t gh, int64_t gw, int64_t t) {
  const int64_t i = t % (gh * gw), r = i / gw, c = i % gw;
  return {t / (gh * gw), r * H / gh, (r + 1) * H / gh, c * Wd / gw, (c + 1) * Wd / gw};
}
// The window of tile r: rows [a0, a1), columns [c0, c1) of the image (r grown by pad, clipped).
struct Win {
  int64_t a0, a1, c0, c1;
};
static inline Win mix_window(const Rect& r, int64_t H, int64_t Wd, int64_t pad) {
  return {r.h0 - pad > 0 ? r.h0 - pad : 0, r.h1 + pad < H ? r.h1 + pad : H, r.w0 - pad > 0 ? r.w0 - pad : 0,
          r.w1 + pad < Wd ? r.w1 + pad : Wd};
}
// mix_dw's packed rows for a tile tw wide: Wm pixels (whole runs of R, and the 7x7's reach).
static inline int64_t mix_wm(int64_t tw) { return (tw + DWB_R - 1) / DWB_R * DWB_R + 8; }
// Floats of one tile's window for tiles of at most th x tw pixels, then (pad 3: a 7x7) mix_dw's packed
// channel block: x's rows (th + 8 of Wm + 2 pixels), m's rows (th + 6 of Wm), the weights and biases.
static inline int64_t mix_window_floats(int64_t th, int64_t tw, int64_t C, int64_t pad) {
  return (th + 2 * pad) * (tw + 2 * pad) * C +
         (pad == 3 ? ((th + 8) * (mix_wm(tw) + 2) + (th + 6) * mix_wm(tw) + 60) * DB + 16 : 0);
}

// Steps 1-2 of a tile: m = the mixer output over the window (image x: H x Wd x C), then d (np x C) =
// the ConvFFN's depthwise of the rectangle's pixels; returns where m's rectangle pixels are for the
// residual. mix_dw and mix_residual are kept out of line, so that profiles show them apart from the
// GEMMs.
struct MView {
  const float* p;  // m at the rectangle's pixel (i, j): p + i * row + j * C
  int64_t row;
};
template <typename TX>
__attribute__((noinline)) static MView mix_dw(const TX* x, int64_t H, int64_t Wd, int64_t C, int64_t Km,
                                              const float* mix_w, const float* mix_b, int64_t Kk, const float* dw_w,
                                              const float* dw_b, const Rect& r, const Win& w, float* mw, float* d) {
  const int64_t ww = w.c1 - w.c0, wh = w.a1 - w.a0, tw = r.w1 - r.w0, th = r.h1 - r.h0;
  if (Km != 3 || Kk != 7) {  // the window's m pixel-major into mw (dw_rows), then the depthwise from it
    for (int64_t a = w.a0; a < w.a1; ++a)
      dw_rows(x, H, Wd, C, Km, mix_w, mix_b, a * Wd + w.c0, ww, mw + (a - w.a0) * ww * C);
    for (int64_t h = r.h0; h < r.h1; ++h)
      dw_rows(static_cast<const float*>(mw), wh, ww, C, Kk, dw_w, dw_b, (h - w.a0) * ww + (r.w0 - w.c0), tw,
              d + (h - r.h0) * tw * C);
    return {mw + ((r.h0 - w.a0) * ww + (r.w0 - w.c0)) * C, ww * C};
  }
  // Km = 3, Kk = 7 (FastViTHD's RepMixer): per block of DB channels (dwb_tiles' packed layout), x over
  // the rectangle grown by 4 into xb (zero outside the image), the 3x3 of it over the rectangle
  // grown by 3 into mb (rows and columns outside the image then zeroed: the 7x7's padding is zeros
  // of m), the rectangle's m into mc (np x C, for the residual), and the 7x7 of mb into d. Each
  // input pixel line is read once per tile, and both convs slide over contiguous rows without
  // border tests. On the dw_rows path the 3x3 runs on x in place (runs of 4 pixels) and the 7x7 on
  // the pixel-major window: perf on the Zen 3's stage-0 op put 16% of the op's kernel samples in
  // the two; here the copies, both convs and the zeroing take 13% (bench.ab: 0.92x on that op).
  // Same sums in the same order as the dw_rows path: bitwise equal up to the sign of zero.
  const int64_t Wm = mix_wm(tw), Wx = Wm + 2;
  float* mc = mw;  // np x C: the window's pixel-major m is not needed on this path
  float* xb = mw + ((th + 6) * (tw + 6) * C + 15) / 16 * 16;  // after mix_window_floats' window part
  float* mb = xb + (th + 8) * Wx * DB;
  float* w3 = mb + (th + 6) * Wm * DB;
  float* b3 = w3 + 9 * DB;
  float* w7 = b3 + DB;
  float* b7 = w7 + 49 * DB;
  const int64_t ax = r.h0 - 4, ux = r.w0 - 4;  // xb's first row and column in the image
  const int64_t j0 = -ux > 0 ? -ux : 0, j1 = Wd - ux < Wx ? Wd - ux : Wx;  // xb's columns in the image
  // mb's columns in the image: mb column j is xb column j + 1
  const int64_t m0 = j0 > 1 ? j0 - 1 : 0, m1 = j1 - 1 < Wm ? j1 - 1 : Wm;
  for (int64_t c0 = 0; c0 < C; c0 += DB) {
    const int64_t nc = C - c0 < DB ? C - c0 : DB;
    dwb_weights(mix_w, mix_b, C, c0, nc, w3, b3, 9);
    dwb_weights(dw_w, dw_b, C, c0, nc, w7, b7, 49);
    for (int64_t i = 0; i < th + 8; ++i) {
      const int64_t a = ax + i;
      const bool in = a >= 0 && a < H;
      dwb_pack_row(x + ((in ? a : 0) * Wd + ux + j0) * C + c0, C, nc, j0, in ? j1 : 0, Wx, xb + i * Wx * DB);
    }
    for (int64_t i = 0; i < th + 6; ++i) {
      float* dst = mb + i * Wm * DB;
      const int64_t a = ax + 1 + i;  // m's image row
      if (a < 0 || a >= H) {
        for (int64_t q = 0; q < Wm * DB; q += VL) vstore(dst + q, vf{});
        continue;
      }
      dwb_row<3>(xb, Wx, Wm, w3, b3, false, i, dst, DB, DB);
      for (int64_t q = 0; q < m0 * DB; q += VL) vstore(dst + q, vf{});
      for (int64_t q = m1 * DB; q < Wm * DB; q += VL) vstore(dst + q, vf{});
      if (i >= 3 && i < th + 3) {
        float* mrow = mc + (i - 3) * tw * C + c0;
        const float* m = dst + 3 * DB;
        if (nc == DB) {
          for (int64_t j = 0; j < tw; ++j)
#pragma GCC unroll 4
            for (int64_t q = 0; q < DB; q += VL) vstore(mrow + j * C + q, vload(m + j * DB + q));
        } else {
          for (int64_t j = 0; j < tw; ++j)
            for (int64_t q = 0; q < nc; ++q) mrow[j * C + q] = m[j * DB + q];
        }
      }
    }
    for (int64_t h = 0; h < th; ++h) dwb_row<7>(mb, Wm, tw, w7, b7, false, h, d + h * tw * C + c0, C, nc);
  }
  return {mc, tw * C};
}

// Step 4: y at the rectangle's pixels (image row stride Wd * C) = m + gamma * acc, residual_out's
// arithmetic (whole 2-vector columns, then the product rounded before the add), m from the window.
template <typename TY>
__attribute__((noinline)) static void mix_residual(MView mv, const Rect& r, const float* acc, int64_t C,
                                                   const float* gamma, TY* y, int64_t Wd) {
  const int64_t tw = r.w1 - r.w0, Cp = (C + NR - 1) / NR * NR, Cv = C / NR * NR;
  for (int64_t h = r.h0; h < r.h1; ++h)
    for (int64_t j = 0; j < tw; ++j) {
      const float* m = mv.p + (h - r.h0) * mv.row + j * C;
      const float* s = acc + ((h - r.h0) * tw + j) * Cp;
      TY* o = y + (h * Wd + r.w0 + j) * C;
      for (int64_t c = 0; c < Cv; c += VL) vst(o + c, vld(m + c) + vload(gamma + c) * vload(s + c));
      if (Cv < C) {
        alignas(64) float g[NR];
        vstore(g, vload(gamma + Cv) * vload(s + Cv));
        vstore(g + VL, vload(gamma + Cv + VL) * vload(s + Cv + VL));
        for (int64_t c = Cv; c < C; ++c) st(o, c, m[c] + g[c - Cv]);
      }
    }
}

// Tiles [t_begin, t_end) of a batch (mix_rect's gh x gw per image, of at most th x tw pixels): x and y
// (B, H, Wd, C), both fp32 or both bf16 (fp32 compute). `scratch`: mix_scratch floats.
static inline int64_t mix_scratch(int64_t th, int64_t tw, int64_t C, int64_t Hd, int64_t Kk) {
  return mix_window_floats(th, tw, C, Kk / 2) + ffn_scratch(th * tw, C, Hd);
}
static void mix_tiles(const void* x, void* y, bool bf16, int64_t H, int64_t Wd, int64_t C, int64_t Hd, int64_t Km,
                      const float* mix_w, const float* mix_b, int64_t Kk, const float* dw_w, const float* dw_b,
                      const float* w1p, const float* b1, const float* w2p, const float* b2, const float* gamma,
                      int64_t gh, int64_t gw, int64_t th, int64_t tw, int64_t t_begin, int64_t t_end, float* scratch) {
  float *mw = scratch, *d = mw + mix_window_floats(th, tw, C, Kk / 2), *hid = d + th * tw * C,
        *acc = hid + hid_stride(Hd) * th * tw;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const Rect r = mix_rect(H, Wd, gh, gw, t);
    const Win w = mix_window(r, H, Wd, Kk / 2);
    const int64_t np = (r.h1 - r.h0) * (r.w1 - r.w0), img = r.b * H * Wd * C;
    const auto tile = [&](const auto* xi, auto* yi) {
      const MView mv = mix_dw(xi + img, H, Wd, C, Km, mix_w, mix_b, Kk, dw_w, dw_b, r, w, mw, d);
      ffn_gemms<float>(d, np, C, Hd, w1p, b1, w2p, b2, gamma, nullptr, nullptr, hid, acc);
      mix_residual(mv, r, acc, C, gamma, yi + img, Wd);
    };
    if (bf16) tile(static_cast<const uint16_t*>(x), static_cast<uint16_t*>(y));
    else tile(static_cast<const float*>(x), static_cast<float*>(y));
  }
}

// ---- stem: GELU(conv3x3 s2, Cin -> C) -> GELU(dw3x3 s2) -> GELU(1x1 C -> C), fused --------------
// A tile is a block of RB x SW final-grid pixels (rows oh0 .., columns ow0 ..; smaller at the grid's
// edges), walked one final row at a time. Final row oh reads intermediate rows 2 oh - 1 .. 2 oh + 1,
// (2 sw + 1) intermediate pixels of each; the next final row shares the last of them, so a ring of
// three intermediate rows holds them and each final row computes two new ones (the block's first,
// three). An intermediate row: the 3 x 3 x Cin input patches of its pixels go into rows of K0 = 9 Cin
// floats (zero outside the image) and the conv runs on pgemm (packed weight, GELU epilogue: fc1's).
// Neighbouring blocks share one intermediate row / column, so each intermediate value is computed
// (2 RB + 1)(2 SW + 1) / (4 RB SW) times on average (1.03 at 32 x 32; the 4 x 32 blocks used before,
// which held all their intermediate rows at once, 1.14), and the full-resolution intermediate
// (C x H/2 x W/2) never reaches memory. Then the dw3x3 s2 + GELU of the final row's pixels, and the
// 1x1 on pgemm (GELU epilogue into y).
//   w0p: pack_linear of w0 as (C, 3, 3, Cin); b0, w1 (3, 3, Cp), b1 zero padded to Cp (>= NR-rounded C).
// scratch per block: stem_scratch(SW, Cin, Cp) floats (im, the ring, d, and the 1x1's accumulator
// for one final row, used when C > KC_MAX).
static inline int64_t stem_scratch(int64_t SW, int64_t Cin, int64_t Cp) {
  const int64_t mc = 2 * SW + 1;
  return mc * (9 * Cin + 3 * Cp) + 2 * SW * Cp;
}

// x: one image, element (h, w, ci) at x[h * sH + w * sW + ci * sC] (any strides: the NCHW pixels'
// permuted view is read in place, without a copy to NHWC).
template <typename T_>
static void stem_block(const T_* x, int64_t sH, int64_t sW, int64_t sC, T_* y, int64_t H, int64_t Wd, int64_t Cin,
                       int64_t C, int64_t Cp,
                       const float* w0p, const float* b0, const float* w1, const float* b1, const float* w2p,
                       const float* b2, int64_t H1, int64_t W1, int64_t W2, int64_t oh0, int64_t rb, int64_t ow0,
                       int64_t sw, int64_t SW, float* scratch) {
  const int64_t K0 = 9 * Cin, Cv = (C + NR - 1) / NR * NR;  // a ring row's columns [0, Cv) are written by pgemm
  const int64_t mc = 2 * sw + 1, iw0 = 2 * ow0 - 1, mrow = (2 * SW + 1) * Cp;
  float *im = scratch, *ring = im + (2 * SW + 1) * K0, *d = ring + 3 * mrow, *buf = d + SW * Cp;
  const auto slot = [&](int64_t ih1) { return ring + (ih1 + 3) % 3 * mrow; };  // ih1 >= -1
  const auto zero_px = [&](float* p) {  // an intermediate pixel outside the grid: the dw's zero padding
    for (int64_t c = 0; c < Cv; c += VL) vstore(p + c, vset(0.f));
  };
  // Intermediate row ih1 (pixels iw0 .. iw0 + mc - 1) into its ring slot, zero outside the
  // intermediate grid (the dw's padding). im2col first: im row v holds the 3 x 3 x Cin patch at
  // (2 ih1 - 1 .., 2 iw1 - 1 ..), iw1 = iw0 + v, zero outside the image; filled one input row segment
  // at a time (fixed th and ci, all v): the loads walk along w, contiguous in the NCHW pixels' view.
  const auto inter_row = [&](int64_t ih1) {
    float* mid = slot(ih1);
    if (ih1 < 0 || ih1 >= H1) {
      for (int64_t v = 0; v < mc; ++v) zero_px(mid + v * Cp);
      return;
    }
    for (int64_t th = 0; th < 3; ++th) {
      const int64_t ih = 2 * ih1 - 1 + th;
      const bool row_ok = ih >= 0 && ih < H;
      for (int64_t ci = 0; ci < Cin; ++ci) {
        float* o = im + th * 3 * Cin + ci;
        if (!row_ok) {
          for (int64_t v = 0; v < mc; ++v)
            for (int64_t tw = 0; tw < 3; ++tw) o[v * K0 + tw * Cin] = 0.f;
          continue;
        }
        const T_* seg = x + ih * sH + ci * sC;
        for (int64_t v = 0; v < mc; ++v) {
          const int64_t iw1 = iw0 + v, iw = 2 * iw1 - 1;
          if (iw1 >= 1 && iw + 2 < Wd) {  // the patch's three columns inside (so is the pixel)
            o[v * K0] = ld(seg, iw * sW);
            o[v * K0 + Cin] = ld(seg, (iw + 1) * sW);
            o[v * K0 + 2 * Cin] = ld(seg, (iw + 2) * sW);
            continue;
          }
          const bool col_ok = iw1 >= 0 && iw1 < W1;
          for (int64_t tw = 0; tw < 3; ++tw)
            o[v * K0 + tw * Cin] = col_ok && iw + tw >= 0 && iw + tw < Wd ? ld(seg, (iw + tw) * sW) : 0.f;
        }
      }
    }
    pgemm<0, T_>(im, K0, mc, K0, w0p, C, b0, mid, Cp, nullptr, nullptr, 0, nullptr);
    for (int64_t v = 0; v < mc; ++v)  // left / right of the grid
      if (iw0 + v < 0 || iw0 + v >= W1) zero_px(mid + v * Cp);
  };
  // dw3x3 s2 + GELU of final pixel j of the row whose intermediate rows are m[0 .. 2], U channel vectors
  // from c: it reads their columns 2j .. 2j + 2. U independent chains (4, else 2: Cv is a multiple of
  // 2 VL) keep the FMA and the GELU's division latencies overlapped; one vector at a time, perf put a
  // quarter of this loop's samples on the division and the multiply waiting for it.
  const auto dw = [&](auto u_, const float* const* m, int64_t j, int64_t c) {
    constexpr int U = decltype(u_)::value;
    vf acc[U];
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) acc[u] = vload(b1 + c + u * VL);
    for (int64_t kh = 0; kh < 3; ++kh)
      for (int64_t kw = 0; kw < 3; ++kw) {
        const float *mp = m[kh] + (2 * j + kw) * Cp + c, *w = w1 + (kh * 3 + kw) * Cp + c;
#pragma GCC unroll 4
        for (int u = 0; u < U; ++u) acc[u] += vload(mp + u * VL) * vload(w + u * VL);
      }
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) vstore(d + j * Cp + c + u * VL, vgelu(acc[u]));
  };
  inter_row(2 * oh0 - 1);
  for (int64_t i = 0; i < rb; ++i) {
    const int64_t r0 = 2 * (oh0 + i) - 1;  // the row's first intermediate row
    inter_row(r0 + 1);
    inter_row(r0 + 2);
    const float* m[3] = {slot(r0), slot(r0 + 1), slot(r0 + 2)};
    for (int64_t j = 0; j < sw; ++j) {
      int64_t c = 0;
      for (; c + 4 * VL <= Cv; c += 4 * VL) dw(std::integral_constant<int, 4>{}, m, j, c);
      for (; c < Cv; c += 2 * VL) dw(std::integral_constant<int, 2>{}, m, j, c);
    }
    pgemm<2, T_>(d, Cp, sw, C, w2p, C, b2, buf, Cp, nullptr, y + ((oh0 + i) * W2 + ow0) * C, C, nullptr);
  }
}

// Blocks [t_begin, t_end) of a batch of images (H x Wd x Cin; element (b, h, w, ci) at b * xs[0] + h *
// xs[1] + w * xs[2] + ci * xs[3]) -> y (H2 x W2 x C, contiguous): per image, ceil(H2 / RB) x ceil(W2 /
// SW) blocks in row-major order. b0, w1, b1 and b2 zero padded to Cp floats per tap.
static void stem_tiles(const void* x, const int64_t* xs, void* y, bool bf16, int64_t H, int64_t Wd, int64_t Cin,
                       int64_t C,
                       int64_t Cp, const float* w0p, const float* b0, const float* w1, const float* b1, const float* w2p,
                       const float* b2, int64_t RB, int64_t SW, int64_t t_begin, int64_t t_end, float* scratch) {
  const int64_t H1 = (H - 1) / 2 + 1, W1 = (Wd - 1) / 2 + 1, H2 = (H1 - 1) / 2 + 1, W2 = (W1 - 1) / 2 + 1;
  const int64_t nbh = (H2 + RB - 1) / RB, nbw = (W2 + SW - 1) / SW, per_image = nbh * nbw;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t b = t / per_image, bh = t % per_image / nbw, bw = t % nbw;
    const int64_t oh0 = bh * RB, ow0 = bw * SW;
    const int64_t rb = H2 - oh0 < RB ? H2 - oh0 : RB, sw = W2 - ow0 < SW ? W2 - ow0 : SW;
    if (bf16) {
      stem_block(static_cast<const uint16_t*>(x) + b * xs[0], xs[1], xs[2], xs[3],
                 static_cast<uint16_t*>(y) + b * H2 * W2 * C, H, Wd, Cin, C, Cp, w0p, b0, w1, b1, w2p, b2, H1, W1, W2,
                 oh0, rb, ow0, sw, SW, scratch);
    } else {
      stem_block(static_cast<const float*>(x) + b * xs[0], xs[1], xs[2], xs[3], static_cast<float*>(y) + b * H2 * W2 * C,
                 H, Wd, Cin, C, Cp, w0p, b0, w1, b1, w2p, b2, H1, W1, W2, oh0, rb, ow0, sw, SW, scratch);
    }
  }
}

// ---- patch_embed: GELU(dw KxK stride s, channel multiplier M) -> GELU(1x1), fused ---------------
// Per tile of output pixels: the grouped conv output (Co = M * Cin channels, GELU) goes pixel-major
// into the tile, then the 1x1 runs on pgemm (packed weights, GELU epilogue into y); the Co-wide
// intermediate never leaves the tile. dw_w: (K, K, Co).
// Depthwise KxK, stride s, padding K / 2, channel multiplier M = Co / Cin (BN folded) of one output
// pixel (oh, ow): out[c] = b[c] + sum over the window of x[.][c / M] * w[.][c], GELU'd if `gelu`,
// for channels [c0, Co) (c0 a multiple of 2 VL, or past the vectorised ones).
// M = 2 (patch_embed, conv_exp) runs on duplicated half vectors; other multipliers and the channels
// past the vectorised ones are scalar.
template <typename T_>
static inline void dwm_pixel(const T_* x, int64_t H, int64_t Wd, int64_t Cin, int64_t Co, int64_t Kk, int64_t s,
                             const float* dw_w, const float* dw_b, int64_t oh, int64_t ow, bool gelu, float* out,
                             int64_t c0 = 0) {
  const int64_t M = Co / Cin, pad = Kk / 2, Cv = Co / VL * VL;
  const int64_t kh0 = pad - oh * s > 0 ? pad - oh * s : 0, kh1 = H + pad - oh * s < Kk ? H + pad - oh * s : Kk;
  const int64_t kw0 = pad - ow * s > 0 ? pad - ow * s : 0, kw1 = Wd + pad - ow * s < Kk ? Wd + pad - ow * s : Kk;
  int64_t c = c0;
  if (M == 2) {  // output channels 2ci, 2ci + 1 read input channel ci: duplicated half vectors
    for (; c + 2 * VL <= Cv; c += 2 * VL) {
      vf a0 = vload(dw_b + c), a1 = vload(dw_b + c + VL);
      for (int64_t kh = kh0; kh < kh1; ++kh) {
        const T_* xr = x + ((oh * s - pad + kh) * Wd + (ow * s - pad)) * Cin + c / 2;
        const float* wr = dw_w + kh * Kk * Co + c;
        for (int64_t kw = kw0; kw < kw1; ++kw) {
          a0 += dup2(xr + kw * Cin) * vload(wr + kw * Co);
          a1 += dup2(xr + kw * Cin + VL / 2) * vload(wr + kw * Co + VL);
        }
      }
      if (gelu) a0 = vgelu(a0), a1 = vgelu(a1);
      vstore(out + c, a0), vstore(out + c + VL, a1);
    }
  }
  for (; c < Co; ++c) {
    float a = dw_b[c];
    for (int64_t kh = kh0; kh < kh1; ++kh)
      for (int64_t kw = kw0; kw < kw1; ++kw)
        a += ld(x, ((oh * s - pad + kh) * Wd + (ow * s - pad + kw)) * Cin + c / M) * dw_w[(kh * Kk + kw) * Co + c];
    out[c] = gelu ? ::fastvlm::gelu_scalar(a) : a;
  }
}

// Whether dwm_rows runs a shape on the sliding window (so patch_embed_nhwc makes the pair layout).
static inline bool dwm_slides(int64_t Kk, int64_t s, int64_t Cin, int64_t Co) { return Kk == 7 && s == 2 && Co == 2 * Cin; }

// The grouped dw + GELU of output pixels [p0, p0 + np) (output grid Wo wide), pixel-major into d (np x Co).
// w2 / b2: dw_w / dw_b in pair layout (dw_slide's PAIR form, M = 2 on AVX-512), or null.
template <typename T_>
static void dwm_rows(const T_* x, int64_t H, int64_t Wd, int64_t Cin, int64_t Co, int64_t Kk, int64_t s,
                     const float* dw_w, const float* dw_b, const float* w2, const float* b2, int64_t Wo, int64_t p0,
                     int64_t np, float* d) {
  if (dwm_slides(Kk, s, Cin, Co)) {  // FastViTHD's patch_embed: the sliding window, 6 outputs
    dw_slide_rows<7, 6, 2, 2, true>(x, H, Wd, Cin, Co, dw_w, dw_b, w2, b2, Wo, p0, np, d,
                                    [&](int64_t oh, int64_t ow, int64_t c0, float* out) {
                                      dwm_pixel(x, H, Wd, Cin, Co, Kk, s, dw_w, dw_b, oh, ow, true, out, c0);
                                    });
  } else {
    for (int64_t j = 0; j < np; ++j) {
      const int64_t p = p0 + j;
      dwm_pixel(x, H, Wd, Cin, Co, Kk, s, dw_w, dw_b, p / Wo, p % Wo, true, d + j * Co);
    }
  }
}

template <typename T_>
static void dwpw_tile(const T_* x, T_* y, int64_t H, int64_t Wd, int64_t Cin, int64_t Co, int64_t Kk, int64_t s,
                      const float* dw_w, const float* dw_b, const float* w2, const float* b2, const float* pw_p,
                      const float* pw_b, int64_t Wo, int64_t p0, int64_t np, float* d, float* buf) {
  const int64_t Cop = (Co + NR - 1) / NR * NR;
  dwm_rows(x, H, Wd, Cin, Co, Kk, s, dw_w, dw_b, w2, b2, Wo, p0, np, d);
  pgemm<2, T_>(d, Co, np, Co, pw_p, Co, pw_b, buf, Cop, nullptr, y + p0 * Co, Co, nullptr);
}

// Tiles [t_begin, t_end) of a batch; pw_b padded to Cop floats. `scratch`: T * (Co + Cop) floats.
static void dwpw_tiles(const void* x, void* y, bool bf16, int64_t H, int64_t Wd, int64_t Cin, int64_t Co, int64_t Kk,
                       int64_t s, const float* dw_w, const float* dw_b, const float* w2, const float* b2,
                       const float* pw_p, const float* pw_b,
                       int64_t per_image, int64_t T, int64_t t_begin, int64_t t_end, float* scratch) {
  const int64_t pad = Kk / 2, Ho = (H + 2 * pad - Kk) / s + 1, Wo = (Wd + 2 * pad - Kk) / s + 1;
  const int64_t HWo = Ho * Wo;
  float *d = scratch, *buf = d + Co * T;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t b = t / per_image, p0 = tile_start(HWo, per_image, t % per_image);
    const int64_t np = tile_start(HWo, per_image, t % per_image + 1) - p0;
    if (bf16) {
      dwpw_tile(static_cast<const uint16_t*>(x) + b * H * Wd * Cin, static_cast<uint16_t*>(y) + b * HWo * Co, H, Wd,
                Cin, Co, Kk, s, dw_w, dw_b, w2, b2, pw_p, pw_b, Wo, p0, np, d, buf);
    } else {
      dwpw_tile(static_cast<const float*>(x) + b * H * Wd * Cin, static_cast<float*>(y) + b * HWo * Co, H, Wd, Cin,
                Co, Kk, s, dw_w, dw_b, w2, b2, pw_p, pw_b, Wo, p0, np, d, buf);
    }
  }
}

// ---- conv_exp (dwconv.cpp's conv_exp_nhwc): the two passes over the output, vectorised ----------
// Pass 1, output rows [r_begin, r_end) of a batch (row r: image r / H): z = dw KxK, stride 1,
// padding K / 2, multiplier Co / Cin (fp32, the row's pixels in order) and the row's per-channel
// sums (summed over the row's pixels in order: thread-count independent).
static void convexp_rows(const void* x, bool bf16, int64_t H, int64_t Wd, int64_t Cin, int64_t Co, int64_t Kk,
                         const float* w, const float* b, float* z, float* rowsums, int64_t r_begin, int64_t r_end,
                         float*) {
  const int64_t Cv = Co / VL * VL;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const int64_t bi = r / H, oh = r % H;
    float* zr = z + r * Wd * Co;
    auto row = [&](auto xi) {
      if (Kk == 3 && Co == 2 * Cin) {  // FastViTHD's conv_exp: the sliding window, 8 outputs per run
        // (dw_slide's PAIR form measured 1.03x slower here, 3x3 stride 1: not used)
        dw_slide_rows<3, 8, 1, 2, false>(xi, H, Wd, Cin, Co, w, b, nullptr, nullptr, Wd, oh * Wd, Wd, zr,
                                         [&](int64_t h, int64_t ow, int64_t c0, float* out) {
                                           dwm_pixel(xi, H, Wd, Cin, Co, Kk, 1, w, b, h, ow, false, out, c0);
                                         });
      } else {
        for (int64_t ow = 0; ow < Wd; ++ow) dwm_pixel(xi, H, Wd, Cin, Co, Kk, 1, w, b, oh, ow, false, zr + ow * Co);
      }
    };
    if (bf16) row(static_cast<const uint16_t*>(x) + bi * H * Wd * Cin);
    else row(static_cast<const float*>(x) + bi * H * Wd * Cin);
    float* rs = rowsums + r * Co;  // pixel-outer: streams z's row (a channel-outer sum was 12 KB strides)
    for (int64_t c = 0; c < Co; ++c) rs[c] = 0.f;
    for (int64_t ow = 0; ow < Wd; ++ow) {
      const float* zp = zr + ow * Co;
      for (int64_t c = 0; c < Cv; c += VL) vstore(rs + c, vload(rs + c) + vload(zp + c));
      for (int64_t c = Cv; c < Co; ++c) rs[c] += zp[c];
    }
  }
}

// The SE's two small GEMVs, rows [i_begin, i_end): y[i] = act(bias[i] + W[i] . v), W rows of n
// floats; act 0: ReLU, 1: sigmoid. Four vector accumulators, then the lanes in a fixed order: each
// row is summed the same way whatever thread computes it.
static void gemv_rows(const float* W, const float* v, const float* bias, int64_t n, int act, float* y,
                      int64_t i_begin, int64_t i_end, float*) {
  const int64_t n4 = n / (4 * VL) * (4 * VL), nv = n / VL * VL;
  for (int64_t i = i_begin; i < i_end; ++i) {
    const float* w = W + i * n;
    vf a0 = vset(0.f), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k < n4; k += 4 * VL) {
      a0 += vload(w + k) * vload(v + k);
      a1 += vload(w + k + VL) * vload(v + k + VL);
      a2 += vload(w + k + 2 * VL) * vload(v + k + 2 * VL);
      a3 += vload(w + k + 3 * VL) * vload(v + k + 3 * VL);
    }
    for (; k < nv; k += VL) a0 += vload(w + k) * vload(v + k);
    const vf a = (a0 + a1) + (a2 + a3);
    float acc = bias[i];
    for (int l = 0; l < VL; ++l) acc += a[l];
    for (; k < n; ++k) acc += w[k] * v[k];
    y[i] = act == 0 ? (acc > 0.f ? acc : 0.f) : 1.f / (1.f + vexp(vset(-acc))[0]);  // vexp clamps to [-87, 88]
  }
}

// Pass 2, rows [r_begin, r_end): y = GELU(z * s[image]) in y's dtype (y may be z itself, fp32).
static void scale_gelu_rows(const float* z, const float* sc, void* y, bool bf16, int64_t H, int64_t Wd, int64_t Co,
                            int64_t r_begin, int64_t r_end, float*) {
  const int64_t Cv = Co / VL * VL;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const float* s = sc + (r / H) * Co;
    for (int64_t ow = 0; ow < Wd; ++ow) {
      const int64_t o = (r * Wd + ow) * Co;
      for (int64_t c = 0; c < Cv; c += VL) {
        const vf v = vgelu(vload(z + o + c) * vload(s + c));
        if (bf16) vst(static_cast<uint16_t*>(y) + o + c, v);
        else vstore(static_cast<float*>(y) + o + c, v);
      }
      for (int64_t c = Cv; c < Co; ++c) {
        const float v = ::fastvlm::gelu_scalar(z[o + c] * s[c]);
        if (bf16) st(static_cast<uint16_t*>(y), o + c, v);
        else static_cast<float*>(y)[o + c] = v;
      }
    }
  }
}

// ---- the multiply-add peak of this ISA (bench/: the roofline floors; fastvlm_C::peak_gflops) -----
// `iters` rounds of NCH independent chains acc = acc * m + c on VL floats (one FMA each on AVX2 /
// AVX-512, a multiply and an add on SSE): more chains than an FMA's latency times its issue width on
// the x86 cores this project targets (4 cycles x 2 pipes), so the loop runs at the issue rate, with
// no memory traffic. 2 VL flops per chain step. Returns a value that depends on every result.
constexpr int NCH = 12;
constexpr int CHAIN_FLOPS = 2 * VL * NCH;  // per iteration of fma_chains
template <int N>
static inline float sum_chains(const vf* a) {  // all lanes of a[0 .. N)
  vf s = a[0];
#pragma GCC unroll 16
  for (int i = 1; i < N; ++i) s += a[i];
  float r = 0.f;
  for (int l = 0; l < VL; ++l) r += s[l];
  return r;
}
static float fma_chains(int64_t iters, float seed) {
  vf a[NCH];
#pragma GCC unroll 12
  for (int i = 0; i < NCH; ++i) a[i] = vset(seed * static_cast<float>(i + 1));
  const vf m = vset(0.99999994f), c = vset(1e-7f);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < NCH; ++i) a[i] = a[i] * m + c;
  }
  return sum_chains<NCH>(a);
}
