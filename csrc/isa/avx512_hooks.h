// The AVX-512 instructions that replace portable forms of kernels/vec.h (its FVK_* hooks), for the
// AVX-512 translation units (avx512.cpp, avx512_bf16.cpp, amx.cpp). Not used by the emulated test
// build (FASTVLM_EMULATE_AVX512), which compiles the 16-float code for AVX2.
#pragma once
// GCC 12 reports -Wmaybe-uninitialized inside its own avx512fintrin.h wherever _mm512_min_ps /
// _mm512_max_ps are inlined (their _mm512_undefined_ps start value); the values are never read.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#ifndef FASTVLM_EMULATE_AVX512
#include <immintrin.h>  // _mm512_dpbf16_ps, the bf16 loads and stores, min / max
#endif

// 16 bf16 -> 16 floats in two instructions (vpmovzxwd m256 -> zmm, vpslld). The portable form in
// vec.h (__builtin_convertvector of 16 uint16 to uint32, then << 16) is lowered by GCC as two
// 256-bit halves (vpmovzxwd, vextracti32x4, vpmovzxwd, vinserti32x8): the RepMixer's bf16 3x3
// spent most of its samples there. (The zero-masking form with a full mask: the unmasked intrinsics
// start from _mm512_undefined_epi32, which GCC 12 reports as maybe-uninitialized at every use.)
#define FVK_LD_BF16_AVX512(p) \
  ((vf)((vu)_mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))) << 16))

// The ISA's minps / maxps for vec.h's clamp_sym (the GELU's clamp): a < b ? a : b (a > b ? a : b),
// the second operand when either is NaN, as the portable selects give.
#define FVK_VMIN_AVX512(a, b) ((vf)_mm512_min_ps((__m512)(a), (__m512)(b)))
#define FVK_VMAX_AVX512(a, b) ((vf)_mm512_max_ps((__m512)(a), (__m512)(b)))
