// csrc/kernels/gelu.h's GELU on AVX2 vectors: speed (ns per 8-float vector, an L1-resident loop, best of 30)
// and max error against double-precision erf, beside the form it replaced (x / sqrt 2 first, then
// 0.5 x (1 + z P / Q)) and its bf16-output form (vgelu_bf16, for results rounded to bf16 next).
// Standalone, no torch:
//   g++ -O3 -std=c++17 -mavx2 -mfma -Icsrc scripts/gelu_check.cpp -o /tmp/gelu_check && /tmp/gelu_check
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>

#include "avx2_kernels.h"
using avx2::vf, avx2::vfu, avx2::vset, avx2::clamp_sym;

static inline vf gelu_now(vf x) { return avx2::vgelu(x); }
static inline vf gelu_bf16(vf x) { return avx2::vgelu_bf16(x); }
static inline vf gelu_before(vf x) {  // the previous evaluation of the same rational function
  using namespace fastvlm::gelu_coef;
  const float P[6] = {float(kP[0]), float(kP[1]), float(kP[2]), float(kP[3]), float(kP[4]), float(kP[5])};
  const float Q[6] = {1.f, float(kQ[1]), float(kQ[2]), float(kQ[3]), float(kQ[4]), float(kQ[5])};
  const vf z = clamp_sym(x * 0.70710678118654752f, vset(float(kZ))), z2 = z * z;
  vf p = z2 * P[5] + P[4], q = z2 * Q[5] + Q[4];
  for (int i = 3; i >= 0; --i) p = p * z2 + P[i], q = q * z2 + Q[i];
  const vf h = x * 0.5f;
  return h + h * (z * p / q);
}
template <int V>
__attribute__((noinline)) static void run(const float* in, float* out, int n) {
  for (int i = 0; i < n; i += 8) {
    const vf x = *(const vfu*)(in + i);
    *(vfu*)(out + i) = V == 2 ? gelu_bf16(x) : V == 1 ? gelu_now(x) : gelu_before(x);
  }
}
static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

int main() {
  const int n = 1024, reps = 20000;
  alignas(64) static float in[n], out[n];
  for (int i = 0; i < n; ++i) in[i] = -8 + 16.f * i / n;
  double best[3] = {1e9, 1e9, 1e9};
  for (int r = 0; r < 30; ++r) {  // alternated, so a drift of the machine's speed hits all alike
    double t = now();
    for (int k = 0; k < reps; ++k) run<0>(in, out, n);
    best[0] = std::min(best[0], now() - t);
    t = now();
    for (int k = 0; k < reps; ++k) run<1>(in, out, n);
    best[1] = std::min(best[1], now() - t);
    t = now();
    for (int k = 0; k < reps; ++k) run<2>(in, out, n);
    best[2] = std::min(best[2], now() - t);
  }
  double err[3] = {0, 0, 0}, rel[3] = {0, 0, 0};
  for (int i = 0; i < 2000000; i += 8) {
    alignas(32) float xs[8];
    for (int l = 0; l < 8; ++l) xs[l] = -10 + 20.0f * (i + l) / 2000000;
    const vf o[3] = {gelu_before(*(vfu*)xs), gelu_now(*(vfu*)xs), gelu_bf16(*(vfu*)xs)};
    for (int l = 0; l < 8; ++l) {
      const double x = xs[l], ref = 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
      for (int v = 0; v < 3; ++v) {
        const double d = std::fabs(o[v][l] - ref);
        err[v] = std::max(err[v], d), rel[v] = std::max(rel[v], d / std::max(1.0, std::fabs(x)));
      }
    }
  }
  const char* name[3] = {"before (x / sqrt 2 first)", "gelu.h", "gelu.h bf16-output form"};
  for (int v = 0; v < 3; ++v)
    std::printf("%-26s %.3f ns per vector; max |err| on [-10, 10] %.3g, relative to max(1, |x|) %.3g\n", name[v],
                best[v] / (double(reps) * n / 8) * 1e9, err[v], rel[v]);
}
