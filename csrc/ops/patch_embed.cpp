
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "dispatch.h"
#include "ops/common.h"
#include "packed.h"

namespace fastvlm {

// fastvlm_C::patch_embed_nhwc -- GELU(dw KxK stride s, multiplier Co/Cin) -> GELU(1x1), fused.
//   x (B, H, W, Cin) float32/bf16; dw_w (K, K, Co), dw_b (Co); pw_p = pack_linear(pw_w (Co, Co)), pw_b (Co).
//   For bf16 x on the avx512_bf16 ISA, pw_p may be pack_linear_bf16(pw_w): the 1x1 then multiplies
//   bf16 pairs, its input (the dw + GELU output) rounded to bf16 (kernels/bf16_pairs.h).
at::Tensor patch_embed_nhwc(const at::Tensor& x, const at::Tensor& dw_w, const at::Tensor& dw_b,
                            const at::Tensor& pw_p, const at::Tensor& pw_b, int64_t stride) {
  const at::Tensor xc = checked_nhwc(x, "patch_embed_nhwc");  // CPU, 4-D, float32 / bfloat16; contiguous
  TORCH_CHECK(dw_w.dim() == 3 && dw_w.size(0) == dw_w.size(1) && dw_w.size(0) % 2 == 1,
              "patch_embed_nhwc: dw_w must be (K, K, Co) with odd K, got ", dw_w.sizes());
  TORCH_CHECK(stride >= 1, "patch_embed_nhwc: stride must be >= 1, got ", stride);
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), Cin = x.size(3), K = dw_w.size(0), Co = dw_w.size(2);
  TORCH_CHECK(Cin >= 1 && Co % Cin == 0, "patch_embed_nhwc: dw_w's Co (", Co, ") must be a multiple of x's channels (",
              Cin, ")");
  TORCH_CHECK(H >= 1 && W >= 1, "patch_embed_nhwc: x must have H, W >= 1, got ", x.sizes());
  const Isa isa = active_isa();
  const bool dp = pw_p.scalar_type() == at::kBFloat16;  // bf16-pair panels: the AVX512_BF16 1x1
  if (dp) {
    check_packed_bf16(pw_p, Co, Co, "patch_embed_nhwc: pw_p", "pw_w");
    check_dp_call(x.scalar_type(), isa, "patch_embed_nhwc");
  } else {
    check_packed(pw_p, Co, Co, "patch_embed_nhwc: pw_p");
  }
  const int64_t Cop = packed::padded_width(Co);
  const at::Tensor fw = as_f32(dw_w, "patch_embed_nhwc: dw_w", {K, K, Co}), fb = as_f32(dw_b, "patch_embed_nhwc: dw_b", {Co});
  const at::Tensor pb = padded_f32(pw_b, "patch_embed_nhwc: pw_b", Co, Cop);
  const bool pairs = isa_avx2::dwm_slides(K, stride, Cin, Co);  // the same on every ISA
  const at::Tensor w2 = pair_layout(fw.data_ptr<float>(), K * K, Co, isa, pairs),
                   b2 = pair_layout(fb.data_ptr<float>(), 1, Co, isa, pairs);
  const float *pw2 = data_or_null(w2), *pb2 = data_or_null(b2);
  const int64_t pad = K / 2, Ho = (H + 2 * pad - K) / stride + 1, Wo = (W + 2 * pad - K) / stride + 1;
  at::Tensor y = at::empty({B, Ho, Wo, Co}, xc.options().memory_format(c10::MemoryFormat::Contiguous));
  if (B == 0) return y;
  const Tiling tl = gemm_tiling(B, Ho * Wo);
  const int64_t T = tl.T, tiles = B * tl.n;
  const int64_t scratch = T * (Co + Cop);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const void* xp = xc.data_ptr();
  void* yp = y.data_ptr();
  const float *pfw = fw.data_ptr<float>(), *pfb = fb.data_ptr<float>(), *ppb = pb.data_ptr<float>();
  if (dp) {
    const auto* wp = reinterpret_cast<const uint16_t*>(pw_p.data_ptr());
    parallel_tiles(tiles, isa_avx512_bf16::dwpw_dp_scratch(T, Co, Cop), [&](int64_t b, int64_t e, float* buf) {
      FVK_DP(isa, dwpw_dp_tiles, static_cast<const uint16_t*>(xp), static_cast<uint16_t*>(yp), H, W, Cin, Co, K,
                                    stride, pfw, pfb, pw2, pb2, wp, ppb, tl.n, T, b, e, buf);
    });
    return y;
  }
  const float* ppw = pw_p.data_ptr<float>();
  FVK_PARALLEL_TILES(dwpw_tiles, tiles, scratch, isa, xp, yp, bf16, H, W, Cin, Co, K, stride, pfw, pfb, pw2, pb2, ppw,
                     ppb, tl.n, T);
  return y;
}

}  // namespace fastvlm
