// The kernels' own AVX2 instantiation of csrc/ffn_impl.h and attn_impl.h (as csrc/ffn.cpp's
// ffn_avx2), in namespace avx2, for the standalone check programs of scripts/ (built with -Icsrc).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "gelu.h"

namespace avx2 {
#define FVK_VL 8
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
#define FVK_VMIN(a, b) __builtin_ia32_minps256((a), (b))
#define FVK_VMAX(a, b) __builtin_ia32_maxps256((a), (b))
#include "ffn_impl.h"
#include "attn_impl.h"
}  // namespace avx2
