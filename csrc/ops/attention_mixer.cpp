
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include <cmath>

#include "dispatch.h"
#include "ops/common.h"
#include "packed.h"

namespace fastvlm {

// fastvlm_C::attention_mixer_nhwc -- y = x + gamma * proj(MHSA(LayerNormChannel(x))) (kernels/attention.h):
// LayerNorm fused into the qkv GEMM, flash attention (online softmax over key blocks, no N x N
// matrix), proj + bias + layer scale + residual in the epilogue.
//   x (B, H, W, C) float32/bf16; ln_w, ln_b (C); qkv_wp = pack_linear(qkv_w (3C, C)) [q | k | v,
//   heads of head_dim]; proj_wp = pack_linear(proj_w (C, C)), proj_b (C); gamma (C).
//   Softmax scale head_dim^-0.5 (computed in base 2: log2(e) folded into q's scale), LayerNorm eps 1e-5.
at::Tensor attention_mixer_nhwc(const at::Tensor& x, const at::Tensor& ln_w, const at::Tensor& ln_b,
                                const at::Tensor& qkv_wp, const at::Tensor& proj_wp, const at::Tensor& proj_b,
                                const at::Tensor& gamma, int64_t head_dim) {
  const at::Tensor xc = checked_nhwc(x, "attention_mixer_nhwc");  // CPU, 4-D, float32 / bfloat16; contiguous
  const int64_t B = x.size(0), N = x.size(1) * x.size(2), C = x.size(3);
  TORCH_CHECK(head_dim >= 1 && C % head_dim == 0, "attention_mixer_nhwc: C = ", C, " is not a multiple of head_dim ",
              head_dim);
  const at::Tensor lw = as_f32(ln_w, "attention_mixer_nhwc: ln_w", {C}), lb = as_f32(ln_b, "attention_mixer_nhwc: ln_b", {C});
  const Isa isa = active_isa();
  // bf16-pair panels (pack_linear_bf16): qkv, S, P V and proj on the AVX512_BF16 kernels (kernels/bf16_pairs.h)
  const bool dp = qkv_wp.scalar_type() == at::kBFloat16 || proj_wp.scalar_type() == at::kBFloat16;
  if (dp) {
    check_packed_bf16(qkv_wp, 3 * C, C, "attention_mixer_nhwc: qkv_wp", "qkv_w");
    check_packed_bf16(proj_wp, C, C, "attention_mixer_nhwc: proj_wp", "proj_w");
    check_dp_call(x.scalar_type(), isa, "attention_mixer_nhwc");
  } else {
    check_packed(qkv_wp, 3 * C, C, "attention_mixer_nhwc: qkv_wp");
    check_packed(proj_wp, C, C, "attention_mixer_nhwc: proj_wp");
  }
  const int64_t Cp = packed::padded_width(C), ldq = packed::padded_width(3 * C);
  const at::Tensor bp = padded_f32(proj_b, "attention_mixer_nhwc: proj_b", C, Cp),
                   g = padded_f32(gamma, "attention_mixer_nhwc: gamma", C, Cp);
  at::Tensor y = at::empty_like(xc, xc.options().memory_format(c10::MemoryFormat::Contiguous));
  if (B == 0 || N == 0 || C == 0) return y;

  const int64_t nr = isa >= Isa::avx512 ? 32 : (isa == Isa::avx2 ? 16 : 8);
  const Tiling tl = gemm_tiling(B, N);  // phases 1 and 3
  const int64_t Tq = 2 * nr, BK = 128;
  const int64_t Np = (N + Tq - 1) / Tq * Tq + Tq;
  const auto f32 = xc.options().dtype(at::kFloat);
  at::Tensor O = at::empty({B, N, C}, f32);
  at::Tensor zeros = at::zeros({std::max<int64_t>(ldq, BK) + 64}, f32);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const void* xp = xc.data_ptr();
  void* yp = y.data_ptr();
  float* po = O.data_ptr<float>();
  const float *plw = lw.data_ptr<float>(), *plb = lb.data_ptr<float>(), *pbp = bp.data_ptr<float>(),
              *pg = g.data_ptr<float>(), *pz = zeros.data_ptr<float>();
  // q's scale with log2(e) folded in: the scores come out in base 2 and the softmax takes 2^x (vexp2_neg),
  // the same softmax with a cheaper exponential
  const float scale = static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(head_dim)));
  const int64_t tiles = B * tl.n, T = tl.T, per_image = tl.n, tiles2 = B * ((N + Tq - 1) / Tq);
  if (dp) {  // q, k, v in bf16 pair layouts (kernels/bf16_pairs.h), zero where no token writes
    const int64_t heads = C / head_dim, hp = isa_avx512_bf16::attn_hp(head_dim);
    const auto h16 = xc.options().dtype(at::kBFloat16);
    at::Tensor Qp = at::zeros({B, heads * hp * Np}, h16), Kh = at::zeros({B, heads * N * hp}, h16);
    at::Tensor Vh = at::zeros({B, C * Np}, h16);
    auto* pq = reinterpret_cast<uint16_t*>(Qp.data_ptr());
    auto* pk = reinterpret_cast<uint16_t*>(Kh.data_ptr());
    auto* pv = reinterpret_cast<uint16_t*>(Vh.data_ptr());
    const auto* wq = reinterpret_cast<const uint16_t*>(qkv_wp.data_ptr());
    const auto* wpr = reinterpret_cast<const uint16_t*>(proj_wp.data_ptr());
    const auto* xh = static_cast<const uint16_t*>(xp);
    auto* yh = static_cast<uint16_t*>(yp);
    parallel_tiles(tiles, isa_avx512_bf16::qkv_dp_scratch(T, C, ldq), [&](int64_t b, int64_t e, float* buf) {
      FVK_DP(isa, qkv_dp_tiles, xh, N, C, head_dim, plw, plb, wq, pz, scale, pq, pk, pv, Np, ldq, per_image, T, b,
                                   e, buf);
    });
    parallel_tiles(tiles2, isa_avx512_bf16::attn_dp_scratch(Tq, BK, head_dim), [&](int64_t b, int64_t e, float* buf) {
      FVK_DP(isa, attn_dp_tiles, N, C, head_dim, pq, pk, pv, Np, pz, Tq, BK, po, b, e, buf);
    });
    parallel_tiles(tiles, isa_avx512_bf16::proj_dp_scratch(T, C, Cp), [&](int64_t b, int64_t e, float* buf) {
      FVK_DP(isa, proj_dp_tiles, xh, yh, N, C, po, wpr, pbp, pg, Cp, per_image, T, b, e, buf);
    });
    return y;
  }
  at::Tensor Qt = at::zeros({B, C, Np}, f32), Vt = at::zeros({B, C, Np}, f32), Kb = at::empty({B, N, C}, f32);
  float *pq = Qt.data_ptr<float>(), *pk = Kb.data_ptr<float>(), *pv = Vt.data_ptr<float>();
  const int64_t scratch2 = BK * Tq + 2 * head_dim * Tq + 2 * Tq;
  const float *pwq = qkv_wp.data_ptr<float>(), *pwp = proj_wp.data_ptr<float>();
  FVK_PARALLEL_TILES(qkv_tiles, tiles, T * (C + ldq), isa, xp, bf16, N, C, head_dim, plw, plb, pwq, pz, scale, pq, pk,
                     pv, Np, ldq, per_image, T);
  FVK_PARALLEL_TILES(attn_tiles, tiles2, scratch2, isa, N, C, head_dim, pq, pk, pv, Np, pz, Tq, BK, po);
  FVK_PARALLEL_TILES(proj_tiles, tiles, T * Cp, isa, xp, yp, bf16, N, C, po, pwp, pbp, pg, Cp, per_image, T);
  return y;
}

}  // namespace fastvlm
