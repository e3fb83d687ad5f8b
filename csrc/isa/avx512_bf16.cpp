// AVX-512 + AVX512_BF16: the bf16 ops whose GEMMs multiply bf16 pairs with vdpbf16ps
// (kernels/bf16_pairs.h, weights from pack_linear_bf16), in namespace fastvlm::isa_avx512_bf16. The
// fp32 kernels it includes are for bf16_pairs.h to call (internal here: FVK_ENTRY is static); a
// float32 model on this ISA runs isa_avx512's. Emulated on AVX2 in the test build, as avx512.cpp.
#include "isa/prelude.h"
#include "isa/avx512_hooks.h"

#pragma GCC push_options
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#ifdef FASTVLM_EMULATE_AVX512
#pragma GCC target("avx2,fma")
#else
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,fma")
#endif
namespace fastvlm {
namespace isa_avx512_bf16 {
#define FVK_VL 16
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
#include "isa/dpbf16.h"
#define FVK_ENTRY static
#include "kernels/kernels.h"
#include "kernels/bf16_pairs.h"
extern const int dp_chain_flops = DP_CHAIN_FLOPS;
#define FVK_API_BF16_PAIRS
#include "kernel_api.h"
}  // namespace isa_avx512_bf16
}  // namespace fastvlm
#pragma GCC diagnostic pop
#pragma GCC pop_options
