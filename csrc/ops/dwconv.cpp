// fastvlm_C::dwconv_nhwc -- depthwise k x k convolution over NHWC activations, with stride,
// channel multiplier, bias and an optional exact-erf GELU, in one pass over memory.
//
// Contract (the `dwconv` op of docs/architecture.md, CPU kernel):
//   x      (B, H, W, Cin)            contiguous, float32 or bfloat16
//   weight (K, K, Cout)              contiguous float32, packed once from PyTorch's (Cout, 1, K, K);
//                                    Cout = Cin * M, output channel co reads input channel co / M
//   bias   (Cout) float32 or None
//   out    (B, Ho, Wo, Cout)         dtype of x; Ho = (H + 2p - K) / s + 1
// Accumulation is float32. Each output row is computed by one thread with a fixed summation order,
// so results do not depend on the thread count. Multiplier 1, stride 1 and 'same' padding (the
// RepMixer and RepCPE convs) take the register-blocked kernels (kernels/depthwise.h: dwb_tiles for
// K = 7, dw_same_rows otherwise); any other shape takes dw_general_rows. Both per ISA (dispatch.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cstdint>
#include <vector>

#include "dispatch.h"
#include "ops/common.h"

namespace fastvlm {

// dwconv_nhwc's path for multiplier 1, stride 1, padding K / 2, odd K (the RepMixer and RepCPE convs): x
// and y (B, H, W, C) contiguous, both float32 or both bfloat16; w (K, K, C) float32 contiguous; b (C)
// float32 or null. Parallel over image rows; thread-count independent.
static void dwconv_same(const at::Tensor& x, const float* w, const float* b, int64_t K, at::Tensor& y, bool gelu) {
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  at::Tensor zeros;
  if (!b) {
    zeros = at::zeros({C}, x.options().dtype(at::kFloat));
    b = zeros.data_ptr<float>();
  }
  const Isa isa = active_isa();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), "dwconv_nhwc: y must have x's dtype");
  const void* xp = x.data_ptr();
  void* yp = y.data_ptr();
  if (K == 7) {  // RepCPE: packed channel blocks (dwb_tiles)
    const int64_t RB = isa_avx2::dwb_band(H), DB = isa_avx2::dwb_channels;
    const int64_t tiles = B * ((C + DB - 1) / DB) * ((H + RB - 1) / RB);
    FVK_PARALLEL_TILES(dwb_tiles, tiles, isa_avx2::dwb_scratch(H, W), isa, xp, yp, bf16, H, W, C, w, b, gelu);
    return;
  }
  FVK_PARALLEL_TILES(dw_same_rows, B * H, W * C, isa, xp, yp, bf16, H, W, C, K, w, b, gelu);
}

at::Tensor dwconv_nhwc(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       int64_t stride, int64_t padding, bool gelu) {
  const at::Tensor xc = checked_nhwc(x, "dwconv_nhwc");  // CPU, 4-D, float32 / bfloat16; contiguous
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 3 &&
                  weight.size(0) == weight.size(1) && weight.is_contiguous(),
              "dwconv_nhwc: weight must be a contiguous float32 CPU tensor (K, K, Cout), got ", weight.sizes(), " ",
              weight.scalar_type());
  TORCH_CHECK(stride >= 1, "dwconv_nhwc: stride must be >= 1, got ", stride);
  TORCH_CHECK(padding >= 0, "dwconv_nhwc: padding must be >= 0, got ", padding);
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), Cin = x.size(3);
  const int64_t K = weight.size(0), Cout = weight.size(2);
  TORCH_CHECK(Cin >= 1 && Cout % Cin == 0, "dwconv_nhwc: weight's Cout (", Cout,
              ") must be a positive multiple of x's channels (", Cin, ")");
  const int64_t M = Cout / Cin;
  const float* bptr = nullptr;
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = *bias;
    TORCH_CHECK(b.device().is_cpu() && b.scalar_type() == at::kFloat && b.dim() == 1 && b.size(0) == Cout &&
                    b.is_contiguous(),
                "dwconv_nhwc: bias must be a contiguous float32 CPU tensor of shape (", Cout, "), got ", b.sizes(), " ",
                b.scalar_type());
    bptr = b.data_ptr<float>();
  }
  TORCH_CHECK(H + 2 * padding >= K && W + 2 * padding >= K, "dwconv_nhwc: input ", H, "x", W, " with padding ",
              padding, " is smaller than the ", K, "x", K, " kernel");
  const int64_t Ho = (H + 2 * padding - K) / stride + 1, Wo = (W + 2 * padding - K) / stride + 1;
  at::Tensor out = at::empty({B, Ho, Wo, Cout}, x.options().memory_format(c10::MemoryFormat::Contiguous));
  if (B == 0 || Cout == 0) return out;
  const float* wptr = weight.data_ptr<float>();
  if (M == 1 && stride == 1 && K % 2 == 1 && padding == K / 2) {  // the RepMixer / RepCPE convs
    dwconv_same(xc, wptr, bptr, K, out, gelu);  // register-blocked sliding windows
    return out;
  }
  // any other stride, multiplier or padding: one output row per work item (dw_general_rows)
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const void* xp = xc.data_ptr();
  void* yp = out.data_ptr();
  const Isa isa = active_isa();
  FVK_PARALLEL_TILES(dw_general_rows, B * Ho, Cout, isa, xp, yp, bf16, H, W, Cin, Cout, K, stride, padding, Ho, Wo,
                     wptr, bptr, gelu);
  return out;
}

}  // namespace fastvlm
