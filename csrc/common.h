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

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>  // _mm_getcsr / _mm_setcsr (SSE: every x86-64 CPU)
#endif

namespace fastvlm {

// Flush-to-zero and denormals-are-zero on the calling thread for the guard's lifetime; the thread's
// MXCSR is restored on exit (also when a check throws), so torch's own kernels run on the caller's
// and the pool threads' settings afterwards. Every parallel region that computes opens one per
// thread (ffn.cpp's parallel_tiles, dwconv.cpp's generic loop; not the weight packing's copies).
// Why: a float32 denormal operand or result costs a microcode assist of about a hundred cycles on
// x86 cores; FastViTHD's SE gate saturates (sigmoid of a large negative input is about 1e-38) on
// the random-weight tower, and conv_exp then spent 7.1 ms instead of 0.6-1.1 ms on the denormal
// products of its gate and GELU (2 threads, the Xeon of bench/results). The results differ from
// unflushed arithmetic only where a value below 1.18e-38 in magnitude (FLT_MIN) is read or
// produced: it is taken as, or becomes, a signed zero. AMX and vdpbf16ps flush anyway.
class DenormalsFlushed {
 public:
#if defined(__x86_64__) || defined(__i386__)
  DenormalsFlushed() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFtzDaz); }
  ~DenormalsFlushed() { _mm_setcsr(saved_); }
#endif
  DenormalsFlushed(const DenormalsFlushed&) = delete;
  DenormalsFlushed& operator=(const DenormalsFlushed&) = delete;

 private:
#if defined(__x86_64__) || defined(__i386__)
  static constexpr unsigned kFtzDaz = 0x8040;  // MXCSR bits 15 (FTZ) and 6 (DAZ)
  unsigned saved_;
#endif
};

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
