// The shared ATen-side helpers of csrc/ops/ (declared in common.h).
#include "ops/common.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "packed.h"

namespace fastvlm {

// A weight as contiguous float32, after checking it (`name` reads e.g. "convffn_nhwc: fc1_w").
at::Tensor as_f32(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              name, " must be float32 or bfloat16, got ", t.scalar_type());
  return t.to(at::kFloat).contiguous();
}


// A per-channel vector as float32, zero padded to `padded` floats (the kernels read whole vectors).
at::Tensor padded_f32(const at::Tensor& t, const char* name, int64_t n, int64_t padded) {
  const at::Tensor f = as_f32(t, name, {n});
  at::Tensor out = at::zeros({padded}, f.options());
  out.narrow(0, 0, n).copy_(f);
  return out;
}

at::Tensor checked_nhwc(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (B, H, W, C), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  return x.contiguous();
}

// The pointwise weight of stem / patch_embed: pack_linear's panels of a (C, C) weight, checked.
void check_packed(const at::Tensor& wp, int64_t N, int64_t K, const char* what) {
  TORCH_CHECK(wp.device().is_cpu() && wp.scalar_type() == at::kFloat && wp.is_contiguous() &&
                  wp.sizes() == at::IntArrayRef({packed::panels(N), K, packed::kPanel}),
              what, " must be pack_linear() of the (", N, ", ", K, ") weight: float32 (", packed::panels(N), ", ", K,
              ", ", packed::kPanel, "), got ", wp.scalar_type(), " ", wp.sizes());
}

// A pack_linear_bf16 weight: bf16-pair panels of an (N, K) weight, checked ("<what> must be
// pack_linear_bf16(<name>)").
void check_packed_bf16(const at::Tensor& wp, int64_t N, int64_t K, const char* what, const char* name) {
  TORCH_CHECK(wp.device().is_cpu() && wp.scalar_type() == at::kBFloat16 && wp.is_contiguous() &&
                  wp.sizes() == at::IntArrayRef({packed::panels(N), (K + 1) / 2, 2 * packed::kPanel}),
              what, " must be pack_linear_bf16(", name, "), bfloat16 (", packed::panels(N), ", ", (K + 1) / 2, ", ",
              2 * packed::kPanel, "), got ", wp.scalar_type(), " ", wp.sizes());
}
// An op handed pack_linear_bf16 weights runs the AVX512_BF16 kernels: bf16 x (dtype: x's), and that ISA active.
void check_dp_call(at::ScalarType dtype, Isa isa, const char* op) {
  TORCH_CHECK(dtype == at::kBFloat16, op, ": weights packed by pack_linear_bf16 need bfloat16 x, got ", dtype,
              " (pack float32 models with pack_linear)");
  TORCH_CHECK(isa >= Isa::avx512_bf16, op, ": weights packed by pack_linear_bf16 need the avx512_bf16 kernels, but "
              "this call runs ", isa_name(isa), " (the CPU lacks AVX512_BF16, or FASTVLM_CPU_ISA caps it): pack with "
              "pack_linear instead");
}

// Tiling of the 1x1-GEMM ops: `n` tiles per image of at most `T` pixels (whole 6-pixel groups,
// spread evenly by tile_start), about 96 pixels each (FASTVLM_FFN_TILE overrides the 96), and the
// tile count over the batch a multiple of the thread count where that is reachable, so the
// threads (which take tiles from a counter, FVK_PARALLEL_TILES) end on a full last round. The count
// is rounded down to that multiple where the tiles then stay within 1.5 T pixels, else up: every
// tile reads the whole weight, and at FastViTHD's stage 4 (256 pixels, 75 MB of ConvFFN weights)
// 2 tiles of 132 pixels on 2 threads took 0.85x the time of 4 of 66 (ConvFFN; attention_mixer
// 0.95x; calls alternated in one process on the Xeon of bench/results; level, 1.00x / 0.98x, on
// the Zen 1 of bench/results/zen1). Tiling does not change
// results: each output is summed in the same order whatever tile computes it.
Tiling gemm_tiling(int64_t B, int64_t HW) {
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads()), groups = (HW + 5) / 6;
  int64_t T = 96;
  if (const char* env = std::getenv("FASTVLM_FFN_TILE")) T = std::max<int64_t>(6, std::atoll(env) / 6 * 6);
  int64_t n = (HW + T - 1) / T;
  int64_t down = n;
  while (down > 0 && (B * down) % nth) --down;
  if (down > 0 && down < n && HW <= down * (T + T / 2)) n = down;
  for (int64_t k = 0; k < nth && (B * n) % nth; ++k) ++n;
  n = std::max<int64_t>(1, std::min(n, groups));
  return {n, (groups + n - 1) / n * 6};
}


