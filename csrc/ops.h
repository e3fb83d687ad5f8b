// The CPU ops at the ATen boundary: one function per fused op (csrc/ops/<op>.cpp), plus the weight
// packing (ops/packing.cpp) and the multiply-add peak (ops/peak.cpp). register.cpp registers them
// as torch.ops.fastvlm_C.*.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>

namespace fastvlm {
at::Tensor dwconv_nhwc(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       int64_t stride, int64_t padding, bool gelu);
at::Tensor convffn_nhwc(const at::Tensor& x, const at::Tensor& dw_w, const at::Tensor& dw_b, const at::Tensor& fc1_wp,
                        const at::Tensor& fc1_b, const at::Tensor& fc2_wp, const at::Tensor& fc2_b,
                        const at::Tensor& gamma);
at::Tensor repmixer_nhwc(const at::Tensor& x, const at::Tensor& mix_w, const at::Tensor& mix_b,
                         const at::Tensor& dw_w, const at::Tensor& dw_b, const at::Tensor& fc1_wp,
                         const at::Tensor& fc1_b, const at::Tensor& fc2_wp, const at::Tensor& fc2_b,
                         const at::Tensor& gamma);
at::Tensor pack_linear(const at::Tensor& w);
at::Tensor pack_linear_bf16(const at::Tensor& w);
at::Tensor stem_nhwc(const at::Tensor& x, const at::Tensor& w0, const at::Tensor& b0, const at::Tensor& w1,
                     const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2);
at::Tensor patch_embed_nhwc(const at::Tensor& x, const at::Tensor& dw_w, const at::Tensor& dw_b,
                            const at::Tensor& pw_w, const at::Tensor& pw_b, int64_t stride);
at::Tensor attention_mixer_nhwc(const at::Tensor& x, const at::Tensor& ln_w, const at::Tensor& ln_b,
                                const at::Tensor& qkv_w, const at::Tensor& proj_w, const at::Tensor& proj_b,
                                const at::Tensor& gamma, int64_t head_dim);
at::Tensor conv_exp_nhwc(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& se_r_w,
                         const at::Tensor& se_r_b, const at::Tensor& se_e_w, const at::Tensor& se_e_b);
double peak_gflops(bool bf16_dot, double seconds, int64_t reps);
}
