// How csrc/ops/ reach the kernels of the ISA that runs: the entry points of each ISA's translation
// unit (csrc/isa/*.cpp, declared by kernel_api.h once per namespace), parallel_tiles, and the two
// dispatch macros. Adding an ISA: a translation unit in csrc/isa/, its namespace here, a case below.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "common.h"  // DenormalsFlushed
#include "isa.h"

namespace fastvlm {
namespace isa_avx512 {
#define FVK_API_F32
#include "kernel_api.h"
#undef FVK_API_F32
}  // namespace isa_avx512
namespace isa_avx2 {
#define FVK_API_F32
#include "kernel_api.h"
#undef FVK_API_F32
}  // namespace isa_avx2
namespace isa_sse {
#define FVK_API_F32
#include "kernel_api.h"
#undef FVK_API_F32
}  // namespace isa_sse
namespace isa_avx512_bf16 {
#define FVK_API_BF16_PAIRS
#include "kernel_api.h"
#undef FVK_API_BF16_PAIRS
}  // namespace isa_avx512_bf16
#ifndef FASTVLM_EMULATE_AVX512
#define FVK_HAVE_AMX 1
namespace isa_amx {
#define FVK_API_BF16_PAIRS
#define FVK_API_AMX
#include "kernel_api.h"
#undef FVK_API_BF16_PAIRS
#undef FVK_API_AMX
}  // namespace isa_amx
#endif

// Runs run(first tile, end tile, scratch) over tiles [0, ntiles) in parallel (FVK_PARALLEL_TILES:
// one of the entry points of kernel_api.h), each thread with its own
// 64-byte aligned scratch of `scratch` floats
// (uninitialised: test_every_output_element_is_written poisons it through MALLOC_PERTURB_).
// Threads take runs of `chunk` tiles from a shared counter (dynamic scheduling), not fixed halves:
// on this project's 2-vCPU machine a static split left one thread waiting 3 ms per call on average
// (8% of the forward, measured per call with timestamps), as the vCPUs' speed drifts; taking tiles
// from a counter cut that to 1 ms, and the median of the stage-2/3 ConvFFN calls by 6-8% (static,
// counter and guided schedules alternated call by call in one process). On the whole 1024x1024
// forward the effect stayed within the machine's noise (five A/B runs, between -7% and +6%). A
// guided schedule (shrinking runs, to keep neighbouring tiles on one thread) was no better.
// A tile's result does not depend on which thread computes it: thread-count independent.
template <typename F>
inline void parallel_tiles(int64_t ntiles, int64_t scratch, const F& run) {
  const int64_t nth = std::min<int64_t>(std::max(1, at::get_num_threads()), ntiles);
  const int64_t chunk = std::max<int64_t>(1, ntiles / (16 * std::max<int64_t>(1, nth)));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nth, 1, [&](int64_t, int64_t) {
    const DenormalsFlushed ftz;  // common.h: per thread, restored on exit
    std::unique_ptr<float[]> raw(new float[scratch + 16]);  // not zeroed: kernels write before reading
    float* buf = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(raw.get()) + 63) & ~uintptr_t(63));
    for (int64_t b; (b = next.fetch_add(chunk, std::memory_order_relaxed)) < ntiles;)
      run(b, std::min(b + chunk, ntiles), buf);
  });
}
// FN(args..., first tile, end tile, scratch) of the ISA's namespace (avx512_bf16 runs the avx512 one).
#define FVK_PARALLEL_TILES(FN, tiles, scratch, isa, ...)                                 \
  parallel_tiles((tiles), (scratch), [&](int64_t b_, int64_t e_, float* buf_) {           \
    switch (isa) {                                                                        \
      case Isa::amx_bf16:                                                                 \
      case Isa::avx512_bf16:                                                              \
      case Isa::avx512: isa_avx512::FN(__VA_ARGS__, b_, e_, buf_); break;                 \
      case Isa::avx2: isa_avx2::FN(__VA_ARGS__, b_, e_, buf_); break;                     \
      default: isa_sse::FN(__VA_ARGS__, b_, e_, buf_);                                    \
    }                                                                                     \
  })


// FN(args...) of isa_amx on amx_bf16, else of isa_avx512_bf16 (the bf16-pair kernels).
#ifdef FVK_HAVE_AMX
#define FVK_DP(isa, FN, ...) \
  ((isa) == Isa::amx_bf16 ? isa_amx::FN(__VA_ARGS__) : isa_avx512_bf16::FN(__VA_ARGS__))
#else
#define FVK_DP(isa, FN, ...) isa_avx512_bf16::FN(__VA_ARGS__)
#endif

}  // namespace fastvlm
