// The ATen-side helpers that several ops share: argument checks (with errors that name the op and
// the argument), float32 copies of small weights, the tiling of the GEMM ops, the ConvFFN's arguments
// (convffn and repmixer), and the depthwise pair layout. Definitions in common.cpp.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "isa.h"

namespace fastvlm {

// A weight as contiguous float32, after checking it (`name` reads e.g. "convffn_nhwc: fc1_w").
at::Tensor as_f32(const at::Tensor& t, const char* name, at::IntArrayRef shape);
// A per-channel vector as float32, zero padded to `padded` floats (the kernels read whole vectors).
at::Tensor padded_f32(const at::Tensor& t, const char* name, int64_t n, int64_t padded);
// x (B, H, W, C), float32 or bfloat16, checked; returned contiguous.
at::Tensor checked_nhwc(const at::Tensor& x, const char* op);

// pack_linear's panels of an (N, K) weight, checked ("<what> must be pack_linear() of ...").
void check_packed(const at::Tensor& wp, int64_t N, int64_t K, const char* what);
// pack_linear_bf16's pair panels of an (N, K) weight, checked ("<what> must be pack_linear_bf16(<name>)").
void check_packed_bf16(const at::Tensor& wp, int64_t N, int64_t K, const char* what, const char* name);
// An op handed pack_linear_bf16 weights runs the bf16-pair kernels: bf16 x, and that ISA active.
void check_dp_call(at::ScalarType dtype, Isa isa, const char* op);

// The tiling of the 1x1-GEMM ops (see common.cpp): n tiles per image of at most T pixels.
struct Tiling {
  int64_t n, T;
};
Tiling gemm_tiling(int64_t B, int64_t HW);

// A depthwise weight or bias in the pair layout of the multiplier-2 sliding kernels (see common.cpp);
// undefined where unused. data_or_null: its data, or null.
at::Tensor pair_layout(const float* w, int64_t lead, int64_t Co, Isa isa, bool used);
const float* data_or_null(const at::Tensor& t);

// The ConvFFN arguments of convffn_nhwc and repmixer_nhwc, checked against x (B, H, W, C), with the
// small ones as the float32 (padded) copies the kernels read. The weights' packing picks the
// kernels: bf16-pair panels (pack_linear_bf16) the bf16-pair ones (bf16 x only), float32 panels
// (pack_linear) those of the active ISA.
struct FfnArgs {
  int64_t B, H, W, C, K, Hd;
  Isa isa;
  bool dp;
  at::Tensor dw_w, dw_b, b1, b2, g;  // float32: (K, K, C), (C), then padded to Hdp, Cp, Cp
  const float *pdw, *pdb, *pb1, *pb2, *pg;  // their data
  const void *w1p, *w2p;
};
FfnArgs ffn_args(const char* op, const at::Tensor& xc, const at::Tensor& dw_w, const at::Tensor& dw_b,
                 const at::Tensor& fc1_wp, const at::Tensor& fc1_b, const at::Tensor& fc2_wp, const at::Tensor& fc2_b,
                 const at::Tensor& gamma);

}  // namespace fastvlm
