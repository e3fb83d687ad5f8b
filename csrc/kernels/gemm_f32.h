// The fp32 GEMM drivers, on the same 6 x 2-vector register tile (12 accumulators, the AVX2 maximum
// with one broadcast and two loads live):
//  - gemm_s, channel-major: out(N x T) = W(N x K) . in(K x T), broadcasting weights from their
//    canonical (Cout, Cin) rows and loading vectors of pixels; attention's S = K Q^T and P V
//    products (attention.h) use it, queries along the vector;
//  - pgemm, pixel-major: C(T x N) = A(T x K) . W^T on weights packed once into 16-channel panels
//    (csrc/packed.h), broadcasting activations; the ConvFFN, the stem's conv3x3 and 1x1, patch_embed
//    and attention's qkv and proj use it (no transposes in the tile, the epilogue writes NHWC rows).

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

// ---- ConvFFN: pixel-major GEMMs on pre-packed weight panels --------------------------------------
// The FFN's two 1x1 convs run pixel-major, C(T x N) = A(T x K) . W^T, the classic GEMM orientation:
// the micro-kernel broadcasts one activation A[t][k] and multiplies it by NR consecutive output
// channels of a weight panel. Activations then stay in their natural NHWC layout (the depthwise
// output feeds fc1 and the residual epilogue writes y rows directly, with no transposes), and the
// weights are pre-packed once (pack_linear, at accelerate() time; the format is csrc/packed.h's)
// into panels of 16 output channels: panel p holds W[16p .. 16p+15][k] at [p][k][0..15], zero
// padded, the panel count rounded up to even so a 32-channel AVX-512 micro-tile never reads past it.
//
// Blocking (per tile of T pixels): K in blocks of at most KC_MAX; for each block, for each NR-wide
// column of panels (KC x NR floats, kept in L1), for each MR-row group of pixels (the T x KC
// activation block, kept in L2). Every weight is read from L3/memory once per tile. The ConvFFN
// runs its hidden dimension in chunks of HC channels (ffn_tile), each a K range of fc2 (pgemm_part).
constexpr int PW = static_cast<int>(::fastvlm::packed::kPanel);  // panel width (csrc/packed.h)
#ifndef FVK_KC_MAX
#define FVK_KC_MAX 256
#endif
constexpr int64_t KC_MAX = FVK_KC_MAX;  // K block: a KC x NR weight panel slice is 16 KB (AVX2), 32 KB (AVX-512)

// First pixel of tile i of the n tiles of an HW-pixel image (i = n gives HW): whole MR-pixel
// groups spread evenly, so tile sizes differ by at most one group (n <= ceil(HW / MR)).
static inline int64_t tile_start(int64_t HW, int64_t n, int64_t i) {
  const int64_t p = i * ((HW + MR - 1) / MR) / n * MR;
  return p < HW ? p : HW;
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
// y[t][n] = GELU(acc[t][n]), n < N (storage T_). BF16_GELU: vgelu_bf16 (the bf16-pair kernels, whose
// y is bf16), else the exact vgelu.
template <int M, bool BF16_GELU = false, typename T_>
__attribute__((always_inline)) static inline void gelu_out(vf* acc0, vf* acc1, int64_t n0, int64_t N, T_* y,
                                                           int64_t ldy) {
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r)
    acc0[r] = BF16_GELU ? vgelu_bf16(acc0[r]) : vgelu(acc0[r]), acc1[r] = BF16_GELU ? vgelu_bf16(acc1[r]) : vgelu(acc1[r]);
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
