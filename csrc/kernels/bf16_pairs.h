// The bf16 GEMMs on AVX512_BF16 (the ConvFFN's fc1 / fc2, attention's qkv, S, P V and proj, patch_embed's
// 1x1): they multiply bf16 pairs into fp32 accumulators
// (vdpbf16ps: acc[i] += a[2i+1] b[2i+1] + a[2i] b[2i], 16 fp32 lanes per instruction, twice the
// multiply-adds of an fp32 FMA), on weights packed once by pack_linear_bf16. Included by
// csrc/isa/avx512_bf16.cpp and amx.cpp after kernels.h, in their namespaces only (FVK_VL = 16), which defines
//   vf fvk_dpbf16(vf acc, uint32_t a2, vf w): acc + the products of the bf16 pair a2 (low half:
//   the even k) with the 16 bf16 pairs of w (the bits of a vf), high (odd) products added first.
//
// Numerics: bf16 storage, fp32 accumulation, like the fp32-compute bf16 path (the fp32 kernels), except
// that the GEMM operands are bf16: the depthwise output d and the GELU output (fc2's input), and in
// attention and patch_embed the operands named there, are rounded to bf16 (nearest even) before
// they are multiplied, as eager PyTorch in bf16 rounds every layer's output. The weights of a bf16
// model are bf16 already, so packing them loses nothing. A GELU whose output is rounded to bf16
// (fc1's, patch_embed's) is gelu.h's piecewise bf16-output form (vec.h's vgelu_bf16: |error| <= 2.9e-6
// max(1, |x|), against the rounding's 2e-3 relative), not the exact one the fp32 kernels use.
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

#ifndef FVK_KP_MAX
#define FVK_KP_MAX 256
#endif
constexpr int64_t KP_MAX = FVK_KP_MAX;  // pairs per K block: a block's 2-panel weight slice is 32 KB, as fp32's
// Pixels per micro-tile: 8 x 2 = 16 accumulators (+ 2 weight vectors and a broadcast: 19 of the 32
// zmm registers). vdpbf16ps has a latency of several cycles and this project's Zen 5 issues two per
// cycle (~900 GFLOP/s on 2 threads), so the 12 independent sums of the fp32 6 x 2
// tile would leave no slack. (Chosen from that arithmetic; not yet timed on an AVX512_BF16 CPU.)
constexpr int MRD = 8;

// One MRD x NR tile (M <= MRD pixels, 2 vectors = 2 panels of channels) of a K block of kp pairs.
//   a: bf16 pixel rows (pair j of row t at a + t * lda + 2 j); w0, w1: the two panels at the block's
//   first pair (32 bf16 per pair). first: start from bias (else from the fp32 partial sums in buf);
//   last: run the epilogue (else store the partial sums to buf).
//   EPI 0 (fc1): last block writes h[t][n] = bf16(GELU(acc)) (row stride ldh).
//   (GELU: vgelu_bf16, gelu.h's form for a result rounded to bf16, in EPI 0 and 2.)
//   EPI 1 (fc2, attention's proj): last block writes y[t][n] = x[t][n] + gamma[n] * acc, n < N
//   (x and y bf16).
//   EPI 2 (patch_embed's 1x1): last block writes y[t][n] = bf16(GELU(acc)), n < N (row stride ldy).
//   EPI 3 (attention's qkv, S, P V): buf is the output, acc as is.
template <int M, int EPI>
static inline void ptile_dp(const uint16_t* __restrict__ a, int64_t lda, int64_t kp, const uint16_t* __restrict__ w0,
                            const uint16_t* __restrict__ w1, bool first, bool last, const float* bias, float* buf,
                            int64_t ldb, int64_t n0, int64_t N, uint16_t* h, int64_t ldh, const uint16_t* x,
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
    for (int r = 0; r < M; ++r)
      vst(h + r * ldh + n0, vgelu_bf16(acc0[r])), vst(h + r * ldh + n0 + VL, vgelu_bf16(acc1[r]));
    return;
  }
  if (EPI == 2) return gelu_out<M, true>(acc0, acc1, n0, N, y, ldy);
  residual_out<M>(acc0, acc1, n0, N, x, y, ldy, gamma);
}

