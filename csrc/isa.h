// Run-time choice of the vector ISA for the hand-vectorised kernels.
#pragma once
#include <cstdlib>
#include <cstring>

namespace fastvlm {

enum class Isa { sse = 0, avx2 = 1, avx512 = 2 };

// The widest ISA this CPU supports, capped by FASTVLM_CPU_ISA=sse|avx2|avx512 (read per call, so
// tests can force a path).
inline Isa active_isa() {
  Isa best = Isa::sse;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::avx2;
#ifdef FASTVLM_EMULATE_AVX512  // the test build of ffn.cpp: the AVX-512 path compiled for AVX2
  if (best == Isa::avx2) best = Isa::avx512;
#endif
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    best = Isa::avx512;
#endif
  if (const char* env = std::getenv("FASTVLM_CPU_ISA")) {
    Isa want = best;
    if (!std::strcmp(env, "sse")) want = Isa::sse;
    if (!std::strcmp(env, "avx2")) want = Isa::avx2;
    if (!std::strcmp(env, "avx512")) want = Isa::avx512;
    if (static_cast<int>(want) < static_cast<int>(best)) best = want;
  }
  return best;
}

inline const char* isa_name(Isa i) { return i == Isa::avx512 ? "avx512" : (i == Isa::avx2 ? "avx2" : "sse"); }

}  // namespace fastvlm
