
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

// fastvlm_C::pack_linear -- an (N, K) nn.Linear / 1x1 conv weight (float32 or bfloat16) -> the
// float32 panels the ConvFFN GEMMs read: (P, K, 16), P = packed::panels(N), out[p][k][i] =
// w[16p + i][k] (zero where 16p + i >= N). The same layout for every ISA.
at::Tensor pack_linear(const at::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu(), "pack_linear: w must be a CPU tensor, got ", w.device());
  TORCH_CHECK(w.dim() == 2, "pack_linear: w must be 2-D (N, K), got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16,
              "pack_linear: w must be float32 or bfloat16, got ", w.scalar_type());
  const int64_t N = w.size(0), K = w.size(1), P = packed::panels(N);
  const at::Tensor wf = w.to(at::kFloat).contiguous();
  at::Tensor out = at::zeros({P, K, packed::kPanel}, wf.options());
  const float* src = wf.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t i = 0; i < packed::kPanel && p * packed::kPanel + i < N; ++i) {
        const float* row = src + (p * packed::kPanel + i) * K;
        float* col = dst + p * K * packed::kPanel + i;
        for (int64_t k = 0; k < K; ++k) col[k * packed::kPanel] = row[k];
      }
  });
  return out;
}

// fastvlm_C::pack_linear_bf16 -- an (N, K) weight (float32 or bfloat16; float32 is rounded to
// nearest even) -> the bf16-pair panels of the AVX512_BF16 GEMMs (kernels/bf16_pairs.h): bfloat16
// (P, ceil(K / 2), 32), out[p][j][2i + e] = w[16p + i][2j + e], zero padded (channels past N, and
// k = K for an odd K).
at::Tensor pack_linear_bf16(const at::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu(), "pack_linear_bf16: w must be a CPU tensor, got ", w.device());
  TORCH_CHECK(w.dim() == 2, "pack_linear_bf16: w must be 2-D (N, K), got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16,
              "pack_linear_bf16: w must be float32 or bfloat16, got ", w.scalar_type());
  const int64_t N = w.size(0), K = w.size(1), P = packed::panels(N), KP = (K + 1) / 2;
  const at::Tensor wh = w.to(at::kBFloat16).contiguous();
  at::Tensor out = at::zeros({P, KP, 2 * packed::kPanel}, wh.options());
  const auto* src = reinterpret_cast<const uint16_t*>(wh.data_ptr());
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t i = 0; i < packed::kPanel && p * packed::kPanel + i < N; ++i) {
        const uint16_t* row = src + (p * packed::kPanel + i) * K;
        uint16_t* col = dst + p * KP * 2 * packed::kPanel + 2 * i;
        for (int64_t k = 0; k < K; ++k) col[(k / 2) * 2 * packed::kPanel + (k & 1)] = row[k];
      }
  });
  return out;
}

}  // namespace fastvlm
