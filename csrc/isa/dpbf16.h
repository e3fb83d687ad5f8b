// vdpbf16ps (fvk_dpbf16, the bf16-pair multiply-add of kernels/bf16_pairs.h) and the AVX512_BF16
// hooks of kernels/vec.h. Included inside the namespace of avx512_bf16.cpp and amx.cpp, after vf;
// no include guard, on purpose.
#ifdef FASTVLM_EMULATE_AVX512
// vdpbf16ps in plain vector code, for the test build (scripts/asan.sh) on CPUs without it: a bf16
// is the high half of a float, so each product of two bf16 is exact in fp32, and adding the odd
// (high) products, then the even ones, with one rounding each, is the instruction's definition
// (Intel SDM, VDPBF16PS). Not modelled: its DAZ / FTZ (denormal inputs and results flushed to 0).
static inline vf fvk_dpbf16(vf acc, uint32_t a2, vf w) {
  typedef uint32_t vu16 __attribute__((vector_size(64)));
  const vu16 wu = (vu16)w;
  const vf w_even = (vf)(wu << 16), w_odd = (vf)(wu & 0xFFFF0000u);
  const uint32_t lo = a2 << 16, hi = a2 & 0xFFFF0000u;
  float a_even, a_odd;
  __builtin_memcpy(&a_even, &lo, 4);
  __builtin_memcpy(&a_odd, &hi, 4);
  acc = acc + a_odd * w_odd;
  return acc + a_even * w_even;
}
#else
static inline vf fvk_dpbf16(vf acc, uint32_t a2, vf w) {
  return (vf)_mm512_dpbf16_ps((__m512)acc, (__m512bh)_mm512_set1_epi32(static_cast<int>(a2)), (__m512bh)w);
}
// Vector stores to bf16 (vec.h's vst) through VCVTNEPS2BF16: round to nearest even, like the
// portable form, in one instruction instead of about seven (the fc1 + GELU epilogue's hidden rows:
// GELU + store 25 -> 20 cycles per vector, measured). Differs from the portable form only where no
// test data goes: float32 denormals become signed zeros (the instruction's DAZ) and a NaN keeps its
// payload's top bits (quiet) instead of becoming 0x7FC0.
#define FVK_CVT_BF16(v) _mm512_cvtneps_pbh((__m512)(v))
#define FVK_LD_BF16(p) FVK_LD_BF16_AVX512(p)
#define FVK_VMIN FVK_VMIN_AVX512
#define FVK_VMAX FVK_VMAX_AVX512
#endif
