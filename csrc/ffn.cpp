// fastvlm_C::convffn_nhwc -- the fused ConvFFN: y = x + gamma * fc2(GELU(fc1(dwKxK_bnfolded(x)))),
// one tile of pixels at a time (ffn_impl.h); the 4C-wide hidden activation lives in a per-thread
// buffer sized for L2 and is never written to memory in full.
//
//   x      (B, H, W, C) contiguous, float32 or bfloat16 (bf16 storage, fp32 accumulation)
//   dw_w   (K, K, C), dw_b (C): the depthwise conv with its BatchNorm folded in
//   fc1_w  (Hd, C), fc1_b (Hd); fc2_w (C, Hd), fc2_b (C); gamma (C)    (nn.Linear layout)
// Weights may be float32 or bfloat16; they are used as float32.
//
// ISA: the tile kernel is compiled for AVX-512 (16 floats), AVX2+FMA (8) and baseline SSE2 (4), and
// picked at run time from the CPU's features; FASTVLM_CPU_ISA=avx2|sse forces a narrower one.
// Results do not depend on the thread count: tiles are fixed by the shape, each is computed by one
// thread in a fixed order.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "isa.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,fma")
namespace fastvlm { namespace ffn_avx512 {
#define FVK_VL 16
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
#include "ffn_impl.h"
#undef FVK_VL
}}  // namespace fastvlm::ffn_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace fastvlm { namespace ffn_avx2 {
#define FVK_VL 8
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
#include "ffn_impl.h"
#undef FVK_VL
}}  // namespace fastvlm::ffn_avx2
#pragma GCC pop_options

namespace fastvlm { namespace ffn_sse {
#define FVK_VL 4
typedef float vf __attribute__((vector_size(16)));
typedef int32_t vi __attribute__((vector_size(16)));
#include "ffn_impl.h"
#undef FVK_VL
}}  // namespace fastvlm::ffn_sse

namespace fastvlm {
namespace {

at::Tensor as_f32(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "convffn_nhwc: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.sizes() == shape, "convffn_nhwc: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              "convffn_nhwc: ", name, " must be float32 or bfloat16, got ", t.scalar_type());
  return t.to(at::kFloat).contiguous();
}

}  // namespace

at::Tensor convffn_nhwc(const at::Tensor& x, const at::Tensor& dw_w, const at::Tensor& dw_b, const at::Tensor& fc1_w,
                        const at::Tensor& fc1_b, const at::Tensor& fc2_w, const at::Tensor& fc2_b,
                        const at::Tensor& gamma) {
  TORCH_CHECK(x.device().is_cpu(), "convffn_nhwc: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "convffn_nhwc: x must be 4-D (B, H, W, C), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "convffn_nhwc: x must be float32 or bfloat16, got ", x.scalar_type());
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  TORCH_CHECK(dw_w.dim() == 3 && dw_w.size(0) == dw_w.size(1) && dw_w.size(0) % 2 == 1,
              "convffn_nhwc: dw_w must be (K, K, C) with odd K, got ", dw_w.sizes());
  TORCH_CHECK(fc1_w.dim() == 2, "convffn_nhwc: fc1_w must be (Hd, C), got ", fc1_w.sizes());
  const int64_t K = dw_w.size(0), Hd = fc1_w.size(0);
  const at::Tensor dww = as_f32(dw_w, "dw_w", {K, K, C}), dwb = as_f32(dw_b, "dw_b", {C});
  const at::Tensor w1 = as_f32(fc1_w, "fc1_w", {Hd, C}), b1 = as_f32(fc1_b, "fc1_b", {Hd});
  const at::Tensor w2 = as_f32(fc2_w, "fc2_w", {C, Hd}), b2 = as_f32(fc2_b, "fc2_b", {C});
  const at::Tensor g = as_f32(gamma, "gamma", {C});
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc, xc.options().memory_format(c10::MemoryFormat::Contiguous));
  if (B == 0 || H == 0 || W == 0 || C == 0) return y;

  const Isa isa = active_isa();
  const int64_t nr = isa == Isa::avx512 ? 32 : (isa == Isa::avx2 ? 16 : 8);
  // Tile width: the hidden (Hd x T floats) and the input tile in about half of a 1 MiB L2, at least
  // one micro-tile, a multiple of the micro-tile width, at most 128 pixels.
  int64_t T = (512 * 1024 / 4) / (Hd + 2 * C);
  T = std::max<int64_t>(nr, std::min<int64_t>(128, T / nr * nr));
  const int64_t per_image = (H * W + T - 1) / T, tiles = B * per_image;
  const int64_t scratch = (2 * C + Hd) * T + C;
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const void* xp = xc.data_ptr();
  void* yp = y.data_ptr();
  const float *pdw = dww.data_ptr<float>(), *pdb = dwb.data_ptr<float>(), *p1 = w1.data_ptr<float>(),
              *pb1 = b1.data_ptr<float>(), *p2 = w2.data_ptr<float>(), *pb2 = b2.data_ptr<float>(),
              *pg = g.data_ptr<float>();
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> raw(scratch + 16);  // + room to align the tiles to a 64-byte cache line
    float* buf = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(raw.data()) + 63) & ~uintptr_t(63));
    switch (isa) {
      case Isa::avx512:
        ffn_avx512::ffn_tiles(xp, yp, bf16, H, W, C, Hd, K, pdw, pdb, p1, pb1, p2, pb2, pg, T, begin, end, buf);
        break;
      case Isa::avx2:
        ffn_avx2::ffn_tiles(xp, yp, bf16, H, W, C, Hd, K, pdw, pdb, p1, pb1, p2, pb2, pg, T, begin, end, buf);
        break;
      default:
        ffn_sse::ffn_tiles(xp, yp, bf16, H, W, C, Hd, K, pdw, pdb, p1, pb1, p2, pb2, pg, T, begin, end, buf);
    }
  });
  return y;
}

}  // namespace fastvlm