// C(np x N) for one tile over the K range [0, K) of a longer sum, pgemm_part's blocking on bf16
// pairs: a (np x K bf16, row stride lda, even; an odd K's partner column zero); Wp points at the
// range's first pair in the bf16-pair panels of a weight with ldp pairs per panel row (panel p at
// Wp + p * ldp * 32). first_part / last_part as pgemm_part's (fp32 partial sums through buf).
template <int EPI>
static void pgemm_dp_part(const uint16_t* a, int64_t lda, int64_t np, int64_t K, const uint16_t* Wp, int64_t ldp,
                          int64_t N, const float* bias, float* buf, int64_t ldb, uint16_t* h, int64_t ldh,
                          const uint16_t* x, uint16_t* y, int64_t ldy, const float* gamma, bool first_part,
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
        const uint16_t* xt = x ? x + t0 * ldy : nullptr;
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

// The GEMM every function below calls: pgemm_dp_part, or in the isa_amx namespace (FVK_AMX) the same
// GEMM on AMX tiles (amx.h), which falls back to pgemm_dp_part where K is not a multiple of 32.
#ifdef FVK_AMX
#include "amx.h"
#define FVK_PGEMM_DP pgemm_amx_part
#else
#define FVK_PGEMM_DP pgemm_dp_part
#endif

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
int64_t ffn_dp_scratch(int64_t T, int64_t C, int64_t Hd) {
  const int64_t ldh = hid_stride(Hd), Cp = (C + NR - 1) / NR * NR, Ce = (C + 1) / 2 * 2;
  return T * (C + ldh + Cp) + (T * (Ce + ldh) + 1) / 2;
}

// ffn_gemms on bf16 pairs: d (np x C fp32) rounded to bf16 rows dh, then fc1 + GELU and fc2
// (+ layer scale + residual, x and y at the tile's first pixel, row stride C; x null: fc2's sums are
// left in acc, np x Cp fp32, for mix_dp_tiles' own epilogue).
static void ffn_gemms_dp(const float* d, int64_t np, int64_t C, int64_t Hd, const uint16_t* w1p, const float* b1,
                         const uint16_t* w2p, const float* b2, const float* gamma, const uint16_t* x, uint16_t* y,
                         float* hacc, float* acc, uint16_t* dh, uint16_t* hid) {
  const int64_t ldh = hid_stride(Hd), Cp = (C + NR - 1) / NR * NR, Ce = (C + 1) / 2 * 2;
  const int64_t KP1 = Ce / 2, KP2 = (Hd + 1) / 2;
  to_bf16_rows(d, np, C, dh);
  for (int64_t h0 = 0; h0 < Hd; h0 += HC) {
    const int64_t hc = Hd - h0 < HC ? Hd - h0 : HC;
    // fc1 + GELU, hidden channels [h0, h0 + hc) into hid's columns [0, hc rounded up to NR): the
    // columns past hc are GELU(0) = 0 (zero padded weights and bias), so an odd hc's partner is 0
    FVK_PGEMM_DP<0>(dh, Ce, np, C, w1p + (h0 / PW) * KP1 * 2 * PW, KP1, hc, b1 + h0, hacc, ldh, hid, ldh,
                     nullptr, nullptr, 0, nullptr, true, true);
    // fc2's pairs [h0 / 2, (h0 + hc + 1) / 2) of its Hd-long sum (h0 is even: HC is)
    FVK_PGEMM_DP<1>(hid, ldh, np, hc, w2p + (h0 / 2) * 2 * PW, KP2, C, b2, acc, Cp, nullptr, 0, x, y, C, gamma,
                     h0 == 0, x && h0 + hc == Hd);
  }
}

// One tile of the bf16 ConvFFN (ffn_tile's steps, the GEMMs on bf16 pairs): pixels [p0, p0 + np)
// of one image x (H x Wd x C, bf16), y bf16:
//   d(np x C)   = depthwise KxK (BN folded) of x in fp32, then rounded to bf16 rows dh (np x Ce)
//   hid         = bf16(GELU(dh . W1^T + b1)), HC hidden channels at a time (np x hc, stride ldh)
//   y[p]        = x[p] + gamma * (hid . W2^T + b2)  (fc2's chunks accumulate in fp32 in acc)
// w1p, w2p: pack_linear_bf16 of fc1_w (Hd, C) and fc2_w (C, Hd).
static void ffn_tile_dp(const uint16_t* x, uint16_t* y, int64_t H, int64_t Wd, int64_t C, int64_t Hd, int64_t Kk,
                        const float* dw_w, const float* dw_b, const uint16_t* w1p, const float* b1,
                        const uint16_t* w2p, const float* b2, const float* gamma, int64_t p0, int64_t np, float* d,
                        float* hacc, float* acc, uint16_t* dh, uint16_t* hid) {
  dw_rows(x, H, Wd, C, Kk, dw_w, dw_b, p0, np, d);
  ffn_gemms_dp(d, np, C, Hd, w1p, b1, w2p, b2, gamma, x + p0 * C, y + p0 * C, hacc, acc, dh, hid);
}
static_assert(HC % 2 == 0, "fc2's hidden chunks start on a pair");

// Tiles [t_begin, t_end) of a batch (ffn_tiles' tiling), `scratch`: ffn_dp_scratch(T, C, Hd) floats.
void ffn_dp_tiles(const uint16_t* x, uint16_t* y, int64_t H, int64_t Wd, int64_t C, int64_t Hd, int64_t Kk,
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

// The fused RepMixer block (mix_tiles, repmixer.h) with the ConvFFN's GEMMs on bf16 pairs: x and y
// bf16; the window's mixer output m stays fp32 (the ConvFFN's depthwise input and the residual), so
// the residual stream is rounded once per block, at y. `scratch`: mix_dp_scratch floats.
int64_t mix_dp_scratch(int64_t th, int64_t tw, int64_t C, int64_t Hd, int64_t Kk) {
  return mix_window_floats(th, tw, C, Kk / 2) + ffn_dp_scratch(th * tw, C, Hd);
}
void mix_dp_tiles(const uint16_t* x, uint16_t* y, int64_t H, int64_t Wd, int64_t C, int64_t Hd, int64_t Km,
                         const float* mix_w, const float* mix_b, int64_t Kk, const float* dw_w, const float* dw_b,
                         const uint16_t* w1p, const float* b1, const uint16_t* w2p, const float* b2,
                         const float* gamma, int64_t gh, int64_t gw, int64_t th, int64_t tw, int64_t t_begin,
                         int64_t t_end, float* scratch) {
  const int64_t T = th * tw, ldh = hid_stride(Hd), Cp = (C + NR - 1) / NR * NR, Ce = (C + 1) / 2 * 2;
  float *mw = scratch, *d = mw + mix_window_floats(th, tw, C, Kk / 2), *hacc = d + T * C, *acc = hacc + T * ldh;
  uint16_t* dh = reinterpret_cast<uint16_t*>(acc + T * Cp);
  uint16_t* hid = dh + T * Ce;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const Rect r = mix_rect(H, Wd, gh, gw, t);
    const Win w = mix_window(r, H, Wd, Kk / 2);
    const int64_t np = (r.h1 - r.h0) * (r.w1 - r.w0), img = r.b * H * Wd * C;
    const MView mv = mix_dw(x + img, H, Wd, C, Km, mix_w, mix_b, Kk, dw_w, dw_b, r, w, mw, d);
    ffn_gemms_dp(d, np, C, Hd, w1p, b1, w2p, b2, gamma, nullptr, nullptr, hacc, acc, dh, hid);
    mix_residual(mv, r, acc, C, gamma, y + img, Wd);
  }
}

// ---- patch_embed's 1x1 on bf16 pairs -------------------------------------------------------------
// Per tile (dwpw_tiles' tiling): the grouped dw + GELU in fp32 (dwm_rows), rounded to bf16 rows (the
// pair products' operand, as eager bf16 rounds it), then y = bf16(GELU(d . Wpw^T + b)) on pairs.
// pw_p = pack_linear_bf16(pw_w (Co, Co)), pw_b padded to Cop floats. scratch: dwpw_dp_scratch floats.
int64_t dwpw_dp_scratch(int64_t T, int64_t Co, int64_t Cop) {
  return T * (Co + Cop) + (T * ((Co + 1) / 2 * 2) + 1) / 2;
}
void dwpw_dp_tiles(const uint16_t* x, uint16_t* y, int64_t H, int64_t Wd, int64_t Cin, int64_t Co, int64_t Kk,
                          int64_t s, const float* dw_w, const float* dw_b, const float* w2, const float* b2,
                          const uint16_t* pw_p, const float* pw_b,
                          int64_t per_image, int64_t T, int64_t t_begin, int64_t t_end, float* scratch) {
  const int64_t pad = Kk / 2, Ho = (H + 2 * pad - Kk) / s + 1, Wo = (Wd + 2 * pad - Kk) / s + 1, HWo = Ho * Wo;
  const int64_t Cop = (Co + NR - 1) / NR * NR, Ce = (Co + 1) / 2 * 2;
  float *d = scratch, *buf = d + Co * T;
  uint16_t* dh = reinterpret_cast<uint16_t*>(buf + Cop * T);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t b = t / per_image, p0 = tile_start(HWo, per_image, t % per_image);
    const int64_t np = tile_start(HWo, per_image, t % per_image + 1) - p0;
    dwm_rows(x + b * H * Wd * Cin, H, Wd, Cin, Co, Kk, s, dw_w, dw_b, w2, b2, Wo, p0, np, d);
    to_bf16_rows(d, np, Co, dh);
    FVK_PGEMM_DP<2>(dh, Ce, np, Co, pw_p, Ce / 2, Co, pw_b, buf, Cop, nullptr, 0, nullptr,
                     y + (b * HWo + p0) * Co, Co, nullptr, true, true);
  }
}

