// The attention mixer y = x + gamma * proj(MHSA(LayerNormChannel(x))), included by kernels.h after
// the fp32 kernels once per ISA (same vector type `vf`, `pgemm` / `gemm_s`, `ld`/`st`, `vexp2_neg`).
//
// Three phases per batch, each parallel over tiles and deterministic (one thread per tile, fixed order):
//  1. qkv_tiles, per tile of tokens (the 1x1 ops' tiling): LayerNormChannel of each token (fp32
//     statistics) into pixel rows, then qkv (T x 3C) = ln . Wqkv^T on pgemm with the packed weight
//     (the LayerNorm is the GEMM's prologue: the normalised activation never leaves the tile). The
//     tile is scattered per head into Qt (d x Np, pre-scaled by head_dim^-0.5 log2(e), so the
//     scores are in base 2 and the softmax takes 2^x: vexp2_neg), K (N x d), Vt (d x Np).
//  2. attn_tiles, per tile of Tq queries: for every head, flash attention over key blocks of BK:
//     S^T (BK x Tq) = K_blk . Q^T, online softmax down each query column (running max / sum, the
//     output rescaled when the max moves), O^T += Vt_blk . P^T; no N x N matrix exists. Queries are
//     the vector dimension (2 vectors per micro-tile, gemm_s). The tile's O goes to O (N x C rows).
//  3. proj_tiles, per tile of tokens: y = x + gamma * (O . Wproj^T + b) on pgemm with the packed
//     weight, the fc2 epilogue (layer scale + residual, storage dtype) writing y's rows.
// Phases 1 and 3 read each weight once per tile of ~96 tokens (not per 16-32 queries).
// Buffers Qt / Vt are padded to Np = a multiple of Tq columns (zero), so micro-tiles never read
// past them; padded queries are computed and dropped.

static inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < VL; ++i) s += v[i];
  return s;
}

// Phase 1, one tile: tokens [p0, p0 + np). ln: np x C floats, qkv: np rows of ldq floats, ldq = 3C
// rounded up to 32. gemm(ln, np, qkv): qkv (np x 3C, row stride ldq) = ln (np x C) . Wqkv^T (pgemm
// on the packed weight; the AVX512_BF16 path, bf16_pairs.h, on bf16 pairs). scatter(qkv, p0, np):
// the tile's q, k, v into phase 2's layouts (scatter_qkv here; bf16_pairs.h's bf16 pair layouts).
template <typename T_, typename Gemm, typename Scatter>
static void qkv_tile(const T_* x, int64_t C, const float* ln_w, const float* ln_b, int64_t p0, int64_t np, float* ln,
                     float* qkv, const Gemm& gemm, const Scatter& scatter) {
  for (int64_t j = 0; j < np; ++j) {
    const T_* xp = x + (p0 + j) * C;
    float* o = ln + j * C;
    vf sv = vset(0.f);
    int64_t c = 0;
    for (; c + VL <= C; c += VL) sv += vld(xp + c);
    float sum = hsum(sv);
    for (; c < C; ++c) sum += ld(xp, c);
    const float mean = sum / C;
    const vf mv = vset(mean);
    sv = vset(0.f);
    for (c = 0; c + VL <= C; c += VL) {
      const vf dv = vld(xp + c) - mv;
      sv += dv * dv;
    }
    float var = hsum(sv);
    for (; c < C; ++c) var += (ld(xp, c) - mean) * (ld(xp, c) - mean);
    const float rstd = 1.f / std::sqrt(var / C + 1e-5f);
    const vf rv = vset(rstd);
    for (c = 0; c + VL <= C; c += VL) vstore(o + c, (vld(xp + c) - mv) * rv * vload(ln_w + c) + vload(ln_b + c));
    for (; c < C; ++c) o[c] = (ld(xp, c) - mean) * rstd * ln_w[c] + ln_b[c];
  }
  gemm(ln, np, qkv);
  scatter(qkv, p0, np);
}

// phase 2's fp32 layouts for tokens [p0, p0 + np) of the qkv rows (row stride ldq): Qt (C x Np,
// pre-scaled by head_dim^-0.5 log2(e)), K per head (heads x N x hd), Vt (C x Np).
static void scatter_qkv(const float* qkv, int64_t ldq, int64_t N, int64_t C, int64_t hd, float scale, int64_t p0,
                        int64_t np, float* Qt, float* Kb, float* Vt, int64_t Np) {
  const int64_t heads = C / hd;
  for (int64_t c = 0; c < C; ++c) {  // q and v channel-major (queries / keys along the vector), pre-scaled q
    float* qo = Qt + c * Np + p0;
    float* vo = Vt + c * Np + p0;
    for (int64_t j = 0; j < np; ++j) {
      qo[j] = qkv[j * ldq + c] * scale;
      vo[j] = qkv[j * ldq + 2 * C + c];
    }
  }
  for (int64_t h = 0; h < heads; ++h)  // k per head, token rows of hd
    for (int64_t j = 0; j < np; ++j)
      std::memcpy(Kb + (h * N + p0 + j) * hd, qkv + j * ldq + C + h * hd, hd * sizeof(float));
}

