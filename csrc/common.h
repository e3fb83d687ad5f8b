// DenormalsFlushed: the MXCSR guard every parallel region of the ops opens per thread.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>  // _mm_getcsr / _mm_setcsr (SSE: every x86-64 CPU)
#endif

namespace fastvlm {

// Flush-to-zero and denormals-are-zero on the calling thread for the guard's lifetime; the thread's
// MXCSR is restored on exit (also when a check throws), so torch's own kernels run on the caller's
// and the pool threads' settings afterwards. Every parallel region that computes opens one per
// thread (dispatch.h's parallel_tiles; not the weight packing's copies).
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

}  // namespace fastvlm