// ---- the bf16 attention mixer on bf16 pairs (attention.h's three phases) ------------------------
// wq = pack_linear_bf16(qkv_w (3C, C)), wp = pack_linear_bf16(proj_w (C, C)). Rounded to bf16, as
// eager bf16 rounds them (the operands of the pair products): the LayerNorm output, q (pre-scaled;
// here by head_dim^-0.5 log2(e), eager's by head_dim^-0.5), k and v, the softmax numerators p, and
// the attention output O. The scores S (base 2: the softmax takes 2^x, vexp2_neg), the running max
// and sum and the output accumulate in fp32; the running sum adds the rounded p, so each output row
// is a convex combination of v rows.
//
// Phase 2's operands, per image (bf16; hp = head_dim rounded up to even, an odd head_dim's partner
// channel is 0), written by phase 1, zero where no token writes (padded queries and keys):
//   Qp (heads, Np / 16, hp / 2, 32): panels of 16 queries (pack_linear_bf16's layout, queries as
//      the output channels): Qp[h][i / 16][dp][2 (i % 16) + e] = q[i][h hd + 2 dp + e]
//   Kh (heads, N, hp): key rows, the broadcast pairs of S = K Q^T
//   Vh (heads, hd, Np): value rows over keys, the broadcast pairs of O^T = V^T P^T
int64_t attn_hp(int64_t hd) { return (hd + 1) / 2 * 2; }

