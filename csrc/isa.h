// Run-time choice of the vector ISA for the hand-vectorised kernels.
#pragma once
#include <cstdlib>
#include <cstring>
#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fastvlm {

// avx512_bf16: AVX-512 plus AVX512_BF16 (vdpbf16ps). It changes bfloat16 only: the ConvFFN's fc1 / fc2,
// attention's qkv, S, P V and proj and patch_embed's 1x1 then multiply bf16 pairs with fp32
// accumulation (kernels/bf16_pairs.h; the 1x1 weights packed by pack_linear_bf16); every other kernel runs
// as on avx512.
// amx_bf16: avx512_bf16 plus AMX (AMX-TILE, AMX-BF16): the same bf16-pair GEMMs (same weights, same
// rounded operands) run on the tile unit (kernels/amx.h; TDPBF16PS, 16 x 16 x 32 per instruction),
// where their K is a multiple of 32; other K, and everything else, as on avx512_bf16.
enum class Isa { sse = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3, amx_bf16 = 4 };

// Whether this CPU and OS let this process use AMX-BF16: CPUID.(7,0):EDX bits 24 (AMX-TILE) and 22
// (AMX-BF16), XCR0 bits 17-18 (the OS manages the tile state), and on Linux the per-process
// permission for the tile data (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA; Linux 5.16+),
// requested once; without it the first tile instruction would kill the process (SIGILL).
inline bool amx_usable() {
#if defined(__linux__) && defined(__x86_64__) && defined(__GNUC__) && !defined(FASTVLM_EMULATE_AVX512)
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22))) return false;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE: xgetbv allowed
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return false;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

// The widest ISA this CPU supports, capped by FASTVLM_CPU_ISA=sse|avx2|avx512|avx512_bf16|amx_bf16
// (read per call, so tests can force a path).
inline Isa active_isa() {
  Isa best = Isa::sse;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::avx2;
#ifdef FASTVLM_EMULATE_AVX512  // the test build of csrc/isa/avx512*.cpp: the AVX-512 paths compiled for AVX2
  if (best == Isa::avx2) best = Isa::avx512_bf16;
#endif
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    if (best < Isa::avx512) best = Isa::avx512;
    if (__builtin_cpu_supports("avx512bf16")) best = Isa::avx512_bf16;
    if (best == Isa::avx512_bf16 && amx_usable()) best = Isa::amx_bf16;
  }
#endif
  if (const char* env = std::getenv("FASTVLM_CPU_ISA")) {
    Isa want = best;
    if (!std::strcmp(env, "sse")) want = Isa::sse;
    if (!std::strcmp(env, "avx2")) want = Isa::avx2;
    if (!std::strcmp(env, "avx512")) want = Isa::avx512;
    if (!std::strcmp(env, "avx512_bf16")) want = Isa::avx512_bf16;
    if (!std::strcmp(env, "amx_bf16")) want = Isa::amx_bf16;
    if (static_cast<int>(want) < static_cast<int>(best)) best = want;
  }
  return best;
}

inline const char* isa_name(Isa i) {
  switch (i) {
    case Isa::amx_bf16: return "amx_bf16";
    case Isa::avx512_bf16: return "avx512_bf16";
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "sse";
  }
}

}  // namespace fastvlm
