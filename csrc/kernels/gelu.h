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

// The piecewise bf16-output form, which the 16-lane (AVX-512) kernels use in place of the one above
// (vec.h's vgelu_bf16): GELU(x) = x Phi(x) with Phi, the normal CDF, a cubic in x on each of 32
// intervals of width kH, its four coefficients looked up by one two-register permute each
// (VPERMT2PS). Interval i = round(x / kH + 16), clamped below at 0: interval 0 (x < -15.5 kH = -4.96)
// has Phi = 0, interval 31 (x >= 14.5 kH = 4.64) Phi = 1, and 1..30 a cubic fitted (least squares of
// its error relative to Phi) for this project by scripts/gelu_fit.py, which prints this table. With
// t = min(x, kHi),
//   GELU(x) = x (C3[i] t^3 + C2[i] t^2 + C1[i] t + C0[i])
// so GELU(+-0) = +-0, GELU(+inf) = +inf, and -inf gives NaN (-inf * 0) as torch's GELU does. Error
// relative to max(1, |x|): 2.9e-6 in float32 (the rational form above: 3.4e-6), against bf16's
// half-ulp of 2^-9 = 2e-3 relative. On normal inputs (sd 1.5) 0.23% of the values round to a
// different bf16 than the exact GELU's, by one ulp (the rational form: 0.66%). 11 operations per
// vector, 4 of them multiplies or multiply-adds, against 12 with 10 and a division for the rational
// form: 3.40 -> 2.36 ns per AVX-512 vector in an L1-resident loop (scripts/gelu_check.cpp, on the
// Zen 4 of bench/results/zen4; the 1024^2 bf16 forward 0.98x).
namespace fastvlm { namespace gelu_bf16_pw {
constexpr float kH = 0.32f, kInvH = 3.125f, kHi = 4.800000190734863f, kMid = 16.f;
constexpr float kMagic = 12582912.f;  // 1.5 * 2^23: t / kH + kMid + kMagic has i in its low 5 bits
alignas(64) constexpr float C0[32] = {
    0.000000000e+00f, 1.781187835e-03f, 5.685247481e-03f, 1.602359861e-02f, 3.977688402e-02f, 8.672353625e-02f,
    1.655780971e-01f, 2.761019766e-01f, 4.015093148e-01f, 5.100821853e-01f, 5.712530613e-01f, 5.770857334e-01f,
    5.487631559e-01f, 5.183557868e-01f, 5.032503009e-01f, 5.001052022e-01f, 5.000000000e-01f, 4.999037087e-01f,
    4.968792796e-01f, 4.820879102e-01f, 4.519380033e-01f, 4.232969284e-01f, 4.279580414e-01f, 4.874798954e-01f,
    5.947408080e-01f, 7.197815180e-01f, 8.308793306e-01f, 9.107837081e-01f, 9.587541223e-01f, 9.832401276e-01f,
    9.939974546e-01f, 1.000000000e+00f};
alignas(64) constexpr float C1[32] = {
    0.000000000e+00f, 1.057570567e-03f, 3.588785185e-03f, 1.078624185e-02f, 2.863944881e-02f, 6.697423756e-02f,
    1.374468654e-01f, 2.465079874e-01f, 3.845898211e-01f, 5.196766853e-01f, 6.068499684e-01f, 6.155853868e-01f,
    5.557757616e-01f, 4.744295478e-01f, 4.187787175e-01f, 4.003371000e-01f, 3.989405930e-01f, 4.002434909e-01f,
    4.181564748e-01f, 4.730302691e-01f, 5.541258454e-01f, 6.148667336e-01f, 6.080831289e-01f, 5.229406953e-01f,
    3.889807165e-01f, 2.507912517e-01f, 1.407635510e-01f, 6.909553707e-02f, 2.978521213e-02f, 1.131629199e-02f,
    3.800866194e-03f, 0.000000000e+00f};
alignas(64) constexpr float C2[32] = {
    0.000000000e+00f, 2.096602984e-04f, 7.568113506e-04f, 2.427471103e-03f, 6.901609711e-03f, 1.733935624e-02f,
    3.834186122e-02f, 7.423263043e-02f, 1.249439940e-01f, 1.810146421e-01f, 2.224652320e-01f, 2.267527580e-01f,
    1.845680922e-01f, 1.117584482e-01f, 4.293103144e-02f, 6.284734700e-03f, 3.985823227e-09f, -5.976949353e-03f,
    -4.194856063e-02f, -1.102961674e-01f, -1.832781881e-01f, -2.263037711e-01f, -2.231068313e-01f, -1.824697554e-01f,
    -1.266564280e-01f, -7.571726292e-02f, -3.937640414e-02f, -1.794083416e-02f, -7.199393120e-03f, -2.554628765e-03f,
    -8.040533867e-04f, 0.000000000e+00f};
alignas(64) constexpr float C3[32] = {
    0.000000000e+00f, 1.387649809e-05f, 5.330862768e-05f, 1.826022490e-04f, 5.564562744e-04f, 1.504098531e-03f,
    3.591363085e-03f, 7.530429401e-03f, 1.374239195e-02f, 2.150647342e-02f, 2.808297798e-02f, 2.876872011e-02f,
    1.883182861e-02f, -2.971325302e-03f, -3.155199066e-02f, -5.627877265e-02f, -6.619495898e-02f, -5.659854785e-02f,
    -3.206237778e-02f, -3.477767343e-03f, 1.849676296e-02f, 2.867541462e-02f, 2.819409035e-02f, 2.172248065e-02f,
    1.396482624e-02f, 7.701851893e-03f, 3.698872402e-03f, 1.560922596e-03f, 5.822451203e-04f, 1.927674748e-04f,
    5.681551920e-05f, 0.000000000e+00f};
}}  // namespace fastvlm::gelu_bf16_pw

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