// Phase 1's scatter: tokens [p0, p0 + np) of the qkv rows (fp32, row stride ldq) into Qp, Kh, Vh.
static void scatter_qkv_dp(const float* qkv, int64_t ldq, int64_t N, int64_t C, int64_t hd, float scale, int64_t p0,
                           int64_t np, uint16_t* Qp, uint16_t* Kh, uint16_t* Vh, int64_t Np) {
  const int64_t heads = C / hd, hp = attn_hp(hd), nqp = Np / PW;
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t j = 0; j < np; ++j) {
      const int64_t i = p0 + j;
      const float* q = qkv + j * ldq + h * hd;
      uint16_t* qo = Qp + ((h * nqp + i / PW) * (hp / 2)) * 2 * PW + 2 * (i % PW);
      uint16_t* ko = Kh + (h * N + i) * hp;
      for (int64_t d = 0; d < hd; ++d) {
        st(qo + (d / 2) * 2 * PW, d % 2, q[d] * scale);
        st(ko, d, q[C + d]);
        st(Vh + (h * hd + d) * Np, i, q[2 * C + d]);
      }
    }
}

// Phase 1. scratch: qkv_dp_scratch(T, C, ldq) floats (ln, qkv as attn's, then ln in bf16).
int64_t qkv_dp_scratch(int64_t T, int64_t C, int64_t ldq) {
  return T * (C + ldq) + (T * ((C + 1) / 2 * 2) + 1) / 2;
}
void qkv_dp_tiles(const uint16_t* x, int64_t N, int64_t C, int64_t hd, const float* ln_w, const float* ln_b,
                         const uint16_t* wq, const float* zeros, float scale, uint16_t* Qp, uint16_t* Kh, uint16_t* Vh,
                         int64_t Np, int64_t ldq, int64_t per_image, int64_t T, int64_t t_begin, int64_t t_end,
                         float* scratch) {
  const int64_t Ce = (C + 1) / 2 * 2, hp = attn_hp(hd), heads = C / hd;
  float *ln = scratch, *qkv = ln + C * T;
  uint16_t* lnh = reinterpret_cast<uint16_t*>(qkv + T * ldq);
  const auto gemm = [&](const float* a, int64_t n, float* out) {
    to_bf16_rows(a, n, C, lnh);
    FVK_PGEMM_DP<3>(lnh, Ce, n, C, wq, Ce / 2, 3 * C, zeros, out, ldq, nullptr, 0, nullptr, nullptr, 0,
                     nullptr, true, true);
  };
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t b = t / per_image, p0 = tile_start(N, per_image, t % per_image);
    const int64_t np = tile_start(N, per_image, t % per_image + 1) - p0;
    const auto scatter = [&](const float* q, int64_t s0, int64_t n) {
      scatter_qkv_dp(q, ldq, N, C, hd, scale, s0, n, Qp + b * heads * hp * Np, Kh + b * heads * N * hp,
                     Vh + b * C * Np, Np);
    };
    qkv_tile(x + b * N * C, C, ln_w, ln_b, p0, np, ln, qkv, gemm, scatter);
  }
}

