// Vector math of the CPU kernels, written once against a GCC vector type `vf` of VL floats and
// compiled once per ISA (csrc/isa/*.cpp include kernels.h inside their own namespace and `#pragma GCC
// target` region: AVX-512 with VL = 16, AVX2 with VL = 8, SSE with VL = 4). Like every header of
// csrc/kernels/, it is plain C++ and GCC vector extensions only (no torch, no intrinsics headers, no
// library calls), so it compiles under any target pragma. Optional hooks replace the portable forms
// where an ISA's translation unit defines them: FVK_LD_BF16(p) (VL bf16 -> floats; GCC lowers the
// portable 16-lane widening as two 256-bit halves), FVK_CVT_BF16(v) (floats -> bf16, round to
// nearest even: VCVTNEPS2BF16 on AVX512_BF16), FVK_VMIN(a, b) / FVK_VMAX(a, b) (the ISA's minps /
// maxps: a < b ? a : b, b when either is NaN; and a > b ? a : b likewise) for clamp_sym.
//
// Holds: the micro-tile shape (VL, NR, MR), loads and stores (float and bf16 storage, scalar and
// vector), exp and exp2, the exact GELU, clamps.

#ifndef FVK_VL
#error "define FVK_VL (and the vf / vi types) before including kernels.h"
#endif
#ifndef FVK_GELU_BODY
#error "include gelu.h (outside any namespace) before kernels.h"
#endif

typedef float vfu __attribute__((vector_size(FVK_VL * 4), aligned(4)));  // unaligned access

constexpr int VL = FVK_VL;
constexpr int NR = 2 * VL;  // pixels per micro-tile (two vectors)
constexpr int MR = 6;       // output channels per micro-tile (MR x 2 accumulators)

