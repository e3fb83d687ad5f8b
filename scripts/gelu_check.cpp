// csrc/kernels/gelu.h's GELU on AVX2 vectors: speed (ns per 8-float vector, an L1-resident loop, best of 30)
// and max error against double-precision erf, beside the form it replaced (x / sqrt 2 first, then
// 0.5 x (1 + z P / Q)) and its bf16-output form (vgelu_bf16, for results rounded to bf16 next). On a
// CPU with AVX-512F also the 16-lane vgelu_bf16 (kernels/vec.h on 16 floats: gelu.h's piecewise cubic)
// against the rational bf16-output form on 16 floats (ns per 16-float vector, float stores: the bf16
// conversion left out), their errors, and the piecewise form's values at NaN, +-inf, +-3e38 and 0.
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
// kernels/vec.h on 16 floats in its own namespace, for the AVX-512 form of vgelu_bf16 (compiled for
// AVX-512 here, called only where the CPU has it).
#undef FVK_VL
#undef FVK_VMIN
#undef FVK_VMAX
#include "isa/avx512_hooks.h"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,fma")
namespace v16 {
#define FVK_VL 16
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
#define FVK_VMIN FVK_VMIN_AVX512  // the kernels' own hooks (isa/avx512_hooks.h)
#define FVK_VMAX FVK_VMAX_AVX512
#include "kernels/vec.h"
static inline vf rational(vf x) {  // gelu.h's rational bf16-output form on the same 16 lanes
  vf fvk_gelu_out;
  FVK_GELU_BF16_BODY(vf, x, vset(1.f), clamp_sym);
  return fvk_gelu_out;
}
template <int V>
__attribute__((noinline)) static void run(const float* in, float* out, int n) {
  for (int i = 0; i < n; i += 16) vstore(out + i, V ? vgelu_bf16(vload(in + i)) : rational(vload(in + i)));
}
static void eval(const float* in, float* out, int n, bool pw) { pw ? run<1>(in, out, n) : run<0>(in, out, n); }
}  // namespace v16
#pragma GCC pop_options

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
  if (!__builtin_cpu_supports("avx512f")) {
    std::printf("16-lane bf16-output forms: not run (no AVX-512F)\n");
    return 0;
  }
  double b16[2] = {1e9, 1e9}, rel16[2] = {0, 0};
  for (int r = 0; r < 30; ++r)
    for (int v = 0; v < 2; ++v) {
      const double t = now();
      for (int k = 0; k < reps; ++k) v16::eval(in, out, n, v);
      b16[v] = std::min(b16[v], now() - t);
    }
  static float xs[1 << 16], o16[1 << 16];
  for (int i = 0; i < 2000000; i += 1 << 16) {  // [-12, 12]: past both ends of the piecewise table
    for (int l = 0; l < 1 << 16; ++l) xs[l] = -12 + 24.0f * (i + l) / 2000000;
    for (int v = 0; v < 2; ++v) {
      v16::eval(xs, o16, 1 << 16, v);
      for (int l = 0; l < 1 << 16; ++l) {
        const double x = xs[l], ref = 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
        rel16[v] = std::max(rel16[v], std::fabs(o16[l] - ref) / std::max(1.0, std::fabs(x)));
      }
    }
  }
  const char* name16[2] = {"16 lanes, rational", "16 lanes, piecewise"};
  for (int v = 0; v < 2; ++v)
    std::printf("%-26s %.3f ns per vector; max |err| on [-12, 12] relative to max(1, |x|) %.3g\n", name16[v],
                b16[v] / (double(reps) * n / 16) * 1e9, rel16[v]);
  const float edge[6] = {NAN, INFINITY, -INFINITY, 3e38f, -3e38f, 0.f};
  for (int l = 0; l < 16; ++l) xs[l] = edge[l % 6];
  v16::eval(xs, o16, 16, true);
  std::printf("16 lanes, piecewise: GELU(nan) = %g, GELU(inf) = %g, GELU(-inf) = %g, GELU(3e38) = %g, "
              "GELU(-3e38) = %g, GELU(0) = %g\n", o16[0], o16[1], o16[2], o16[3], o16[4], o16[5]);
}