// Phase 2, queries [q0, q0 + nq) of one image (Tq a multiple of 2 VL, BK even), attn_tile's flash
// attention with both products on bf16 pairs:
//   S^T (nk x Tq) = Kh_blk . Qp^T      (pgemm_dp_part: keys as the pixel rows, queries as channels)
//   P = exp(S - running max), rounded to bf16 pairs of keys, query panels: Pp (Tq / 16, BK / 2, 32)
//   O^T (hd x Tq) += Vh_blk . Pp^T     (value channels as the rows, a pair of keys per step)
// scratch: attn_dp_scratch(Tq, BK, hd) floats.
int64_t attn_dp_scratch(int64_t Tq, int64_t BK, int64_t hd) {
  return BK * Tq + BK * Tq / 2 + 2 * hd * Tq + 2 * Tq;
}
static void attn_tile_dp(int64_t N, int64_t C, int64_t hd, const uint16_t* Qp, const uint16_t* Kh, const uint16_t* Vh,
                         int64_t Np, const float* zeros, int64_t q0, int64_t nq, int64_t Tq, int64_t BK, float* S,
                         uint16_t* Pp, float* Oh, float* PV, float* mx, float* sm, float* O) {
  const int64_t heads = C / hd, hp = attn_hp(hd), nqp = Np / PW, kpb = BK / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const uint16_t* qp = Qp + (h * nqp + q0 / PW) * (hp / 2) * 2 * PW;  // the tile's query panels
    const uint16_t* kh = Kh + h * N * hp;
    const uint16_t* vh = Vh + h * hd * Np;
    flash_head(
        N, C, hd, h, q0, nq, Tq, BK, S, Oh, PV, mx, sm, O,
        [&](int64_t k0, int64_t nk) {  // S^T (nk x Tq)
          FVK_PGEMM_DP<3>(kh + k0 * hp, hp, nk, hp, qp, hp / 2, Tq, zeros, S, Tq, nullptr, 0, nullptr,
                           nullptr, 0, nullptr, true, true);
        },
        [&](int64_t j, int64_t nk, vf mn, vf& l) {  // p in bf16 pairs of keys, this query vector's panel
          uint16_t* pp = Pp + (j / PW) * kpb * 2 * PW;
          for (int64_t r = 0; r < nk; r += 2) {  // a pair of keys per 32-bit lane: (r, r + 1); p >= 0, finite
            const vf p0 = vexp2_neg(vload(S + r * Tq + j) - mn);
            const vf p1 = r + 1 < nk ? vexp2_neg(vload(S + (r + 1) * Tq + j) - mn) : vf{};
            // the pair rounded to bf16; the running sum adds its odd key's p, then its even key's
#ifdef FVK_PAIR_PACK
            const vf pr = FVK_PAIR_PACK(p0, p1);  // VCVTNE2PS2BF16 + VPERMW
            l = FVK_PAIR_SUM(l, pr);              // vdpbf16ps with (1, 1)
#else
            const vu e0 = vround_hi(p0), e1 = vround_hi(p1);
            const vf pr = (vf)(e1 | (e0 >> 16));
            l = (l + (vf)e1) + (vf)e0;
#endif
            *reinterpret_cast<vfu*>(pp + (r / 2) * 2 * PW) = pr;
          }
        },
        [&](int64_t k0, int64_t nk) {  // (hd x Tq) = Vh_blk . P^T; an odd nk's partner key k0 + nk is 0 in Vh and Pp
          FVK_PGEMM_DP<3>(vh + k0, Np, hd, nk, Pp, kpb, Tq, zeros, PV, Tq, nullptr, 0, nullptr, nullptr,
                           0, nullptr, true, true);
        });
  }
}
static_assert(VL == PW, "a query vector of phase 2 is one panel of 16 queries");

