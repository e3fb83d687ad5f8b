// Run-time choice of the vector ISA for the hand-vectorised kernels.
#pragma once
#include <cstdlib>
#include <cstring>

namespace fastvlm {

// avx512_bf16: AVX-512 plus AVX512_BF16 (vdpbf16ps). It changes bfloat16 only: the ConvFFN's fc1 / fc2,
// attention's qkv, S, P V and proj and patch_embed's 1x1 then multiply bf16 pairs with fp32
// accumulation (ffn_dp_impl.h; the 1x1 weights packed by pack_linear_bf16); every other kernel runs
// as on avx512.
enum class Isa { sse = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3 };

// The widest ISA this CPU supports, capped by FASTVLM_CPU_ISA=sse|avx2|avx512|avx512_bf16 (read per
// call, so tests can force a path).
inline Isa active_isa() {
  Isa best = Isa::sse;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::avx2;
#ifdef FASTVLM_EMULATE_AVX512  // the test build of ffn.cpp: the AVX-512 paths compiled for AVX2
  if (best == Isa::avx2) best = Isa::avx512_bf16;
#endif
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    if (best < Isa::avx512) best = Isa::avx512;
    if (__builtin_cpu_supports("avx512bf16")) best = Isa::avx512_bf16;
  }
#endif
  if (const char* env = std::getenv("FASTVLM_CPU_ISA")) {
    Isa want = best;
    if (!std::strcmp(env, "sse")) want = Isa::sse;
    if (!std::strcmp(env, "avx2")) want = Isa::avx2;
    if (!std::strcmp(env, "avx512")) want = Isa::avx512;
    if (!std::strcmp(env, "avx512_bf16")) want = Isa::avx512_bf16;
    if (static_cast<int>(want) < static_cast<int>(best)) best = want;
  }
  return best;
}

inline const char* isa_name(Isa i) {
  switch (i) {
    case Isa::avx512_bf16: return "avx512_bf16";
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "sse";
  }
}

}  // namespace fastvlm
