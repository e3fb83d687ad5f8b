// Exact-form GELU, 0.5 x (1 + erf(x / sqrt 2)), with erf(z) = z P(z^2) / Q(z^2) on |z| <= 3.925
// (erf rounds to +-1 in float32 beyond): a rational approximation fitted (weighted least squares
// on 20000 points of [0, 3.925]) for this project. |error| 1.7e-8 in exact arithmetic (A&S 7.1.26,
// used before, has 1.5e-7 plus evaluation error and needs an exp).
// Evaluated in x itself: with u = x clamped to |u| <= 3.925 sqrt 2,
//   GELU(x) = x (0.5 + u A(u^2) / B(u^2)),  A_i = P_i / (2 sqrt 2 2^i),  B_i = Q_i / 2^i,
// the same rational function with the 1/sqrt 2 and the 0.5 folded into its coefficients, written
// x * r + x * 0.5 (one multiply-add: -inf * r + -inf is NaN, as torch's GELU gives at -inf).
// 13 multiply-adds, a min, a max and a division per vector, two operations fewer than multiplying x
// by 1/sqrt 2 first and computing 0.5 x (1 + erf) (scripts/gelu_check.cpp: 3.00 -> 2.77 ns per
// AVX2 vector on the Zen 3 of bench/results/zen3); max |error| against float64 over [-10, 10]
// 9.5e-7 (1.1e-6 before), 1.9e-7 relative to max(1, |x|). NaN propagates.
#pragma once

namespace fastvlm { namespace gelu_coef {
// the fit (double), then the folded float coefficients of A and B
constexpr double kZ = 3.925, kP[6] = {1.1283790199279404, 0.19296924209454605, 0.0530839171173151,
                                      0.0038762051168986984, 0.0002874911811024429, 2.0308990368311797e-06};
constexpr double kQ[6] = {1.0, 0.5043461771171013, 0.11516609335979094, 0.015188087568475454,
                          0.001189725462103654, 3.8031750312479684e-05};
constexpr double kSqrt2 = 1.4142135623730951;
constexpr float kClamp = static_cast<float>(kZ * kSqrt2);  // in x: 5.5508
constexpr float A0 = kP[0] / (2 * kSqrt2), A1 = kP[1] / (4 * kSqrt2), A2 = kP[2] / (8 * kSqrt2),
                A3 = kP[3] / (16 * kSqrt2), A4 = kP[4] / (32 * kSqrt2), A5 = kP[5] / (64 * kSqrt2);
constexpr float B1 = kQ[1] / 2, B2 = kQ[2] / 4, B3 = kQ[3] / 8, B4 = kQ[4] / 16, B5 = kQ[5] / 32;
}}  // namespace fastvlm::gelu_coef

// The same formula for a scalar float or a GCC vector of floats (`one` = 1 of that type).
// CLAMP(u, hi) must give u clamped to [-hi, hi] with a NaN u kept, exactly
// `u > hi ? hi : u` then `u < -hi ? -hi : u` (vec.h's clamp_sym: one min and one max
// instruction where the ISA has them; GCC lowers these selects against a constant bound as a
// compare and a blend each).
#define FVK_GELU_BODY(V, x, one, CLAMP)                                              \
  do {                                                                               \
    using namespace ::fastvlm::gelu_coef;                                            \
    const V u = CLAMP((x), (one) * kClamp);                                          \
    const V u2 = u * u;                                                              \
    V a = u2 * A5 + A4;                                                              \
    a = a * u2 + A3;                                                                 \
    a = a * u2 + A2;                                                                 \
    a = a * u2 + A1;                                                                 \
    a = a * u2 + A0;                                                                 \
    V b = u2 * B5 + B4;                                                              \
    b = b * u2 + B3;                                                                 \
    b = b * u2 + B2;                                                                 \
    b = b * u2 + B1;                                                                 \
    b = b * u2 + (one);                                                              \
    fvk_gelu_out = (x) * (u * a / b) + (x) * 0.5f;                                   \
  } while (0)

// The bf16-output form, for a GELU whose result is rounded to bf16 next (the bf16-pair kernels'
// fc1 and patch_embed epilogues: bf16_pairs.h, amx.h): the same shape, GELU(x) = x (0.5 + u A(u^2) /
// B(u^2)), of lower degree (A and B cubic in u^2, u = x clamped to |u| <= 4.5). Fitted for this
// project (least squares on [-12, 12], reweighted towards the minimax, error relative to
// max(1, |x|)): 3.4e-6, against bf16's half-ulp of 2^-9 = 2e-3 relative (scripts/gelu_check.cpp
// measures it). 7 multiply-adds instead of 10: 5.2 -> 3.8 ns per AVX-512 vector in an L1-resident
// loop on the Zen 4 of bench/results/zen4 (VRCP14PS instead of the division: 3.6 ns, but 2.6e-5).
// Where it and the exact form round to different bf16 values (about 1 in 1000 values), they differ
// by one bf16 ulp.
namespace fastvlm { namespace gelu_bf16_coef {
constexpr float kClamp = 4.5f;
constexpr float A0 = 0.3989486805531881f, A1 = 0.02689554779004291f, A2 = 0.0038596576027332213f,
                A3 = 3.4386456771898685e-05f;
constexpr float B1 = 0.23414188893730298f, B2 = 0.0236273121887985f, B3 = 0.0011893815369434214f;
}}  // namespace fastvlm::gelu_bf16_coef

#define FVK_GELU_BF16_BODY(V, x, one, CLAMP)                                         \
  do {                                                                               \
    using namespace ::fastvlm::gelu_bf16_coef;                                       \
    const V u = CLAMP((x), (one) * kClamp);                                          \
    const V u2 = u * u;                                                              \
    V a = u2 * A3 + A2;                                                              \
    a = a * u2 + A1;                                                                 \
    a = a * u2 + A0;                                                                 \
    V b = u2 * B3 + B2;                                                              \
    b = b * u2 + B1;                                                                 \
    b = b * u2 + (one);                                                              \
    fvk_gelu_out = (x) * (u * a / b) + (x) * 0.5f;                                   \
  } while (0)

namespace fastvlm {
inline float clamp_sym_scalar(float z, float hi) {
  z = z > hi ? hi : z;
  return z < -hi ? -hi : z;
}
// The scalar form, for channel tails and the scalar kernels (depthwise.h, conv_exp.h, patch_embed.h).
inline float gelu_scalar(float x) {
  float fvk_gelu_out;
  FVK_GELU_BODY(float, x, 1.f, clamp_sym_scalar);
  return fvk_gelu_out;
}
}  // namespace fastvlm
