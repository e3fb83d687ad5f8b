// Shared helpers of the CPU kernels: scalar conversions, exact GELU, ISA cloning.
#pragma once
#include <c10/util/BFloat16.h>
#include <cmath>
#include <cstdint>
#include <cstring>

#define FVK_INLINE inline __attribute__((always_inline))

// Compile a function once per ISA; the loader (ifunc) picks the best one the running CPU supports,
// so one build runs on CPUs with and without AVX-512. Set FASTVLM_NO_CLONES to build one generic copy.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FASTVLM_NO_CLONES)
#define FVK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FVK_CLONES
#endif

namespace fastvlm {

FVK_INLINE float to_float(float v) { return v; }
FVK_INLINE float to_float(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename T>
FVK_INLINE T from_float(float v);
template <>
FVK_INLINE float from_float<float>(float v) { return v; }
template <>
FVK_INLINE c10::BFloat16 from_float<c10::BFloat16>(float v) { return c10::BFloat16(v); }  // round to nearest even

}  // namespace fastvlm
