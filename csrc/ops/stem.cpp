
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include <ATen/ops/constant_pad_nd.h>

#include "dispatch.h"
#include "ops.h"  // pack_linear
#include "ops/common.h"
#include "packed.h"

namespace fastvlm {

// fastvlm_C::stem_nhwc -- GELU(conv3x3 s2) -> GELU(dw3x3 s2) -> GELU(1x1), fused (see stem_block in csrc/kernels/).
//   x (B, H, W, Cin) float32/bf16, any strides; w0 (C, Cin, 3, 3), b0 (C); w1 (3, 3, C), b1 (C);
//   w2p = pack_linear(w2 (C, C)), b2 (C)
at::Tensor stem_nhwc(const at::Tensor& x, const at::Tensor& w0, const at::Tensor& b0, const at::Tensor& w1,
                     const at::Tensor& b1, const at::Tensor& w2p, const at::Tensor& b2) {
  TORCH_CHECK(x.device().is_cpu(), "stem_nhwc: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "stem_nhwc: x must be 4-D (B, H, W, Cin), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "stem_nhwc: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(w0.dim() == 4 && w0.size(2) == 3 && w0.size(3) == 3, "stem_nhwc: w0 must be (C, Cin, 3, 3), got ",
              w0.sizes());
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), Cin = x.size(3), C = w0.size(0);
  TORCH_CHECK(w0.size(1) == Cin, "stem_nhwc: w0 expects ", w0.size(1), " input channels, x has ", Cin);
  TORCH_CHECK(H >= 1 && W >= 1, "stem_nhwc: x must have H, W >= 1, got ", x.sizes());
  check_packed(w2p, C, C, "stem_nhwc: w2p");
  const int64_t Cp = packed::padded_width(C);
  // the conv3x3 as a GEMM over (3, 3, Cin) patches: its weight packed like the 1x1s (small: per call)
  const at::Tensor w0p = pack_linear(as_f32(w0, "stem_nhwc: w0", {C, Cin, 3, 3}).permute({0, 2, 3, 1}).reshape({C, 9 * Cin}));
  const at::Tensor fb0 = padded_f32(b0, "stem_nhwc: b0", C, Cp), fb1 = padded_f32(b1, "stem_nhwc: b1", C, Cp);
  const at::Tensor fw1 = at::constant_pad_nd(as_f32(w1, "stem_nhwc: w1", {3, 3, C}), {0, Cp - C}).contiguous();
  const at::Tensor fb2 = padded_f32(b2, "stem_nhwc: b2", C, Cp);
  const int64_t H1 = (H - 1) / 2 + 1, W1 = (W - 1) / 2 + 1, H2 = (H1 - 1) / 2 + 1, W2 = (W1 - 1) / 2 + 1;
  // x is read through its strides (the model passes the NCHW pixels' permuted view): no NHWC copy
  const int64_t xs[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  at::Tensor y = at::empty({B, H2, W2, C}, x.options().memory_format(c10::MemoryFormat::Contiguous));
  if (B == 0 || C == 0) return y;
  const Isa isa = active_isa();
  // blocks of RB x SW final pixels (FASTVLM_STEM_BLOCK=RBxSW overrides the 32 x 32; any block shape
  // gives the same results: each value is summed in the same order whatever block computes it)
  int64_t RB = 32, SW = 32;
  if (const char* env = std::getenv("FASTVLM_STEM_BLOCK")) {
    long long rb = 0, sw = 0;
    TORCH_CHECK(std::sscanf(env, "%lldx%lld", &rb, &sw) == 2 && rb >= 1 && sw >= 1 && rb <= 256 && sw <= 1024,
                "FASTVLM_STEM_BLOCK must read RBxSW (e.g. 32x32, 1 <= RB <= 256, 1 <= SW <= 1024), got '", env, "'");
    RB = rb, SW = sw;
  }
  const int64_t tiles = B * ((H2 + RB - 1) / RB) * ((W2 + SW - 1) / SW);
  const int64_t scratch = isa_avx2::stem_scratch(SW, Cin, Cp);  // the same on every ISA
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const void* xp = x.data_ptr();
  void* yp = y.data_ptr();
  const float *p0 = w0p.data_ptr<float>(), *pb0 = fb0.data_ptr<float>(), *p1 = fw1.data_ptr<float>(),
              *pb1 = fb1.data_ptr<float>(), *p2 = w2p.data_ptr<float>(), *pb2 = fb2.data_ptr<float>();
  FVK_PARALLEL_TILES(stem_tiles, tiles, scratch, isa, xp, xs, yp, bf16, H, W, Cin, C, Cp, p0, pb0, p1, pb1, p2, pb2, RB,
                     SW);
  return y;
}

}  // namespace fastvlm
