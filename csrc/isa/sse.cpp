// The baseline kernels: csrc/kernels/ on 4-float vectors, compiled for the build's default target
// (SSE2 on x86-64; any GCC target elsewhere), in namespace fastvlm::isa_sse.
#include "isa/prelude.h"

namespace fastvlm {
namespace isa_sse {
#define FVK_VL 4
typedef float vf __attribute__((vector_size(16)));
typedef int32_t vi __attribute__((vector_size(16)));
#if defined(__x86_64__)  // SSE is part of x86-64
#define FVK_VMIN(a, b) __builtin_ia32_minps((a), (b))
#define FVK_VMAX(a, b) __builtin_ia32_maxps((a), (b))
#endif
#include "isa/instantiate_f32.h"
}  // namespace isa_sse
}  // namespace fastvlm
