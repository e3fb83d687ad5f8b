// The attention mixer y = x + gamma * proj(MHSA(LayerNormChannel(x))), included by ffn.cpp after
// ffn_impl.h once per ISA (same vector type `vf`, `gemm_s` on the micro-kernel, `ld`/`st`, `vexp`).
//
// Two phases per batch, each parallel over tiles and deterministic (one thread per tile, fixed order):
//  1. qkv_tiles, per tile of T tokens: LayerNormChannel of each token (fp32 statistics) goes
//     channel-major into the tile, then qkv^T (3C x T) = Wqkv . ln^T on the micro-kernel (the
//     LayerNorm is the GEMM's prologue: the normalised activation never leaves the tile). The tile
//     is scattered per head into Qt (d x Np, pre-scaled by head_dim^-0.5), K (N x d) and Vt (d x Np).
//  2. attn_tiles, per tile of Tq queries: for every head, flash attention over key blocks of BK:
//     S^T (BK x Tq) = K_blk . Q^T, online softmax down each query column (running max / sum, the
//     output rescaled when the max moves), O^T += Vt_blk . P^T; no N x N matrix exists. The tile's
//     O^T (C x Tq) then goes through proj (C x C) + bias, and the epilogue writes
//     y = x + gamma * out. Queries are the vector dimension throughout (2 vectors per micro-tile).
// Buffers Qt / Vt are padded to Np = a multiple of Tq columns (zero), so micro-tiles never read
// past them; padded queries are computed and dropped.

// Phase 1 for tiles [t_begin, t_end): tile t = image t / per_image, tokens from (t % per_image) * T.
// scratch: C * T (ln^T) + 3C * T (qkv^T) floats. `zeros`: >= 3C zero floats (no qkv bias).
template <typename T_>
static void qkv_tile(const T_* x, int64_t N, int64_t C, int64_t hd, const float* ln_w, const float* ln_b,
                     const float* wqkv, const float* zeros, float scale, int64_t p0, int64_t np, int64_t T,
                     float* lnT, float* qkvT, float* Qt, float* Kb, float* Vt, int64_t Np) {
  for (int64_t j = 0; j < T; ++j) {
    if (j >= np) {
      for (int64_t c = 0; c < C; ++c) lnT[c * T + j] = 0.f;
      continue;
    }
    const T_* xp = x + (p0 + j) * C;
    double s = 0.0;
    for (int64_t c = 0; c < C; ++c) s += ld(xp, c);
    const float mean = static_cast<float>(s / C);
    double v = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const float d = ld(xp, c) - mean;
      v += static_cast<double>(d) * d;
    }
    const float rstd = static_cast<float>(1.0 / std::sqrt(v / C + 1e-5));
    for (int64_t c = 0; c < C; ++c) lnT[c * T + j] = (ld(xp, c) - mean) * rstd * ln_w[c] + ln_b[c];
  }
  gemm_s(wqkv, C, zeros, 3 * C, C, lnT, T, T, qkvT, T, false);
  const int64_t heads = C / hd;
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t d = 0; d < hd; ++d) {
      const float* q = qkvT + (h * hd + d) * T;
      const float* v = qkvT + (2 * C + h * hd + d) * T;
      float* qo = Qt + (h * hd + d) * Np + p0;
      float* vo = Vt + (h * hd + d) * Np + p0;
      for (int64_t j = 0; j < np; ++j) {
        qo[j] = q[j] * scale;
        vo[j] = v[j];
      }
      const float* k = qkvT + (C + h * hd + d) * T;
      float* ko = Kb + (h * N + p0) * hd + d;
      for (int64_t j = 0; j < np; ++j) ko[j * hd] = k[j];
    }
  }
}

static void qkv_tiles(const void* x, bool bf16, int64_t N, int64_t C, int64_t hd, const float* ln_w, const float* ln_b,
                      const float* wqkv, const float* zeros, float scale, float* Qt, float* Kb, float* Vt, int64_t Np,
                      int64_t T, int64_t t_begin, int64_t t_end, float* scratch) {
  const int64_t per_image = (N + T - 1) / T;
  float *lnT = scratch, *qkvT = lnT + C * T;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t b = t / per_image, p0 = (t % per_image) * T, np = N - p0 < T ? N - p0 : T;
    float *qt = Qt + b * C * Np, *kb = Kb + b * N * C, *vt = Vt + b * C * Np;
    if (bf16)
      qkv_tile(static_cast<const uint16_t*>(x) + b * N * C, N, C, hd, ln_w, ln_b, wqkv, zeros, scale, p0, np, T, lnT,
               qkvT, qt, kb, vt, Np);
    else
      qkv_tile(static_cast<const float*>(x) + b * N * C, N, C, hd, ln_w, ln_b, wqkv, zeros, scale, p0, np, T, lnT,
               qkvT, qt, kb, vt, Np);
  }
}

