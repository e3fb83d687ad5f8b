
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

// The rectangles of repmixer_nhwc (mix_rect): about th x tw = 6 x 32 pixels (FASTVLM_MIX_TILE=THxTW
// overrides), gh x gw per image, gh raised where that makes the tile count over the batch a multiple
// of the thread count (as gemm_tiling). th, tw returned: the largest rectangle mix_rect makes. On
// the Zen 4 of bench/results, 6 x 32 measured 2-6% faster per op than 6 x 16, 12 x 8, 12 x 12 and
// 8 x 24 at stage 0 and about level at stages 1-2 (calls alternated in one process).
struct MixTiling {
  int64_t gh, gw, th, tw;
};
static MixTiling mix_tiling(int64_t B, int64_t H, int64_t W) {
  int64_t th = 6, tw = 32;
  if (const char* env = std::getenv("FASTVLM_MIX_TILE")) {
    long long a = 0, b = 0;
    char rest = 0;
    TORCH_CHECK(std::sscanf(env, "%lldx%lld%c", &a, &b, &rest) == 2 && a > 0 && b > 0,
                "FASTVLM_MIX_TILE must be THxTW with positive integers (e.g. 6x32), got '", env, "'");
    th = a, tw = b;
  }
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads()), gw = (W + tw - 1) / tw;
  int64_t gh = (H + th - 1) / th;
  for (int64_t k = 0; k < nth && (B * gh * gw) % nth && gh < H; ++k) ++gh;
  return {gh, gw, (H + gh - 1) / gh, (W + gw - 1) / gw};
}

// fastvlm_C::repmixer_nhwc -- the RepMixer block: m = dwKm(x) (mix_w (Km, Km, C), mix_b (C): the
// RepMixer with its residual folded in), then y = m + gamma * fc2(GELU(fc1(dw_bnfolded(m)))) (the
// ConvFFN, convffn_nhwc's arguments), fused (csrc/kernels/, mix_tiles): one rectangle of pixels at a
// time, m computed over the rectangle plus the depthwise's halo in per-thread scratch, never in
// memory. m is float32 for either x dtype: for bf16 x a bf16 m would round the residual stream twice
// per block (m, then y); eager bf16 does, and at 1024x1024 that alone made the encoder's error 1.6x
// that of fp32-accumulating ops rounded once (rel-L2 3.3e-2 against 2.0e-2 at 512x512, train-form
// random weights).
at::Tensor repmixer_nhwc(const at::Tensor& x, const at::Tensor& mix_w, const at::Tensor& mix_b,
                         const at::Tensor& dw_w, const at::Tensor& dw_b, const at::Tensor& fc1_wp,
                         const at::Tensor& fc1_b, const at::Tensor& fc2_wp, const at::Tensor& fc2_b,
                         const at::Tensor& gamma) {
  const at::Tensor xc = checked_nhwc(x, "repmixer_nhwc");
  const int64_t C = xc.size(3);
  TORCH_CHECK(mix_w.dim() == 3 && mix_w.size(0) == mix_w.size(1) && mix_w.size(0) % 2 == 1,
              "repmixer_nhwc: mix_w must be (K, K, C) with odd K, got ", mix_w.sizes());
  const int64_t Km = mix_w.size(0);
  const at::Tensor mw = as_f32(mix_w, "repmixer_nhwc: mix_w", {Km, Km, C});
  const at::Tensor mb = as_f32(mix_b, "repmixer_nhwc: mix_b", {C});
  at::Tensor y = at::empty_like(xc, xc.options().memory_format(c10::MemoryFormat::Contiguous));
  const FfnArgs a = ffn_args("repmixer_nhwc", xc, dw_w, dw_b, fc1_wp, fc1_b, fc2_wp, fc2_b, gamma);
  const int64_t B = a.B, H = a.H, W = a.W, K = a.K, Hd = a.Hd;
  if (B == 0 || H == 0 || W == 0 || C == 0) return y;
  const bool bf16 = xc.scalar_type() == at::kBFloat16;
  const void* xp = xc.data_ptr();
  void* yp = y.data_ptr();
  const float *pmw = mw.data_ptr<float>(), *pmb = mb.data_ptr<float>(), *pdw = a.pdw, *pdb = a.pdb, *pb1 = a.pb1,
              *pb2 = a.pb2, *pg = a.pg;
  const MixTiling tl = mix_tiling(B, H, W);
  const int64_t tiles = B * tl.gh * tl.gw;
  if (a.dp) {
    const auto* q1 = static_cast<const uint16_t*>(a.w1p);
    const auto* q2 = static_cast<const uint16_t*>(a.w2p);
    parallel_tiles(tiles, isa_avx512_bf16::mix_dp_scratch(tl.th, tl.tw, C, Hd, K),
                   [&](int64_t b, int64_t e, float* buf) {
                     FVK_DP(a.isa, mix_dp_tiles, static_cast<const uint16_t*>(xp), static_cast<uint16_t*>(yp), H, W,
                                                  C, Hd, Km, pmw, pmb, K, pdw, pdb, q1, pb1, q2, pb2, pg, tl.gh,
                                                  tl.gw, tl.th, tl.tw, b, e, buf);
                   });
    return y;
  }
  const float *p1 = static_cast<const float*>(a.w1p), *p2 = static_cast<const float*>(a.w2p);
  FVK_PARALLEL_TILES(mix_tiles, tiles, isa_avx512::mix_scratch(tl.th, tl.tw, C, Hd, K), a.isa, xp, yp, bf16, H, W, C,
                     Hd, Km, pmw, pmb, K, pdw, pdb, p1, pb1, p2, pb2, pg, tl.gh, tl.gw, tl.th, tl.tw);
  return y;
}

}  // namespace fastvlm
