// Exact-form GELU, 0.5 x (1 + erf(x / sqrt 2)), with erf(z) = z P(z^2) / Q(z^2) on |z| <= 3.925
// (erf rounds to +-1 in float32 beyond): a rational approximation fitted (weighted least squares
// on 20000 points of [0, 3.925]) for this project. |error| 1.7e-8 in exact arithmetic, 3.7e-7
// evaluated in float32 (A&S 7.1.26, used before, has 1.5e-7 plus evaluation error and needs an exp).
// About 17 vector operations and one division, no exp. NaN propagates.
#pragma once

namespace fastvlm { namespace gelu_coef {
constexpr float kClamp = 3.925f;
constexpr float P0 = 1.1283790199279404f, P1 = 0.19296924209454605f, P2 = 0.0530839171173151f,
                P3 = 0.0038762051168986984f, P4 = 0.0002874911811024429f, P5 = 2.0308990368311797e-06f;
constexpr float Q1 = 0.5043461771171013f, Q2 = 0.11516609335979094f, Q3 = 0.015188087568475454f,
                Q4 = 0.001189725462103654f, Q5 = 3.8031750312479684e-05f;
}}  // namespace fastvlm::gelu_coef

// The same formula for a scalar float or a GCC vector of floats (`one` = 1 of that type).
// CLAMP(z, hi) must give z clamped to [-hi, hi] with a NaN z kept, exactly
// `z > hi ? hi : z` then `z < -hi ? -hi : z` (ffn_impl.h's clamp_sym: one min and one max
// instruction where the ISA has them; GCC lowers these selects against a constant bound as a
// compare and a blend each).
#define FVK_GELU_BODY(V, x, one, CLAMP)                                              \
  do {                                                                               \
    using namespace ::fastvlm::gelu_coef;                                            \
    const V hi = (one) * kClamp;                                                     \
    const V z = CLAMP((x) * 0.70710678118654752f, hi);                               \
    const V z2 = z * z;                                                              \
    V p = z2 * P5 + P4;                                                              \
    p = p * z2 + P3;                                                                 \
    p = p * z2 + P2;                                                                 \
    p = p * z2 + P1;                                                                 \
    p = p * z2 + P0;                                                                 \
    V q = z2 * Q5 + Q4;                                                              \
    q = q * z2 + Q3;                                                                 \
    q = q * z2 + Q2;                                                                 \
    q = q * z2 + Q1;                                                                 \
    q = q * z2 + (one);                                                              \
    const V h = (x) * 0.5f;                                                          \
    fvk_gelu_out = h + h * (z * p / q);                                              \
  } while (0)

namespace fastvlm {
inline float clamp_sym_scalar(float z, float hi) {
  z = z > hi ? hi : z;
  return z < -hi ? -hi : z;
}
// The scalar form, for channel tails and the scalar kernels (dwconv.cpp, ffn_impl.h).
inline float gelu_scalar(float x) {
  float fvk_gelu_out;
  FVK_GELU_BODY(float, x, 1.f, clamp_sym_scalar);
  return fvk_gelu_out;
}
}  // namespace fastvlm
