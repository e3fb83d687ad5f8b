// AVX-512 + AVX512_BF16 + AMX: the bf16-pair kernels of avx512_bf16.cpp with their GEMMs on AMX tiles
// (kernels/amx.h, through bf16_pairs.h's FVK_PGEMM_DP), in namespace fastvlm::isa_amx. Not built on
// the emulated test build (FASTVLM_EMULATE_AVX512): there is nothing to emulate tiles with.
#ifndef FASTVLM_EMULATE_AVX512
#include "isa/prelude.h"
#include "isa/avx512_hooks.h"

#pragma GCC push_options
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,fma,amx-tile,amx-bf16")
namespace fastvlm {
namespace isa_amx {
#define FVK_VL 16
#define FVK_AMX 1
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
#include "isa/dpbf16.h"
#define FVK_ENTRY static
#include "kernels/kernels.h"
#include "kernels/bf16_pairs.h"
extern const int dp_chain_flops = DP_CHAIN_FLOPS;
extern const int amx_chain_flops = AMX_CHAIN_FLOPS;
#define FVK_API_BF16_PAIRS
#define FVK_API_AMX
#include "kernel_api.h"
}  // namespace isa_amx
}  // namespace fastvlm
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif  // FASTVLM_EMULATE_AVX512
