// The AVX2 kernels: csrc/kernels/ on 8-float vectors, compiled for AVX2 + FMA, in namespace
// fastvlm::isa_avx2.
#include "isa/prelude.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace fastvlm {
namespace isa_avx2 {
#define FVK_VL 8
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
#define FVK_VMIN(a, b) __builtin_ia32_minps256((a), (b))
#define FVK_VMAX(a, b) __builtin_ia32_maxps256((a), (b))
#include "isa/instantiate_f32.h"
}  // namespace isa_avx2
}  // namespace fastvlm
#pragma GCC pop_options
