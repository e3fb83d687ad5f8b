// fastvlm_C::convffn_nhwc -- the fused ConvFFN: y = x + gamma * fc2(GELU(fc1(dwKxK_bnfolded(x)))),
// one tile of pixels at a time (kernels/convffn.h); the 4C-wide hidden activation goes through a per-thread
// buffer 256 channels at a time (fc1 + GELU of a chunk, then its share of fc2) and is never whole.
//
//   x      (B, H, W, C) contiguous, float32 or bfloat16 (bf16 storage, fp32 accumulation)
//   dw_w   (K, K, C), dw_b (C): the depthwise conv with its BatchNorm folded in
//   fc1_wp = pack_linear(fc1_w (Hd, C)), fc1_b (Hd); fc2_wp = pack_linear(fc2_w (C, Hd)), fc2_b (C);
//   gamma (C). Biases, gamma and dw weights may be float32 or bfloat16; they are used as float32.
//   For bf16 x on the avx512_bf16 ISA, fc1_wp / fc2_wp may be pack_linear_bf16 instead: the GEMMs
//   then multiply bf16 pairs (kernels/bf16_pairs.h; attention_mixer and patch_embed likewise).
//
// ISA: the tile kernel is compiled for AVX-512 (16 floats), AVX2+FMA (8) and baseline SSE2 (4), and
// picked at run time from the CPU's features (plus AVX512_BF16 for the pair-dot GEMMs);
// FASTVLM_CPU_ISA=avx512|avx2|sse forces a narrower one.
// Results do not depend on the thread count: tiles are fixed by the shape, each is computed by one
// thread in a fixed order.
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

at::Tensor convffn_nhwc(const at::Tensor& x, const at::Tensor& dw_w, const at::Tensor& dw_b, const at::Tensor& fc1_wp,
                        const at::Tensor& fc1_b, const at::Tensor& fc2_wp, const at::Tensor& fc2_b,
                        const at::Tensor& gamma) {
  const at::Tensor xc = checked_nhwc(x, "convffn_nhwc");
  at::Tensor y = at::empty_like(xc, xc.options().memory_format(c10::MemoryFormat::Contiguous));
  const FfnArgs a = ffn_args("convffn_nhwc", xc, dw_w, dw_b, fc1_wp, fc1_b, fc2_wp, fc2_b, gamma);
  const int64_t B = a.B, H = a.H, W = a.W, C = a.C, K = a.K, Hd = a.Hd;
  if (B == 0 || H == 0 || W == 0 || C == 0) return y;
  const bool bf16 = xc.scalar_type() == at::kBFloat16;
  const void* xp = xc.data_ptr();
  void* yp = y.data_ptr();
  const float *pdw = a.pdw, *pdb = a.pdb, *pb1 = a.pb1, *pb2 = a.pb2, *pg = a.pg;
  const Tiling tl = gemm_tiling(B, H * W);
  const int64_t T = tl.T, tiles = B * tl.n;
  if (a.dp) {
    const auto* q1 = static_cast<const uint16_t*>(a.w1p);
    const auto* q2 = static_cast<const uint16_t*>(a.w2p);
    parallel_tiles(tiles, isa_avx512_bf16::ffn_dp_scratch(T, C, Hd), [&](int64_t b, int64_t e, float* buf) {
      FVK_DP(a.isa, ffn_dp_tiles, static_cast<const uint16_t*>(xp), static_cast<uint16_t*>(yp), H, W, C, Hd, K, pdw,
                                   pdb, q1, pb1, q2, pb2, pg, tl.n, T, b, e, buf);
    });
    return y;
  }
  const float *p1 = static_cast<const float*>(a.w1p), *p2 = static_cast<const float*>(a.w2p);
  const int64_t scratch = isa_avx512::ffn_scratch(T, C, Hd);  // the widest ISA's strides: >= every ISA's
  FVK_PARALLEL_TILES(ffn_tiles, tiles, scratch, a.isa, xp, yp, bf16, H, W, C, Hd, K, pdw, pdb, p1, pb1, p2, pb2,
                     pg, tl.n, T);
  return y;
}

}  // namespace fastvlm