void attn_dp_tiles(int64_t N, int64_t C, int64_t hd, const uint16_t* Qp, const uint16_t* Kh,
                          const uint16_t* Vh, int64_t Np, const float* zeros, int64_t Tq, int64_t BK, float* O,
                          int64_t t_begin, int64_t t_end, float* scratch) {
  const int64_t per_image = (N + Tq - 1) / Tq, hp = attn_hp(hd), heads = C / hd;
  float *S = scratch, *Oh = S + BK * Tq + BK * Tq / 2, *PV = Oh + hd * Tq, *mx = PV + hd * Tq, *sm = mx + Tq;
  uint16_t* Pp = reinterpret_cast<uint16_t*>(S + BK * Tq);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t b = t / per_image, q0 = (t % per_image) * Tq, nq = N - q0 < Tq ? N - q0 : Tq;
    attn_tile_dp(N, C, hd, Qp + b * heads * hp * Np, Kh + b * heads * N * hp, Vh + b * C * Np, Np, zeros, q0, nq, Tq,
                 BK, S, Pp, Oh, PV, mx, sm, O + b * N * C);
  }
}

// Phase 3: y = x + gamma * (O . Wproj^T + bp). scratch: proj_dp_scratch(T, C, Cp) floats.
int64_t proj_dp_scratch(int64_t T, int64_t C, int64_t Cp) {
  return T * Cp + (T * ((C + 1) / 2 * 2) + 1) / 2;
}
void proj_dp_tiles(const uint16_t* x, uint16_t* y, int64_t N, int64_t C, const float* O, const uint16_t* wp,
                          const float* bp, const float* gamma, int64_t Cp, int64_t per_image, int64_t T,
                          int64_t t_begin, int64_t t_end, float* scratch) {
  const int64_t Ce = (C + 1) / 2 * 2;
  uint16_t* oh = reinterpret_cast<uint16_t*>(scratch + T * Cp);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t b = t / per_image, p0 = tile_start(N, per_image, t % per_image);
    const int64_t np = tile_start(N, per_image, t % per_image + 1) - p0, off = (b * N + p0) * C;
    to_bf16_rows(O + off, np, C, oh);
    FVK_PGEMM_DP<1>(oh, Ce, np, C, wp, Ce / 2, C, bp, scratch, Cp, nullptr, 0, x + off, y + off, C, gamma, true, true);
  }
}

// The vdpbf16ps peak (fastvlm_C::peak_gflops with bf16_dot): `iters` rounds of NCH_DP independent
// chains acc = dpbf16(acc, pair, w), 4 VL flops each (VL lanes x 2 products x multiply + add). 16
// chains: vdpbf16ps has a longer latency than an FMA. Values stay normal (no denormal slow paths or
// flushing): the products are 2^-40.
constexpr int NCH_DP = 16;
constexpr int DP_CHAIN_FLOPS = 4 * VL * NCH_DP;  // per iteration of dp_chains
float dp_chains(int64_t iters, float seed) {
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
#undef FVK_PGEMM_DP