// Phase 1 for tiles [t_begin, t_end) of `per_image` tiles per image. scratch: T * C (ln rows) +
// T * ldq (qkv rows) floats. `zeros`: >= ldq zero floats (no qkv bias).
FVK_ENTRY void qkv_tiles(const void* x, bool bf16, int64_t N, int64_t C, int64_t hd, const float* ln_w, const float* ln_b,
                      const float* wqkv_p, const float* zeros, float scale, float* Qt, float* Kb, float* Vt, int64_t Np,
                      int64_t ldq, int64_t per_image, int64_t T, int64_t t_begin, int64_t t_end, float* scratch) {
  float *ln = scratch, *qkv = ln + C * T;
  const auto gemm = [&](const float* a, int64_t n, float* out) {
    pgemm<3, float>(a, C, n, C, wqkv_p, 3 * C, zeros, out, ldq, nullptr, nullptr, 0, nullptr);
  };
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t b = t / per_image, p0 = tile_start(N, per_image, t % per_image);
    const int64_t np = tile_start(N, per_image, t % per_image + 1) - p0;
    const auto scatter = [&](const float* q, int64_t s0, int64_t n) {
      scatter_qkv(q, ldq, N, C, hd, scale, s0, n, Qt + b * C * Np, Kb + b * N * C, Vt + b * C * Np, Np);
    };
    if (bf16)
      qkv_tile(static_cast<const uint16_t*>(x) + b * N * C, C, ln_w, ln_b, p0, np, ln, qkv, gemm, scatter);
    else
      qkv_tile(static_cast<const float*>(x) + b * N * C, C, ln_w, ln_b, p0, np, ln, qkv, gemm, scatter);
  }
}

// Phase 2's flash attention for head h of a tile of Tq queries [q0, q0 + nq), over key blocks of BK:
// the online softmax down each query column (running max mx / sum sm, the output O^T (hd x Tq, in
// Oh) rescaled when the max moves), the products left to the caller:
//   scores(k0, nk):        S^T (nk x Tq, row stride Tq) = K_blk . Q^T, keys [k0, k0 + nk)
//   probs(j, nk, mn, l):   p = exp(S^T[r][j .. j + VL) - mn) for the block's keys, stored where pv
//                          reads them, and added to l (the running sum, already rescaled)
//   pv(k0, nk):            PV (hd x Tq) = V_blk . P^T
// Then the queries' rows of O (head h's channels) = O^T / sum.
template <typename Scores, typename Probs, typename PVProd>
static void flash_head(int64_t N, int64_t C, int64_t hd, int64_t h, int64_t q0, int64_t nq, int64_t Tq, int64_t BK,
                       float* S, float* Oh, const float* PV, float* mx, float* sm, float* O, const Scores& scores,
                       const Probs& probs, const PVProd& pv) {
  for (int64_t j = 0; j < Tq; j += VL) {
    vstore(mx + j, vset(-3.0e38f));
    vstore(sm + j, vset(0.f));
  }
  for (int64_t i = 0; i < hd * Tq; i += VL) vstore(Oh + i, vset(0.f));
  for (int64_t k0 = 0; k0 < N; k0 += BK) {
    const int64_t nk = N - k0 < BK ? N - k0 : BK;
    scores(k0, nk);
    for (int64_t j = 0; j < Tq; j += VL) {
      vf m = vload(mx + j);
      // the block's column max, in four independent chains (a max is exact: the same result as one
      // chain, NaN scores skipped as there, a NaN first score kept), then combined
      vf mb[4];
      for (int i = 0; i < 4; ++i) mb[i] = vload(S + j);
      int64_t r = 1;
      for (; r + 4 <= nk; r += 4)
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          const vf s = vload(S + (r + i) * Tq + j);
          mb[i] = s > mb[i] ? s : mb[i];
        }
      for (; r < nk; ++r) {
        const vf s = vload(S + r * Tq + j);
        mb[0] = s > mb[0] ? s : mb[0];
      }
      mb[0] = mb[1] > mb[0] ? mb[1] : mb[0];
      mb[2] = mb[3] > mb[2] ? mb[3] : mb[2];
      mb[0] = mb[2] > mb[0] ? mb[2] : mb[0];
      const vf mn = mb[0] > m ? mb[0] : m;
      const vf alpha = vexp2_neg(m - mn);  // 2^-125 on the first block (m = -3e38), times a zero sum and output
      vf l = vload(sm + j) * alpha;
      probs(j, nk, mn, l);
      vstore(sm + j, l);
      vstore(mx + j, mn);
      for (int64_t d = 0; d < hd; ++d) vstore(Oh + d * Tq + j, vload(Oh + d * Tq + j) * alpha);
    }
    pv(k0, nk);
    for (int64_t i = 0; i < hd * Tq; i += VL) vstore(Oh + i, vload(Oh + i) + vload(PV + i));
  }
  for (int64_t j = 0; j < nq; ++j)  // O^T / sum -> the queries' rows of O
    for (int64_t d = 0; d < hd; ++d) O[(q0 + j) * C + h * hd + d] = Oh[d * Tq + j] / sm[j];
}