// A depthwise weight (lead x Co floats) or bias (lead = 1), in pair layout (csrc/kernels/'s dw_slide,
// its AVX-512 M = 2 form): each whole block of 32 channels re-ordered to its 16 even channels,
// then its 16 odd ones; the channels past the last whole block as they are. Undefined (no tensor)
// where the ISA has no such kernel (below AVX-512), Co < 32, or the caller's `used` is false.
at::Tensor pair_layout(const float* w, int64_t lead, int64_t Co, Isa isa, bool used) {
  const int64_t nb = Co / 32;
  if (!used || nb == 0 || lead == 0 || isa < Isa::avx512) return {};
  at::Tensor out = at::empty({lead * Co}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (int64_t l = 0; l < lead; ++l, w += Co, o += Co) {  // a plain loop: at::'s permute + copy cost 8% of conv_exp
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t i = 0; i < 16; ++i) o[32 * b + i] = w[32 * b + 2 * i], o[32 * b + 16 + i] = w[32 * b + 2 * i + 1];
    for (int64_t c = 32 * nb; c < Co; ++c) o[c] = w[c];
  }
  return out;
}
const float* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

FfnArgs ffn_args(const char* op, const at::Tensor& xc, const at::Tensor& dw_w, const at::Tensor& dw_b,
                        const at::Tensor& fc1_wp, const at::Tensor& fc1_b, const at::Tensor& fc2_wp,
                        const at::Tensor& fc2_b, const at::Tensor& gamma) {
  FfnArgs a;
  a.B = xc.size(0), a.H = xc.size(1), a.W = xc.size(2), a.C = xc.size(3);
  const int64_t C = a.C;
  TORCH_CHECK(dw_w.dim() == 3 && dw_w.size(0) == dw_w.size(1) && dw_w.size(0) % 2 == 1, op,
              ": dw_w must be (K, K, C) with odd K, got ", dw_w.sizes());
  TORCH_CHECK(fc1_b.dim() == 1 && fc1_b.size(0) > 0, op, ": fc1_b must be 1-D (Hd), Hd > 0, got ", fc1_b.sizes());
  a.K = dw_w.size(0), a.Hd = fc1_b.size(0);
  const int64_t Hd = a.Hd;
  TORCH_CHECK(fc1_wp.device().is_cpu() && fc2_wp.device().is_cpu(), op, ": weights must be CPU tensors");
  a.isa = active_isa();
  const std::string name = op;
  a.dp = fc1_wp.scalar_type() == at::kBFloat16 || fc2_wp.scalar_type() == at::kBFloat16;
  if (a.dp) {
    check_packed_bf16(fc1_wp, Hd, C, (name + ": fc1_wp").c_str(), "fc1_w");
    check_packed_bf16(fc2_wp, C, Hd, (name + ": fc2_wp").c_str(), "fc2_w");
    check_dp_call(xc.scalar_type(), a.isa, op);
  } else {  // pack_linear's panels of fc1_w (Hd, C) and fc2_w (C, Hd)
    TORCH_CHECK(fc1_wp.scalar_type() == at::kFloat && fc1_wp.is_contiguous() &&
                    fc1_wp.sizes() == at::IntArrayRef({packed::panels(Hd), C, packed::kPanel}),
                op, ": fc1_wp must be pack_linear(fc1_w), float32 (", packed::panels(Hd), ", ", C, ", ", packed::kPanel,
                "), got ", fc1_wp.scalar_type(), " ", fc1_wp.sizes());
    TORCH_CHECK(fc2_wp.scalar_type() == at::kFloat && fc2_wp.is_contiguous() &&
                    fc2_wp.sizes() == at::IntArrayRef({packed::panels(C), Hd, packed::kPanel}),
                op, ": fc2_wp must be pack_linear(fc2_w), float32 (", packed::panels(C), ", ", Hd, ", ", packed::kPanel,
                "), got ", fc2_wp.scalar_type(), " ", fc2_wp.sizes());
  }
  const int64_t Hdp = packed::padded_width(Hd), Cp = packed::padded_width(C);
  a.dw_w = as_f32(dw_w, (name + ": dw_w").c_str(), {a.K, a.K, C});
  a.dw_b = as_f32(dw_b, (name + ": dw_b").c_str(), {C});
  a.b1 = padded_f32(fc1_b, (name + ": fc1_b").c_str(), Hd, Hdp);
  a.b2 = padded_f32(fc2_b, (name + ": fc2_b").c_str(), C, Cp);
  a.g = padded_f32(gamma, (name + ": gamma").c_str(), C, Cp);
  a.pdw = a.dw_w.data_ptr<float>(), a.pdb = a.dw_b.data_ptr<float>(), a.pb1 = a.b1.data_ptr<float>();
  a.pb2 = a.b2.data_ptr<float>(), a.pg = a.g.data_ptr<float>();
  a.w1p = fc1_wp.data_ptr();
  a.w2p = fc2_wp.data_ptr();
  return a;
}


}  // namespace fastvlm
