
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include <atomic>
#include <chrono>

#include "dispatch.h"
#include "ops/common.h"
#include "packed.h"

namespace fastvlm {

// fastvlm_C::peak_gflops -- the multiply-add peak of the kernels' ISA on torch.get_num_threads()
// threads, in GFLOP/s: the compute roofline of bench/ (the ops' floors, the report's "% of peak").
// Each thread runs independent register-only chains (fma_chains, or with bf16_dot the vdpbf16ps
// chains of dp_chains, for the bf16 GEMMs on avx512_bf16); the figure is the best of `reps` runs of
// about `seconds` each, total flops over the wall time of the parallel region (thread start
// included; negligible at these lengths). On the emulated test build (FASTVLM_EMULATE_AVX512) the
// avx512 figures are those of 512-bit code lowered to AVX2 (with register spills) and of vector code
// standing in for vdpbf16ps: they check that the paths run, not any hardware's peak.
double peak_gflops(bool bf16_dot, double seconds, int64_t reps) {
  TORCH_CHECK(seconds > 0 && seconds <= 10, "peak_gflops: seconds must be in (0, 10], got ", seconds);
  TORCH_CHECK(reps >= 1 && reps <= 100, "peak_gflops: reps must be in [1, 100], got ", reps);
  const Isa isa = active_isa();
  TORCH_CHECK(!bf16_dot || isa >= Isa::avx512_bf16, "peak_gflops: bf16_dot needs the avx512_bf16 ISA; this CPU "
              "(with FASTVLM_CPU_ISA, if set) runs ", isa_name(isa));
  // the chains of the ISA in use, and the flops of one of their iterations
  float (*chains)(int64_t, float) = isa_sse::fma_chains;
  int per_iter = isa_sse::chain_flops;
  if (bf16_dot) {
    chains = isa_avx512_bf16::dp_chains, per_iter = isa_avx512_bf16::dp_chain_flops;
#ifdef FVK_HAVE_AMX
    if (isa == Isa::amx_bf16) chains = isa_amx::amx_chains, per_iter = isa_amx::amx_chain_flops;
#endif
  } else if (isa >= Isa::avx512) {
    chains = isa_avx512::fma_chains, per_iter = isa_avx512::chain_flops;
  } else if (isa == Isa::avx2) {
    chains = isa_avx2::fma_chains, per_iter = isa_avx2::chain_flops;
  }
  using clock = std::chrono::steady_clock;
  static volatile float sink = 0.f;  // keeps the chains' results alive
  // iterations for about `seconds` on one thread, from a short run (at most half as long)
  const double calib = std::min(0.02, seconds / 2);
  int64_t iters = 1 << 10;
  for (;;) {
    const auto t0 = clock::now();
    sink = sink + chains(iters, 1e-3f);
    const double dt = std::chrono::duration<double>(clock::now() - t0).count();
    if (dt > calib || iters > (int64_t(1) << 40)) {
      iters = std::max<int64_t>(1, static_cast<int64_t>(iters * seconds / std::max(dt, 1e-9)));
      break;
    }
    iters *= 4;
  }
  const int64_t nth = std::max(1, at::get_num_threads());
  double best = 0.0;
  for (int64_t r = 0; r < reps; ++r) {
    std::atomic<int> done{0};
    const auto t0 = clock::now();
    at::parallel_for(0, nth, 1, [&](int64_t b, int64_t e) {
      float s = 0.f;
      for (int64_t t = b; t < e; ++t) s += chains(iters, 1e-3f * static_cast<float>(t + 1)), ++done;
      sink = sink + s;
    });
    const double dt = std::chrono::duration<double>(clock::now() - t0).count();
    TORCH_CHECK(done.load() == nth, "peak_gflops: ", done.load(), " of ", nth, " chains ran");
    const double flops = static_cast<double>(nth) * static_cast<double>(iters) * static_cast<double>(per_iter);
    best = std::max(best, flops / dt / 1e9);
  }
  return best;
}

}  // namespace fastvlm