static inline vf vload(const float* p) { return *reinterpret_cast<const vfu*>(p); }
static inline void vstore(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
static inline vf vset(float s) { return vf{} + s; }  // for constants and per-call values only

// z clamped to [lo, hi] (lo < hi), a NaN z kept: exactly `z > hi ? hi : z`, then `z < lo ? lo : z`.
// With FVK_VMIN / FVK_VMAX (csrc/isa/: the ISA's minps / maxps, which return their second operand when
// either is NaN) that is one instruction each; GCC lowers the portable selects against a constant
// bound as a compare and a blend each (in standalone loops on the Zen 3 of bench/results/zen3, bitwise
// the same results: the GELU 12.6 -> 10.8 cycles per AVX2 vector, vexp 3.0 -> 2.5 ns).
static inline vf vmin_hi(vf z, vf hi) {  // z > hi ? hi : z
#if defined(FVK_VMIN)
  return FVK_VMIN(hi, z);
#else
  return z > hi ? hi : z;
#endif
}
static inline vf vmax_lo(vf z, vf lo) {  // z < lo ? lo : z
#if defined(FVK_VMAX)
  return FVK_VMAX(lo, z);
#else
  return z < lo ? lo : z;
#endif
}
static inline vf vclamp(vf z, vf lo, vf hi) { return vmax_lo(vmin_hi(z, hi), lo); }
static inline vf clamp_sym(vf z, vf hi) { return vclamp(z, -hi, hi); }  // gelu.h's CLAMP

// exp(x) for x in [-87, 88]: 2^n * p(r), Cody-Waite reduction, degree-6 polynomial (~2 ulp).
static inline vf vexp(vf x) {
  x = vclamp(x, vset(-87.f), vset(88.f));
  const vf magic = vset(12582912.f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  vf t = x * vset(1.44269504088896341f) + magic;
  vf n = t - magic;
  vf r = x - n * vset(0.693145751953125f);
  r = r - n * vset(1.428606765330187e-06f);
  vf p = vset(1.f / 720);
  p = p * r + vset(1.f / 120);
  p = p * r + vset(1.f / 24);
  p = p * r + vset(1.f / 6);
  p = p * r + vset(0.5f);
  p = p * r + vset(1.f);
  p = p * r + vset(1.f);
  vi ni = (vi)t - (vi)magic;  // vector casts of equal size reinterpret the bits
  vi bits = (vi)p + (ni << 23);
  return (vf)bits;
}

// 2^x for x <= 0 (attention's softmax: log2(e) is folded into q's scale, so its arguments are
// differences of base-2 scores), NaN kept, ~1.2e-7 relative error. x is clamped below at -125, where
// 2^x is still a normal float; n = round(x), r = x - n in [-0.5, 0.5] exactly; 2^r by a degree-6
// minimax polynomial, evaluated in two levels of r^2 (a chain of 4 multiply-adds instead of 6).
// Against vexp: no upper clamp, no Cody-Waite multiply-adds; 2.6 -> 2.0 ns per AVX2 vector in the
// softmax's load / exp / store / sum loop (scripts/softmax_check.cpp, on the Zen 3 of bench/results/zen3).
static inline vf vexp2_neg(vf x) {
  x = vmax_lo(x, vset(-125.f));  // a NaN x kept
  const vf magic = vset(12582912.f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  const vf t = x + magic;
  const vf r = x - (t - magic), r2 = r * r;
  const vf a = r * vset(6.93147206e-01f) + vset(1.f), b = r * vset(5.55032878e-02f) + vset(2.40226469e-01f);
  vf c = r * vset(1.33999314e-03f) + vset(9.61848896e-03f);
  c = r2 * vset(1.53458118e-04f) + c;
  const vf p = (c * r2 + b) * r2 + a;
  vi ni = (vi)t - (vi)magic;
  return (vf)((vi)p + (ni << 23));
}

// Exact-form GELU (gelu.h: erf by a rational approximation; max error 9.5e-7 on [-10, 10] in float32).
static inline vf vgelu(vf x) {
  vf fvk_gelu_out;
  FVK_GELU_BODY(vf, x, vset(1.f), clamp_sym);
  return fvk_gelu_out;
}

// GELU for a value rounded to bf16 right after: with 16 lanes gelu.h's piecewise x Phi(x) (|error| <=
// 2.9e-6 max(1, |x|); a table of 32 entries is two vectors, looked up with __builtin_shuffle, which
// GCC lowers to one VPERMT2PS on AVX-512), else its rational bf16-output form (3.4e-6).
#if FVK_VL == 16
static inline vf vtable32(const float* t, vi i) { return __builtin_shuffle(vload(t), vload(t + VL), i); }
static inline vf vgelu_bf16(vf x) {
  using namespace ::fastvlm::gelu_bf16_pw;
  const vf t = vmin_hi(x, vset(kHi));  // NaN stays NaN; +inf becomes kHi, where Phi = 1
  const vf v = vmax_lo(t * vset(kInvH) + vset(kMid + kMagic), vset(kMagic));  // i in the low 5 bits
  const vi i = (vi)v;
  vf p = vtable32(C3, i) * t + vtable32(C2, i);
  p = p * t + vtable32(C1, i);
  p = p * t + vtable32(C0, i);
  return x * p;
}
#else
static inline vf vgelu_bf16(vf x) {
  vf fvk_gelu_out;
  FVK_GELU_BF16_BODY(vf, x, vset(1.f), clamp_sym);
  return fvk_gelu_out;
}
#endif

// Storage <-> float. bf16 is carried as uint16_t bits; the store rounds to nearest even.
static inline float ld(const float* p, int64_t i) { return p[i]; }
static inline float ld(const uint16_t* p, int64_t i) {
  uint32_t b = static_cast<uint32_t>(p[i]) << 16;
  float f;
  __builtin_memcpy(&f, &b, 4);
  return f;
}
static inline void st(float* p, int64_t i, float v) { p[i] = v; }
static inline void st(uint16_t* p, int64_t i, float v) {
  uint32_t b;
  __builtin_memcpy(&b, &v, 4);
  if (v != v) {
    p[i] = 0x7FC0;  // NaN stays NaN
    return;
  }
  p[i] = static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

// bf16 <-> float on whole vectors (bf16 bits in uint16; round to nearest even, NaN kept).
typedef uint16_t vh __attribute__((vector_size(FVK_VL * 2), aligned(2)));
typedef uint32_t vu __attribute__((vector_size(FVK_VL * 4)));
static inline vf vld(const float* p) { return vload(p); }
static inline vf vld(const uint16_t* p) {
#ifdef FVK_LD_BF16  // the ISA's one-instruction widening (csrc/isa/)
  return FVK_LD_BF16(p);
#else
  const vu u = __builtin_convertvector(*reinterpret_cast<const vh*>(p), vu) << 16;
  return (vf)u;
#endif
}
static inline void vst(float* p, vf v) { vstore(p, v); }
// v rounded to bf16 (nearest even), as the high half of each lane's float bits (NaN not special-cased).
static inline vu vround_hi(vf v) {
  const vu b = (vu)v;
  return (b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u;
}
static inline void vst(uint16_t* p, vf v) {
#ifdef FVK_CVT_BF16  // the ISA's conversion instruction (csrc/isa/): same rounding, fewer instructions
  const auto r = FVK_CVT_BF16(v);
  static_assert(sizeof r == sizeof(vh), "one bf16 per lane");
  __builtin_memcpy(p, &r, sizeof r);
#else
  vu r = vround_hi(v) >> 16;
  r = (v != v) ? vu{} + 0x7FC0u : r;
  *reinterpret_cast<vh*>(p) = __builtin_convertvector(r, vh);
#endif
}
