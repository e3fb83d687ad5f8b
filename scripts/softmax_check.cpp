// Attention's softmax exponential on AVX2 vectors: kernels/vec.h's vexp2_neg (2^x of base-2 scores, what
// kernels/attention.h and the bf16-pair path use) beside vexp (e^x, what they used before), in the softmax's
// own inner loop (load a score, subtract the running max, exponentiate, store p, add it to the sum:
// 128 keys x 32 queries, L1-resident, best of 20 alternated runs); their max relative error against
// double precision over the softmax's range, and the edge values. Then phase 2 of the attention mixer
// (kernels/attention.h's attn_tiles: S = K Q^T, online softmax, P V) for one image, one thread, in GFLOP/s.
// Standalone, no torch:
//   g++ -O3 -std=c++17 -mavx2 -mfma -Icsrc scripts/softmax_check.cpp -o /tmp/softmax_check && /tmp/softmax_check [N C]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "avx2_kernels.h"
using namespace avx2;

static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// flash_head's probs step for one block: p = exp(s - max) in place, summed into the running sum
template <bool BASE2>
__attribute__((noinline)) static void probs(float* S, const float* mx, float* sm, int64_t nk, int64_t Tq) {
  for (int64_t j = 0; j < Tq; j += VL) {
    const vf mn = vload(mx + j);
    vf l = vload(sm + j);
    for (int64_t r = 0; r < nk; ++r) {
      const vf s = vload(S + r * Tq + j) - mn;
      const vf p = BASE2 ? vexp2_neg(s) : vexp(s);
      vstore(S + r * Tq + j, p);
      l += p;
    }
    vstore(sm + j, l);
  }
}

int main(int argc, char** argv) {
  constexpr int64_t BK = 128, Tq = 32, reps = 2000;
  const float log2e = 1.4426950408889634f;
  alignas(64) static float S[BK * Tq], S0[2][BK * Tq], mx[2][Tq], sm[Tq];
  for (int64_t i = 0; i < BK * Tq; ++i) S0[0][i] = -12.f * ((i * 7919) % 1000) / 1000.f, S0[1][i] = S0[0][i] * log2e;
  for (int64_t j = 0; j < Tq; ++j) mx[0][j] = 0.f, mx[1][j] = 0.f, sm[j] = 0.f;
  double best[2] = {1e9, 1e9};
  for (int rep = 0; rep < 20; ++rep)
    for (int v = 0; v < 2; ++v) {
      double el = 0;
      for (int64_t k = 0; k < reps; ++k) {
        std::memcpy(S, S0[v], sizeof S);  // fresh scores each block (not timed)
        const double t = now();
        if (v) probs<true>(S, mx[1], sm, BK, Tq);
        else probs<false>(S, mx[0], sm, BK, Tq);
        el += now() - t;
      }
      best[v] = std::min(best[v], el / reps / (BK * Tq / VL) * 1e9);
    }
  double err[2] = {0, 0};
  // softmax arguments down to -86.6 (natural units), where both clamps are inactive: 2^-125 = e^-86.64
  // (below it vexp2_neg gives 2^-125 = 2.4e-38 and vexp e^-87 = 1.6e-38: negligible beside the max's 1)
  for (int64_t i = 0; i <= 8000000; ++i) {
    const float x = -86.6f * i / 8000000, x2 = x * log2e;
    const double want[2] = {std::exp(double(x)), std::exp2(double(x2))};  // each against its own float argument
    const float got[2] = {vexp(vset(x))[0], vexp2_neg(vset(x2))[0]};
    for (int v = 0; v < 2; ++v) err[v] = std::max(err[v], std::fabs(got[v] - want[v]) / want[v]);
  }
  std::printf("softmax p = exp(s - max), per AVX2 vector (load, exp, store, sum; 128 keys x 32 queries, L1):\n");
  std::printf("  vexp      (e^x, natural scores) %.2f ns   max relative error, arguments e^[-86.6, 0]: %.3g\n", best[0], err[0]);
  std::printf("  vexp2_neg (2^x, base-2 scores)  %.2f ns   same: %.3g   (%.3fx the time)\n",
              best[1], err[1], best[1] / best[0]);
  std::printf("  vexp2_neg edges: 2^0 = %.9g, 2^-125 = %.6g, 2^-3e38 = %.6g, 2^-inf = %.6g, 2^NaN = %g\n",
              vexp2_neg(vset(0.f))[0], vexp2_neg(vset(-125.f))[0], vexp2_neg(vset(-3e38f))[0],
              vexp2_neg(vset(-INFINITY))[0], vexp2_neg(vset(NAN))[0]);

  // phase 2 for one image (attention.h's layouts; q pre-scaled by head_dim^-0.5 log2(e), as ops/attention_mixer.cpp does)
  const int64_t N = argc > 2 ? std::atoll(argv[1]) : 1024, C = argc > 2 ? std::atoll(argv[2]) : 768, hd = 32;
  const int64_t Np = (N + Tq - 1) / Tq * Tq + Tq, tiles = (N + Tq - 1) / Tq;
  std::mt19937 g(1);
  std::normal_distribution<float> nd;
  std::vector<float> Qt(C * Np, 0.f), Kb(N * C), Vt(C * Np, 0.f), O(N * C), zeros(4096, 0.f);
  std::vector<float> scratch(BK * Tq + 2 * hd * Tq + 2 * Tq);
  const float scale = log2e / std::sqrt(float(hd));
  for (int64_t c = 0; c < C; ++c)
    for (int64_t n = 0; n < N; ++n) Qt[c * Np + n] = 2.f * nd(g) * scale, Vt[c * Np + n] = nd(g);
  for (auto& v : Kb) v = nd(g);
  double t2 = 1e9;
  for (int rep = 0; rep < 7; ++rep) {
    const double t = now();
    attn_tiles(N, C, hd, Qt.data(), Kb.data(), Vt.data(), Np, zeros.data(), Tq, BK, O.data(), 0, tiles, scratch.data());
    t2 = std::min(t2, now() - t);
  }
  std::printf("phase 2 (S = K Q^T, online softmax, P V), N = %lld tokens, C = %lld, head_dim 32, one thread: "
              "%.2f ms, %.1f GFLOP/s\n", (long long)N, (long long)C, t2 * 1e3, 4.0 * N * N * C / t2 / 1e9);
}
