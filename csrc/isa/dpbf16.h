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
// The bf16 attention's softmax numerators (bf16_pairs.h, attn_tile_dp): FVK_PAIR_PACK(p0, p1), the
// pairs (bf16(p0[i]) low, bf16(p1[i]) high) per 32-bit lane, round to nearest even (VCVTNE2PS2BF16,
// then VPERMW interleaves its halves; the portable form takes about a dozen integer operations);
// FVK_PAIR_SUM(l, pr) = (l + high) + low of each lane, by vdpbf16ps with the pair (1, 1) (the products
// are exact). The portable form rounds the same way and adds in the order the SDM defines for the
// instruction; p >= 2^-125 is normal, so its DAZ / FTZ do not apply.
static inline vf fvk_pair_pack(vf p0, vf p1) {
  const __m512i lo_hi = (__m512i)_mm512_cvtne2ps_pbh((__m512)p1, (__m512)p0);  // bf16(p0) low half, bf16(p1) high
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                       21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return (vf)_mm512_permutexvar_epi16(idx, lo_hi);
}
#define FVK_PAIR_PACK(p0, p1) fvk_pair_pack(p0, p1)
#define FVK_PAIR_SUM(l, pr) \
  ((vf)_mm512_dpbf16_ps((__m512)(l), (__m512bh)(pr), (__m512bh)_mm512_set1_epi32(0x3F803F80)))
#define FVK_LD_BF16(p) FVK_LD_BF16_AVX512(p)
#define FVK_VMIN FVK_VMIN_AVX512
#define FVK_VMAX FVK_VMAX_AVX512
#endif
