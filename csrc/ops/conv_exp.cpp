#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cstdint>
#include <vector>

#include "dispatch.h"
#include "ops/common.h"

namespace fastvlm {

// conv_exp_nhwc's two passes: x (B, H, W, Cin) contiguous float32/bf16, w (K, K, Co) and
// b (Co) float32; z (B*H*W, Co) float32 and rowsums (B*H, Co); then y (B, H, W, Co) = GELU(z * s).
static void conv_exp_dw(const at::Tensor& x, const float* w, const float* b, int64_t K, int64_t Co, float* z,
                      float* rowsums) {
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), Cin = x.size(3);
  const Isa isa = active_isa();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const void* xp = x.data_ptr();
  FVK_PARALLEL_TILES(convexp_rows, B * H, 0, isa, xp, bf16, H, W, Cin, Co, K, w, b, z, rowsums);
}

// conv_exp's SE GEMVs: y[i] = act(bias[i] + W[i] . v), i < rows, W (rows, n) float32; act 0 ReLU,
// 1 sigmoid. Rows split over threads; each row summed in a fixed order.
static void se_gemv(const float* W, const float* v, const float* bias, int64_t rows, int64_t n, int act, float* y) {
  const Isa isa = active_isa();
  FVK_PARALLEL_TILES(gemv_rows, rows, 0, isa, W, v, bias, n, act, y);
}

static void conv_exp_scale_gelu(const float* z, const float* s, at::Tensor& y) {
  const int64_t B = y.size(0), H = y.size(1), W = y.size(2), Co = y.size(3);
  const Isa isa = active_isa();
  const bool bf16 = y.scalar_type() == at::kBFloat16;
  void* yp = y.data_ptr();
  FVK_PARALLEL_TILES(scale_gelu_rows, B * H, 0, isa, z, s, yp, bf16, H, W, Co);
}

// fastvlm_C::conv_exp_nhwc -- GELU(SE(dw KxK, multiplier Cout/Cin)) in two passes over the output
// (both vectorised per ISA: convexp_rows and scale_gelu_rows of kernels/conv_exp.h):
//   pass 1 (parallel over output rows): the dw conv in fp32 into z (the output itself for fp32) and
//           each row's channel sums; then per image, in a fixed order: mean -> reduce (rd x Cout) ->
//           ReLU -> expand (Cout x rd) -> sigmoid = s (rd-wide, tiny);
//   pass 2 (parallel over rows): y = GELU(z * s).
//   x (B, H, W, Cin) float32/bf16; w (K, K, Cout), b (Cout); se_r_w (rd, Cout), se_r_b (rd);
//   se_e_w (Cout, rd), se_e_b (Cout). Stride 1, padding K / 2. Thread-count independent.
// Tried and not kept: taking the SE means from sums of x over the pixels each tap reads (no z), then
// recomputing the conv in pass 2 so that y is written once. Per-op A/B at 16x16x1536 (8 alternating
// process pairs): 0.89 vs 0.88 ms median, bf16 1.01 vs 0.88 ms. The op is compute-bound at these
// sizes, not memory-bound: its 786K exact-erf GELUs alone take ~0.2 ms on 2 AVX2 threads (4.4 ns per
// 8-float vector measured on L1-resident data), and a GELU with vrcpps + one Newton step instead of
// the division measured the same.
at::Tensor conv_exp_nhwc(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& se_r_w,
                         const at::Tensor& se_r_b, const at::Tensor& se_e_w, const at::Tensor& se_e_b) {
  const at::Tensor xc = checked_nhwc(x, "conv_exp_nhwc");  // CPU, 4-D, float32 / bfloat16; contiguous
  auto f32 = [](const at::Tensor& t, const char* name, at::IntArrayRef shape) {
    TORCH_CHECK(t.device().is_cpu() && t.sizes() == shape, "conv_exp_nhwc: ", name, " must be a CPU tensor of shape ",
                shape, ", got ", t.sizes());
    return t.to(at::kFloat).contiguous();
  };
  TORCH_CHECK(w.dim() == 3 && w.size(0) == w.size(1) && w.size(0) % 2 == 1,
              "conv_exp_nhwc: w must be (K, K, Cout) with odd K, got ", w.sizes());
  TORCH_CHECK(se_r_w.dim() == 2, "conv_exp_nhwc: se_r_w must be (rd, Cout), got ", se_r_w.sizes());
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), Cin = x.size(3), K = w.size(0), Cout = w.size(2);
  const int64_t rd = se_r_w.size(0);
  TORCH_CHECK(Cin >= 1 && Cout % Cin == 0, "conv_exp_nhwc: w's Cout (", Cout, ") must be a multiple of x's ", Cin,
              " channels");
  const at::Tensor fw = f32(w, "w", {K, K, Cout}), fb = f32(b, "b", {Cout}), rw = f32(se_r_w, "se_r_w", {rd, Cout});
  const at::Tensor rb = f32(se_r_b, "se_r_b", {rd}), ew = f32(se_e_w, "se_e_w", {Cout, rd}), eb = f32(se_e_b, "se_e_b", {Cout});
  at::Tensor y = at::empty({B, H, W, Cout}, xc.options().memory_format(c10::MemoryFormat::Contiguous));
  if (B == 0 || H == 0 || W == 0 || Cout == 0) return y;
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  at::Tensor zt = bf16 ? at::empty({B, H, W, Cout}, xc.options().dtype(at::kFloat)) : y;  // fp32: in place
  at::Tensor rows = at::empty({B * H, Cout}, xc.options().dtype(at::kFloat));
  at::Tensor sc = at::empty({B, Cout}, xc.options().dtype(at::kFloat));
  float *z = zt.data_ptr<float>(), *rs = rows.data_ptr<float>(), *s = sc.data_ptr<float>();
  const float *pw = fw.data_ptr<float>(), *pb = fb.data_ptr<float>(), *prw = rw.data_ptr<float>(),
              *prb = rb.data_ptr<float>(), *pew = ew.data_ptr<float>(), *peb = eb.data_ptr<float>();
  conv_exp_dw(xc, pw, pb, K, Cout, z, rs);  // vectorised per ISA
  // SE per image (vectorised GEMVs, rows split over threads, each row summed in a fixed order).
  std::vector<float> mean(B * Cout), red(B * rd);
  for (int64_t bi = 0; bi < B; ++bi) {
    float* m = mean.data() + bi * Cout;
    for (int64_t c = 0; c < Cout; ++c) m[c] = 0.f;
    for (int64_t oh = 0; oh < H; ++oh)
      for (int64_t c = 0; c < Cout; ++c) m[c] += rs[(bi * H + oh) * Cout + c];
    for (int64_t c = 0; c < Cout; ++c) m[c] /= static_cast<float>(H * W);
  }
  for (int64_t bi = 0; bi < B; ++bi) {
    se_gemv(prw, mean.data() + bi * Cout, prb, rd, Cout, 0, red.data() + bi * rd);
    se_gemv(pew, red.data() + bi * rd, peb, Cout, rd, 1, s + bi * Cout);
  }
  conv_exp_scale_gelu(z, s, y);
  return y;
}

}  // namespace fastvlm