// Phase 2 for query tiles [t_begin, t_end). scratch: BK * Tq (S / P) + 2 * hd * Tq (O^T, V.P)
// + 2 * Tq (max, sum) floats. O: (N x C) rows of the attention output (all heads), float32.
static void attn_tile(int64_t N, int64_t C, int64_t hd, const float* Qt, const float* Kb, const float* Vt,
                      int64_t Np, const float* zeros, int64_t q0, int64_t nq, int64_t Tq, int64_t BK, float* S,
                      float* Oh, float* PV, float* mx, float* sm, float* O) {
  const int64_t heads = C / hd;
  for (int64_t h = 0; h < heads; ++h) {
    const float* q = Qt + h * hd * Np + q0;  // (hd x Tq), row stride Np
    const float* kh = Kb + h * N * hd;       // (N x hd)
    const float* vh = Vt + h * hd * Np;      // (hd x Np)
    flash_head(
        N, C, hd, h, q0, nq, Tq, BK, S, Oh, PV, mx, sm, O,
        [&](int64_t k0, int64_t nk) { gemm_s(kh + k0 * hd, hd, zeros, nk, hd, q, Np, Tq, S, Tq, false); },
        [&](int64_t j, int64_t nk, vf mn, vf& l) {  // p in place of S
          for (int64_t r = 0; r < nk; ++r) {
            const vf p = vexp2_neg(vload(S + r * Tq + j) - mn);
            vstore(S + r * Tq + j, p);
            l += p;
          }
        },
        [&](int64_t k0, int64_t nk) { gemm_s(vh + k0, Np, zeros, hd, nk, S, Tq, Tq, PV, Tq, false); });
  }
}

FVK_ENTRY void attn_tiles(int64_t N, int64_t C, int64_t hd, const float* Qt, const float* Kb, const float* Vt, int64_t Np,
                       const float* zeros, int64_t Tq, int64_t BK, float* O, int64_t t_begin, int64_t t_end,
                       float* scratch) {
  const int64_t per_image = (N + Tq - 1) / Tq;
  float *S = scratch, *Oh = S + BK * Tq, *PV = Oh + hd * Tq, *mx = PV + hd * Tq, *sm = mx + Tq;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t b = t / per_image, q0 = (t % per_image) * Tq, nq = N - q0 < Tq ? N - q0 : Tq;
    attn_tile(N, C, hd, Qt + b * C * Np, Kb + b * N * C, Vt + b * C * Np, Np, zeros, q0, nq, Tq, BK, S, Oh, PV, mx, sm,
              O + b * N * C);
  }
}

// Phase 3 for tiles [t_begin, t_end) of `per_image` tiles per image: y = x + gamma * (O . Wp^T + bp)
// (pgemm, the fc2 epilogue). bp and gamma zero padded to Cp floats; scratch: T * Cp floats.
FVK_ENTRY void proj_tiles(const void* x, void* y, bool bf16, int64_t N, int64_t C, const float* O, const float* wp_p,
                       const float* bp, const float* gamma, int64_t Cp, int64_t per_image, int64_t T, int64_t t_begin,
                       int64_t t_end, float* scratch) {
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t b = t / per_image, p0 = tile_start(N, per_image, t % per_image);
    const int64_t np = tile_start(N, per_image, t % per_image + 1) - p0, off = (b * N + p0) * C;
    if (bf16)
      pgemm<1>(O + off, C, np, C, wp_p, C, bp, scratch, Cp, static_cast<const uint16_t*>(x) + off,
               static_cast<uint16_t*>(y) + off, C, gamma);
    else
      pgemm<1>(O + off, C, np, C, wp_p, C, bp, scratch, Cp, static_cast<const float*>(x) + off,
               static_cast<float*>(y) + off, C, gamma);
  }
}
