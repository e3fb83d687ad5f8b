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
// RepMixer and RepCPE convs) take ffn.cpp's register-blocked kernel (dw_rows of ffn_impl.h, per ISA).
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "gelu.h"

namespace fastvlm {
void dwconv_same_fast(const at::Tensor& x, const float* w, const float* b, int64_t K, at::Tensor& y, bool gelu);
void conv_exp_dw_fast(const at::Tensor& x, const float* w, const float* b, int64_t K, int64_t Co, float* z,
                      float* rowsums);
void conv_exp_scale_gelu_fast(const float* z, const float* s, at::Tensor& y);
void se_gemv_fast(const float* W, const float* v, const float* bias, int64_t rows, int64_t n, int act, float* y);
namespace {

// One output pixel's Cout channels: acc = bias + sum over valid taps of x[tap][co / M] * w[tap][co].
template <typename in_t>
FVK_INLINE void dw_pixel(const in_t* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
                         float* __restrict__ acc, int64_t H, int64_t W, int64_t Cin, int64_t Cout, int64_t M,
                         int64_t K, int64_t ih0, int64_t iw0) {
  if (bias) {
    for (int64_t c = 0; c < Cout; ++c) acc[c] = bias[c];
  } else {
    for (int64_t c = 0; c < Cout; ++c) acc[c] = 0.f;
  }
  for (int64_t kh = 0; kh < K; ++kh) {
    const int64_t ih = ih0 + kh;
    if (ih < 0 || ih >= H) continue;
    for (int64_t kw = 0; kw < K; ++kw) {
      const int64_t iw = iw0 + kw;
      if (iw < 0 || iw >= W) continue;
      const in_t* xp = x + (ih * W + iw) * Cin;
      const float* wp = w + (kh * K + kw) * Cout;
      if (M == 1) {
        for (int64_t c = 0; c < Cout; ++c) acc[c] += to_float(xp[c]) * wp[c];
      } else {
        for (int64_t ci = 0; ci < Cin; ++ci) {
          const float xv = to_float(xp[ci]);
          for (int64_t m = 0; m < M; ++m) acc[ci * M + m] += xv * wp[ci * M + m];
        }
      }
    }
  }
}

// One output row (fixed b, oh), for each input type; compiled once per ISA and picked at load time.
#define FVK_DW_ROW(NAME, IN_T)                                                                          \
  FVK_CLONES void NAME(const IN_T* x, const float* w, const float* bias, IN_T* out, float* acc, int64_t H, \
                       int64_t W, int64_t Cin, int64_t Cout, int64_t M, int64_t K, int64_t stride,         \
                       int64_t pad, int64_t Wo, int64_t oh, bool gelu) {                                    \
    for (int64_t ow = 0; ow < Wo; ++ow) {                                                               \
      dw_pixel<IN_T>(x, w, bias, acc, H, W, Cin, Cout, M, K, oh * stride - pad, ow * stride - pad);       \
      IN_T* op = out + ow * Cout;                                                                       \
      if (gelu) {                                                                                       \
        for (int64_t c = 0; c < Cout; ++c) op[c] = from_float<IN_T>(gelu_scalar(acc[c]));                  \
      } else {                                                                                          \
        for (int64_t c = 0; c < Cout; ++c) op[c] = from_float<IN_T>(acc[c]);                            \
      }                                                                                                 \
    }                                                                                                   \
  }

FVK_DW_ROW(dw_row_f32, float)
FVK_DW_ROW(dw_row_bf16, c10::BFloat16)

}  // namespace

at::Tensor dwconv_nhwc(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       int64_t stride, int64_t padding, bool gelu) {
  TORCH_CHECK(x.device().is_cpu(), "dwconv_nhwc: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "dwconv_nhwc: x must be 4-D (B, H, W, C), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "dwconv_nhwc: x must be float32 or bfloat16, got ", x.scalar_type());
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
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({B, Ho, Wo, Cout}, x.options().memory_format(c10::MemoryFormat::Contiguous));
  if (B == 0 || Cout == 0) return out;
  const float* wptr = weight.data_ptr<float>();
  if (M == 1 && stride == 1 && K % 2 == 1 && padding == K / 2) {  // the RepMixer / RepCPE convs
    dwconv_same_fast(xc, wptr, bptr, K, out, gelu);  // ffn.cpp: register-blocked, per ISA
    return out;
  }
  const bool is_bf16 = x.scalar_type() == at::kBFloat16;
  const void* xbase = xc.data_ptr();
  void* obase = out.data_ptr();
  const int64_t esz = xc.element_size();
  at::parallel_for(0, B * Ho, 1, [&](int64_t begin, int64_t end) {
    const DenormalsFlushed ftz;  // common.h: per thread, restored on exit
    std::vector<float> acc(Cout);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bi = r / Ho, oh = r % Ho;
      const char* xb = static_cast<const char*>(xbase) + bi * H * W * Cin * esz;
      char* orow = static_cast<char*>(obase) + r * Wo * Cout * esz;
      if (is_bf16) {
        dw_row_bf16(reinterpret_cast<const c10::BFloat16*>(xb), wptr, bptr, reinterpret_cast<c10::BFloat16*>(orow),
                    acc.data(), H, W, Cin, Cout, M, K, stride, padding, Wo, oh, gelu);
      } else {
        dw_row_f32(reinterpret_cast<const float*>(xb), wptr, bptr, reinterpret_cast<float*>(orow), acc.data(), H, W,
                   Cin, Cout, M, K, stride, padding, Wo, oh, gelu);
      }
    }
  });
  return out;
}

// fastvlm_C::conv_exp_nhwc -- GELU(SE(dw KxK, multiplier Cout/Cin)) in two passes over the output
// (both vectorised per ISA: convexp_rows and scale_gelu_rows of ffn_impl.h, through ffn.cpp):
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
  TORCH_CHECK(x.device().is_cpu(), "conv_exp_nhwc: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "conv_exp_nhwc: x must be 4-D (B, H, W, C), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "conv_exp_nhwc: x must be float32 or bfloat16, got ", x.scalar_type());
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
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({B, H, W, Cout}, xc.options().memory_format(c10::MemoryFormat::Contiguous));
  if (B == 0 || H == 0 || W == 0 || Cout == 0) return y;
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  at::Tensor zt = bf16 ? at::empty({B, H, W, Cout}, xc.options().dtype(at::kFloat)) : y;  // fp32: in place
  at::Tensor rows = at::empty({B * H, Cout}, xc.options().dtype(at::kFloat));
  at::Tensor sc = at::empty({B, Cout}, xc.options().dtype(at::kFloat));
  float *z = zt.data_ptr<float>(), *rs = rows.data_ptr<float>(), *s = sc.data_ptr<float>();
  const float *pw = fw.data_ptr<float>(), *pb = fb.data_ptr<float>(), *prw = rw.data_ptr<float>(),
              *prb = rb.data_ptr<float>(), *pew = ew.data_ptr<float>(), *peb = eb.data_ptr<float>();
  conv_exp_dw_fast(xc, pw, pb, K, Cout, z, rs);  // ffn.cpp: vectorised per ISA
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
    se_gemv_fast(prw, mean.data() + bi * Cout, prb, rd, Cout, 0, red.data() + bi * rd);
    se_gemv_fast(pew, red.data() + bi * rd, peb, Cout, rd, 1, s + bi * Cout);
  }
  conv_exp_scale_gelu_fast(z, s, y);
  return y;
}

}  // namespace fastvlm
