// The AVX-512 kernels: csrc/kernels/ on 16-float vectors, compiled for AVX-512F/DQ/BW/VL + FMA, in
// namespace fastvlm::isa_avx512. Also the fp32-GEMM kernels that avx512_bf16 and amx_bf16 run for
// float32 models (dispatch.h). On the test build FASTVLM_EMULATE_AVX512 (scripts/asan.sh on CPUs
// without AVX-512) the same 16-float code is compiled for AVX2, each 512-bit operation lowered to two
// 256-bit ones, so the AVX-512 path's own logic (32-channel micro-tiles, 16-lane tails and shuffles,
// its panel and scratch bounds) runs and is checked on any AVX2 machine; isa.h then offers it.
#include "isa/prelude.h"
#include "isa/avx512_hooks.h"

#pragma GCC push_options
#ifdef FASTVLM_EMULATE_AVX512
#pragma GCC target("avx2,fma")
#else
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,fma")
#endif
namespace fastvlm {
namespace isa_avx512 {
#define FVK_VL 16
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
#ifndef FASTVLM_EMULATE_AVX512
#define FVK_LD_BF16(p) FVK_LD_BF16_AVX512(p)
#define FVK_VMIN FVK_VMIN_AVX512
#define FVK_VMAX FVK_VMAX_AVX512
#endif
#include "isa/instantiate_f32.h"
}  // namespace isa_avx512
}  // namespace fastvlm
#pragma GCC pop_options