// Phase 2 for query tiles [t_begin, t_end). scratch: BK * Tq (S / P) + 2 * hd * Tq (O^T, V.P)
// + C * Tq (all heads' O^T) + C * Tq (proj out) + 2 * Tq (max, sum) floats.
template <typename T_>
static void attn_tile(const T_* x, T_* y, int64_t N, int64_t C, int64_t hd, const float* Qt, const float* Kb,
                      const float* Vt, int64_t Np, const float* wp, const float* bp, const float* gamma,
                      const float* zeros, int64_t q0, int64_t nq, int64_t Tq, int64_t BK, float* S, float* Oh,
                      float* PV, float* Ot, float* out, float* mx, float* sm) {
  const int64_t heads = C / hd;
  for (int64_t h = 0; h < heads; ++h) {
    const float* q = Qt + h * hd * Np + q0;  // (hd x Tq), row stride Np
    const float* kh = Kb + h * N * hd;       // (N x hd)
    const float* vh = Vt + h * hd * Np;      // (hd x Np)
    for (int64_t j = 0; j < Tq; j += VL) {
      vstore(mx + j, vset(-3.0e38f));
      vstore(sm + j, vset(0.f));
    }
    for (int64_t i = 0; i < hd * Tq; i += VL) vstore(Oh + i, vset(0.f));
    for (int64_t k0 = 0; k0 < N; k0 += BK) {
      const int64_t nk = N - k0 < BK ? N - k0 : BK;
      gemm_s(kh + k0 * hd, hd, zeros, nk, hd, q, Np, Tq, S, Tq, false);  // S^T (nk x Tq)
      for (int64_t j = 0; j < Tq; j += VL) {
        vf m = vload(mx + j);
        vf mb = vload(S + j);
        for (int64_t r = 1; r < nk; ++r) {
          const vf s = vload(S + r * Tq + j);
          mb = s > mb ? s : mb;
        }
        const vf mn = mb > m ? mb : m;
        const vf alpha = vexp(m - mn);  // 0 on the first block (m = -3e38, clamped to exp(-87))
        vf l = vload(sm + j) * alpha;
        for (int64_t r = 0; r < nk; ++r) {
          const vf p = vexp(vload(S + r * Tq + j) - mn);
          vstore(S + r * Tq + j, p);
          l += p;
        }
        vstore(sm + j, l);
        vstore(mx + j, mn);
        for (int64_t d = 0; d < hd; ++d) vstore(Oh + d * Tq + j, vload(Oh + d * Tq + j) * alpha);
      }
      gemm_s(vh + k0, Np, zeros, hd, nk, S, Tq, Tq, PV, Tq, false);  // (hd x Tq) = Vt_blk . P^T
      for (int64_t i = 0; i < hd * Tq; i += VL) vstore(Oh + i, vload(Oh + i) + vload(PV + i));
    }
    for (int64_t d = 0; d < hd; ++d)
      for (int64_t j = 0; j < Tq; j += VL) vstore(Ot + (h * hd + d) * Tq + j, vload(Oh + d * Tq + j) / vload(sm + j));
  }
  gemm_s(wp, C, bp, C, C, Ot, Tq, Tq, out, Tq, false);  // proj + bias
  for (int64_t j = 0; j < nq; ++j) {
    const int64_t base = (q0 + j) * C;
    for (int64_t c = 0; c < C; ++c) st(y, base + c, ld(x, base + c) + gamma[c] * out[c * Tq + j]);
  }
}

static void attn_tiles(const void* x, void* y, bool bf16, int64_t N, int64_t C, int64_t hd, const float* Qt,
                       const float* Kb, const float* Vt, int64_t Np, const float* wp, const float* bp,
                       const float* gamma, const float* zeros, int64_t Tq, int64_t BK, int64_t t_begin, int64_t t_end,
                       float* scratch) {
  const int64_t per_image = (N + Tq - 1) / Tq;
  float *S = scratch, *Oh = S + BK * Tq, *PV = Oh + hd * Tq, *Ot = PV + hd * Tq, *out = Ot + C * Tq,
        *mx = out + C * Tq, *sm = mx + Tq;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t b = t / per_image, q0 = (t % per_image) * Tq, nq = N - q0 < Tq ? N - q0 : Tq;
    const float *qt = Qt + b * C * Np, *kb = Kb + b * N * C, *vt = Vt + b * C * Np;
    if (bf16)
      attn_tile(static_cast<const uint16_t*>(x) + b * N * C, static_cast<uint16_t*>(y) + b * N * C, N, C, hd, qt, kb,
                vt, Np, wp, bp, gamma, zeros, q0, nq, Tq, BK, S, Oh, PV, Ot, out, mx, sm);
    else
      attn_tile(static_cast<const float*>(x) + b * N * C, static_cast<float*>(y) + b * N * C, N, C, hd, qt, kb, vt,
                Np, wp, bp, gamma, zeros, q0, nq, Tq, BK, S, Oh, PV, Ot, out, mx, sm);
  }
}
