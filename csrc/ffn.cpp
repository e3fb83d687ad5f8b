// fastvlm_C::convffn_nhwc -- the fused ConvFFN: y = x + gamma * fc2(GELU(fc1(dwKxK_bnfolded(x)))),
// one tile of pixels at a time (ffn_impl.h); the 4C-wide hidden activation goes through a per-thread
// buffer 256 channels at a time (fc1 + GELU of a chunk, then its share of fc2) and is never whole.
//
//   x      (B, H, W, C) contiguous, float32 or bfloat16 (bf16 storage, fp32 accumulation)
//   dw_w   (K, K, C), dw_b (C): the depthwise conv with its BatchNorm folded in
//   fc1_wp = pack_linear(fc1_w (Hd, C)), fc1_b (Hd); fc2_wp = pack_linear(fc2_w (C, Hd)), fc2_b (C);
//   gamma (C). Biases, gamma and dw weights may be float32 or bfloat16; they are used as float32.
//   For bf16 x on the avx512_bf16 ISA, fc1_wp / fc2_wp may be pack_linear_bf16 instead: the GEMMs
//   then multiply bf16 pairs (ffn_dp_impl.h; attention_mixer and patch_embed likewise).
// (Also here: stem, patch_embed and attention_mixer, which share the tile GEMM of ffn_impl.h.)
//
// ISA: the tile kernel is compiled for AVX-512 (16 floats), AVX2+FMA (8) and baseline SSE2 (4), and
// picked at run time from the CPU's features (plus AVX512_BF16 for the pair-dot GEMMs);
// FASTVLM_CPU_ISA=avx512|avx2|sse forces a narrower one.
// Results do not depend on the thread count: tiles are fixed by the shape, each is computed by one
// thread in a fixed order.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>  // std::true_type / false_type in ffn_impl.h
#include <vector>

#include "common.h"  // DenormalsFlushed
#include "gelu.h"
#include "isa.h"
#ifndef FASTVLM_EMULATE_AVX512
#include <immintrin.h>  // _mm512_dpbf16_ps (ffn_avx512bf16), the bf16 loads of both AVX-512 regions
#endif
// 16 bf16 -> 16 floats in two instructions (vpmovzxwd m256 -> zmm, vpslld). The portable form in
// ffn_impl.h (__builtin_convertvector of 16 uint16 to uint32, then << 16) is lowered by GCC as two
// 256-bit halves (vpmovzxwd, vextracti32x4, vpmovzxwd, vinserti32x8): the RepMixer's bf16 3x3
// spent most of its samples there. (The zero-masking form with a full mask: the unmasked intrinsics
// start from _mm512_undefined_epi32, which GCC 12 reports as maybe-uninitialized at every use.)
#define FVK_LD_BF16_AVX512(p) \
  ((vf)((vu)_mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))) << 16))

// The ISA's minps / maxps for ffn_impl.h's clamp_sym (the GELU's clamp): a < b ? a : b (a > b ? a : b),
// the second operand when either is NaN, as the portable selects give.
#define FVK_VMIN_AVX512(a, b) ((vf)_mm512_min_ps((__m512)(a), (__m512)(b)))
#define FVK_VMAX_AVX512(a, b) ((vf)_mm512_max_ps((__m512)(a), (__m512)(b)))

#pragma GCC push_options
#ifdef FASTVLM_EMULATE_AVX512
// A test build (scripts/asan.sh on CPUs without AVX-512): the 16-float code below compiled for AVX2,
// each 512-bit vector operation lowered to two 256-bit ones, so the AVX-512 path's own logic (32-
// channel micro-tiles, 16-lane tails and shuffles, its panel and scratch bounds) runs and is checked
// on any AVX2 machine. isa.h then offers it as Isa::avx512.
#pragma GCC target("avx2,fma")
#else
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,fma")
#endif
namespace fastvlm { namespace ffn_avx512 {
#define FVK_VL 16
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
#ifndef FASTVLM_EMULATE_AVX512
#define FVK_LD_BF16(p) FVK_LD_BF16_AVX512(p)
#define FVK_VMIN FVK_VMIN_AVX512
#define FVK_VMAX FVK_VMAX_AVX512
#endif
#include "ffn_impl.h"
#include "attn_impl.h"
#undef FVK_VL
#undef FVK_LD_BF16
#undef FVK_VMIN
#undef FVK_VMAX
}}  // namespace fastvlm::ffn_avx512
#pragma GCC pop_options

// AVX-512 + AVX512_BF16: the pair-dot GEMMs of the bf16 ConvFFN and attention (ffn_dp_impl.h). Only
// the *_dp_tiles functions are used from this namespace; the rest of ffn_impl.h and attn_impl.h it
// includes is for ffn_dp_impl.h to call.
#pragma GCC push_options
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#ifdef FASTVLM_EMULATE_AVX512
#pragma GCC target("avx2,fma")
#else
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,fma")
#endif
namespace fastvlm { namespace ffn_avx512bf16 {
#define FVK_VL 16
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
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
// Vector stores to bf16 (ffn_impl.h's vst) through VCVTNEPS2BF16: round to nearest even, like the
// portable form, in one instruction instead of about seven (the fc1 + GELU epilogue's hidden rows:
// GELU + store 25 -> 20 cycles per vector, measured). Differs from the portable form only where no
// test data goes: float32 denormals become signed zeros (the instruction's DAZ) and a NaN keeps its
// payload's top bits (quiet) instead of becoming 0x7FC0.
#define FVK_CVT_BF16(v) _mm512_cvtneps_pbh((__m512)(v))
#define FVK_LD_BF16(p) FVK_LD_BF16_AVX512(p)
#define FVK_VMIN FVK_VMIN_AVX512
#define FVK_VMAX FVK_VMAX_AVX512
#endif
#include "ffn_impl.h"
#include "attn_impl.h"
#include "ffn_dp_impl.h"
#undef FVK_VL
#undef FVK_CVT_BF16
#undef FVK_LD_BF16
#undef FVK_VMIN
#undef FVK_VMAX
}}  // namespace fastvlm::ffn_avx512bf16
#pragma GCC diagnostic pop
#pragma GCC pop_options

#ifndef FASTVLM_EMULATE_AVX512
// AVX-512 + AVX512_BF16 + AMX: ffn_avx512bf16's kernels with their GEMMs on AMX tiles (ffn_amx_impl.h,
// through ffn_dp_impl.h's FVK_PGEMM_DP). Only the *_dp_tiles functions and amx_chains are used from here.
#define FVK_HAVE_AMX 1
#pragma GCC push_options
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,fma,amx-tile,amx-bf16")
namespace fastvlm { namespace ffn_amx {
#define FVK_VL 16
#define FVK_AMX 1
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
using ffn_avx512bf16::fvk_dpbf16;  // the vdpbf16ps fallback's (same vector type)
#define FVK_CVT_BF16(v) _mm512_cvtneps_pbh((__m512)(v))
#define FVK_LD_BF16(p) FVK_LD_BF16_AVX512(p)
#define FVK_VMIN FVK_VMIN_AVX512
#define FVK_VMAX FVK_VMAX_AVX512
#include "ffn_impl.h"
#include "attn_impl.h"
#include "ffn_dp_impl.h"
#undef FVK_VMIN
#undef FVK_VMAX
#undef FVK_VL
#undef FVK_AMX
#undef FVK_CVT_BF16
#undef FVK_LD_BF16
}}  // namespace fastvlm::ffn_amx
#pragma GCC diagnostic pop
#pragma GCC pop_options
// FN(args...) of ffn_amx on amx_bf16, else of ffn_avx512bf16 (the bf16-pair kernels).
#define FVK_DP(isa, FN, ...) \
  ((isa) == Isa::amx_bf16 ? ffn_amx::FN(__VA_ARGS__) : ffn_avx512bf16::FN(__VA_ARGS__))
#else
#define FVK_DP(isa, FN, ...) ffn_avx512bf16::FN(__VA_ARGS__)
#endif

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace fastvlm { namespace ffn_avx2 {
#define FVK_VL 8
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
#define FVK_VMIN(a, b) __builtin_ia32_minps256((a), (b))
#define FVK_VMAX(a, b) __builtin_ia32_maxps256((a), (b))
#include "ffn_impl.h"
#include "attn_impl.h"
#undef FVK_VL
#undef FVK_VMIN
#undef FVK_VMAX
}}  // namespace fastvlm::ffn_avx2
#pragma GCC pop_options

namespace fastvlm { namespace ffn_sse {
#define FVK_VL 4
typedef float vf __attribute__((vector_size(16)));
typedef int32_t vi __attribute__((vector_size(16)));
#if defined(__x86_64__)  // SSE is part of x86-64
#define FVK_VMIN(a, b) __builtin_ia32_minps((a), (b))
#define FVK_VMAX(a, b) __builtin_ia32_maxps((a), (b))
#endif
#include "ffn_impl.h"
#include "attn_impl.h"
#undef FVK_VMIN
#undef FVK_VMAX
#undef FVK_VL
}}  // namespace fastvlm::ffn_sse

namespace fastvlm {
namespace {

// A weight as contiguous float32, after checking it (`name` reads e.g. "convffn_nhwc: fc1_w").
at::Tensor as_f32(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              name, " must be float32 or bfloat16, got ", t.scalar_type());
  return t.to(at::kFloat).contiguous();
}

}  // namespace

// Runs run(first tile, end tile, scratch) over tiles [0, ntiles) in parallel (FVK_PARALLEL_TILES:
// one of the *_tiles functions of ffn_impl.h, compiled once per ISA), each thread with its own
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
static void parallel_tiles(int64_t ntiles, int64_t scratch, const F& run) {
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
      case Isa::avx512: ffn_avx512::FN(__VA_ARGS__, b_, e_, buf_); break;                 \
      case Isa::avx2: ffn_avx2::FN(__VA_ARGS__, b_, e_, buf_); break;                     \
      default: ffn_sse::FN(__VA_ARGS__, b_, e_, buf_);                                    \
    }                                                                                     \
  })

// The packed panel count for n output channels (ffn_impl.h: panels of 16, an even count).
static int64_t packed_panels(int64_t n) { return ffn_avx2::packed_panels(n); }
constexpr int64_t kPanel = 16;

// A depthwise weight (lead x Co floats) or bias (lead = 1), in pair layout (ffn_impl.h's dw_slide,
// its AVX-512 M = 2 form): each whole block of 32 channels re-ordered to its 16 even channels,
// then its 16 odd ones; the channels past the last whole block as they are. Undefined (no tensor)
// where the ISA has no such kernel (below AVX-512), Co < 32, or the caller's `used` is false.
static at::Tensor pair_layout(const float* w, int64_t lead, int64_t Co, Isa isa, bool used) {
  const int64_t nb = Co / 32;
  if (!used || nb == 0 || lead == 0 || isa < Isa::avx512) return {};
  at::Tensor out = at::empty({lead * Co}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (int64_t l = 0; l < lead; ++l, w += Co, o += Co) {  // a plain loop: at::'s permute + copy cost 8% of conv_exp
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t i = 0; i < 16; ++i) o[32 * b + i] = w[32 * b + 2 * i], o[32 * b + 16 + i] = w[32 * b + 2 * i + 1];
    for (int64_t c = 32 * nb; c < Co; ++c) o[c] = w[c];
  }
  return out;
}
static const float* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }
// n rounded up to whole pairs of panels (32): the padded width of biases, gamma and GEMM output rows,
// enough for the widest micro-tile of every ISA.
static int64_t padded_width(int64_t n) { return packed_panels(n) * kPanel; }
static_assert(ffn_avx2::PW == kPanel && ffn_avx512::PW == kPanel && ffn_sse::PW == kPanel, "one packed layout");

// fastvlm_C::pack_linear -- an (N, K) nn.Linear / 1x1 conv weight (float32 or bfloat16) -> the
// float32 panels the ConvFFN GEMMs read: (P, K, 16), P = packed_panels(N), out[p][k][i] =
// w[16p + i][k] (zero where 16p + i >= N). The same layout for every ISA.
at::Tensor pack_linear(const at::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu(), "pack_linear: w must be a CPU tensor, got ", w.device());
  TORCH_CHECK(w.dim() == 2, "pack_linear: w must be 2-D (N, K), got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16,
              "pack_linear: w must be float32 or bfloat16, got ", w.scalar_type());
  const int64_t N = w.size(0), K = w.size(1), P = packed_panels(N);
  const at::Tensor wf = w.to(at::kFloat).contiguous();
  at::Tensor out = at::zeros({P, K, kPanel}, wf.options());
  const float* src = wf.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t i = 0; i < kPanel && p * kPanel + i < N; ++i) {
        const float* row = src + (p * kPanel + i) * K;
        float* col = dst + p * K * kPanel + i;
        for (int64_t k = 0; k < K; ++k) col[k * kPanel] = row[k];
      }
  });
  return out;
}

// fastvlm_C::pack_linear_bf16 -- an (N, K) weight (float32 or bfloat16; float32 is rounded to
// nearest even) -> the bf16-pair panels of the AVX512_BF16 GEMMs (ffn_dp_impl.h): bfloat16
// (P, ceil(K / 2), 32), out[p][j][2i + e] = w[16p + i][2j + e], zero padded (channels past N, and
// k = K for an odd K).
at::Tensor pack_linear_bf16(const at::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu(), "pack_linear_bf16: w must be a CPU tensor, got ", w.device());
  TORCH_CHECK(w.dim() == 2, "pack_linear_bf16: w must be 2-D (N, K), got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16,
              "pack_linear_bf16: w must be float32 or bfloat16, got ", w.scalar_type());
  const int64_t N = w.size(0), K = w.size(1), P = packed_panels(N), KP = (K + 1) / 2;
  const at::Tensor wh = w.to(at::kBFloat16).contiguous();
  at::Tensor out = at::zeros({P, KP, 2 * kPanel}, wh.options());
  const auto* src = reinterpret_cast<const uint16_t*>(wh.data_ptr());
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t i = 0; i < kPanel && p * kPanel + i < N; ++i) {
        const uint16_t* row = src + (p * kPanel + i) * K;
        uint16_t* col = dst + p * KP * 2 * kPanel + 2 * i;
        for (int64_t k = 0; k < K; ++k) col[(k / 2) * 2 * kPanel + (k & 1)] = row[k];
      }
  });
  return out;
}

namespace {
// A per-channel vector as float32, zero padded to `padded` floats (the kernels read whole vectors).
at::Tensor padded_f32(const at::Tensor& t, const char* name, int64_t n, int64_t padded) {
  const at::Tensor f = as_f32(t, name, {n});
  at::Tensor out = at::zeros({padded}, f.options());
  out.narrow(0, 0, n).copy_(f);
  return out;
}
}  // namespace

// The pointwise weight of stem / patch_embed: pack_linear's panels of a (C, C) weight, checked.
static void check_packed(const at::Tensor& wp, int64_t N, int64_t K, const char* what) {
  TORCH_CHECK(wp.device().is_cpu() && wp.scalar_type() == at::kFloat && wp.is_contiguous() &&
                  wp.sizes() == at::IntArrayRef({packed_panels(N), K, kPanel}),
              what, " must be pack_linear() of the (", N, ", ", K, ") weight: float32 (", packed_panels(N), ", ", K,
              ", ", kPanel, "), got ", wp.scalar_type(), " ", wp.sizes());
}

// A pack_linear_bf16 weight: bf16-pair panels of an (N, K) weight, checked ("<what> must be
// pack_linear_bf16(<name>)").
static void check_packed_bf16(const at::Tensor& wp, int64_t N, int64_t K, const char* what, const char* name) {
  TORCH_CHECK(wp.device().is_cpu() && wp.scalar_type() == at::kBFloat16 && wp.is_contiguous() &&
                  wp.sizes() == at::IntArrayRef({packed_panels(N), (K + 1) / 2, 2 * kPanel}),
              what, " must be pack_linear_bf16(", name, "), bfloat16 (", packed_panels(N), ", ", (K + 1) / 2, ", ",
              2 * kPanel, "), got ", wp.scalar_type(), " ", wp.sizes());
}
// An op handed pack_linear_bf16 weights runs the AVX512_BF16 kernels: bf16 x (dtype: x's), and that ISA active.
static void check_dp_call(at::ScalarType dtype, Isa isa, const char* op) {
  TORCH_CHECK(dtype == at::kBFloat16, op, ": weights packed by pack_linear_bf16 need bfloat16 x, got ", dtype,
              " (pack float32 models with pack_linear)");
  TORCH_CHECK(isa >= Isa::avx512_bf16, op, ": weights packed by pack_linear_bf16 need the avx512_bf16 kernels, but "
              "this call runs ", isa_name(isa), " (the CPU lacks AVX512_BF16, or FASTVLM_CPU_ISA caps it): pack with "
              "pack_linear instead");
}

// Tiling of the 1x1-GEMM ops: `n` tiles per image of at most `T` pixels (whole 6-pixel groups,
// spread evenly by tile_start), about 96 pixels each (FASTVLM_FFN_TILE overrides the 96), and the
// tile count over the batch a multiple of the thread count where that is reachable, so the
// threads (which take tiles from a counter, FVK_PARALLEL_TILES) end on a full last round. The count
// is rounded down to that multiple where the tiles then stay within 1.5 T pixels, else up: every
// tile reads the whole weight, and at FastViTHD's stage 4 (256 pixels, 75 MB of ConvFFN weights)
// 2 tiles of 132 pixels on 2 threads took 0.85x the time of 4 of 66 (ConvFFN; attention_mixer
// 0.95x; calls alternated in one process on the Xeon of bench/results; level, 1.00x / 0.98x, on
// the Zen 1 of bench/results/zen1). Tiling does not change
// results: each output is summed in the same order whatever tile computes it.
struct Tiling {
  int64_t n, T;
};
static Tiling gemm_tiling(int64_t B, int64_t HW) {
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads()), groups = (HW + 5) / 6;
  int64_t T = 96;
  if (const char* env = std::getenv("FASTVLM_FFN_TILE")) T = std::max<int64_t>(6, std::atoll(env) / 6 * 6);
  int64_t n = (HW + T - 1) / T;
  int64_t down = n;
  while (down > 0 && (B * down) % nth) --down;
  if (down > 0 && down < n && HW <= down * (T + T / 2)) n = down;
  for (int64_t k = 0; k < nth && (B * n) % nth; ++k) ++n;
  n = std::max<int64_t>(1, std::min(n, groups));
  return {n, (groups + n - 1) / n * 6};
}

// The ConvFFN arguments of convffn_nhwc and repmixer_nhwc (`op` names the caller in errors), checked
// against x (B, H, W, C), with the small ones as the float32 (padded) copies the kernels read. The
// weights' packing picks the kernels: bf16-pair panels (pack_linear_bf16) the AVX512_BF16 ones
// (ffn_dp_impl.h, bf16 x only), float32 panels (pack_linear) those of the active ISA.
struct FfnArgs {
  int64_t B, H, W, C, K, Hd;
  Isa isa;
  bool dp;
  at::Tensor dw_w, dw_b, b1, b2, g;  // float32: (K, K, C), (C), then padded to Hdp, Cp, Cp
  const float *pdw, *pdb, *pb1, *pb2, *pg;  // their data
  const void *w1p, *w2p;
};
static FfnArgs ffn_args(const char* op, const at::Tensor& xc, const at::Tensor& dw_w, const at::Tensor& dw_b,
                        const at::Tensor& fc1_wp, const at::Tensor& fc1_b, const at::Tensor& fc2_wp,
                        const at::Tensor& fc2_b, const at::Tensor& gamma) {
  FfnArgs a;
  a.B = xc.size(0), a.H = xc.size(1), a.W = xc.size(2), a.C = xc.size(3);
  const int64_t C = a.C;
  TORCH_CHECK(dw_w.dim() == 3 && dw_w.size(0) == dw_w.size(1) && dw_w.size(0) % 2 == 1, op,
              ": dw_w must be (K, K, C) with odd K, got ", dw_w.sizes());
  TORCH_CHECK(fc1_b.dim() == 1 && fc1_b.size(0) > 0, op, ": fc1_b must be 1-D (Hd), Hd > 0, got ", fc1_b.sizes());
  a.K = dw_w.size(0), a.Hd = fc1_b.size(0);
  const int64_t Hd = a.Hd;
  TORCH_CHECK(fc1_wp.device().is_cpu() && fc2_wp.device().is_cpu(), op, ": weights must be CPU tensors");
  a.isa = active_isa();
  const std::string name = op;
  a.dp = fc1_wp.scalar_type() == at::kBFloat16 || fc2_wp.scalar_type() == at::kBFloat16;
  if (a.dp) {
    check_packed_bf16(fc1_wp, Hd, C, (name + ": fc1_wp").c_str(), "fc1_w");
    check_packed_bf16(fc2_wp, C, Hd, (name + ": fc2_wp").c_str(), "fc2_w");
    check_dp_call(xc.scalar_type(), a.isa, op);
  } else {  // pack_linear's panels of fc1_w (Hd, C) and fc2_w (C, Hd)
    TORCH_CHECK(fc1_wp.scalar_type() == at::kFloat && fc1_wp.is_contiguous() &&
                    fc1_wp.sizes() == at::IntArrayRef({packed_panels(Hd), C, kPanel}),
                op, ": fc1_wp must be pack_linear(fc1_w), float32 (", packed_panels(Hd), ", ", C, ", ", kPanel,
                "), got ", fc1_wp.scalar_type(), " ", fc1_wp.sizes());
    TORCH_CHECK(fc2_wp.scalar_type() == at::kFloat && fc2_wp.is_contiguous() &&
                    fc2_wp.sizes() == at::IntArrayRef({packed_panels(C), Hd, kPanel}),
                op, ": fc2_wp must be pack_linear(fc2_w), float32 (", packed_panels(C), ", ", Hd, ", ", kPanel,
                "), got ", fc2_wp.scalar_type(), " ", fc2_wp.sizes());
  }
  const int64_t Hdp = padded_width(Hd), Cp = padded_width(C);
  a.dw_w = as_f32(dw_w, (name + ": dw_w").c_str(), {a.K, a.K, C});
  a.dw_b = as_f32(dw_b, (name + ": dw_b").c_str(), {C});
  a.b1 = padded_f32(fc1_b, (name + ": fc1_b").c_str(), Hd, Hdp);
  a.b2 = padded_f32(fc2_b, (name + ": fc2_b").c_str(), C, Cp);
  a.g = padded_f32(gamma, (name + ": gamma").c_str(), C, Cp);
  a.pdw = a.dw_w.data_ptr<float>(), a.pdb = a.dw_b.data_ptr<float>(), a.pb1 = a.b1.data_ptr<float>();
  a.pb2 = a.b2.data_ptr<float>(), a.pg = a.g.data_ptr<float>();
  a.w1p = fc1_wp.data_ptr();
  a.w2p = fc2_wp.data_ptr();
  return a;
}

// x (B, H, W, C), float32 or bfloat16, checked; returned contiguous.
static at::Tensor checked_nhwc(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (B, H, W, C), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  return x.contiguous();
}

at::Tensor convffn_nhwc(const at::Tensor& x, const at::Tensor& dw_w, const at::Tensor& dw_b, const at::Tensor& fc1_wp,
                        const at::Tensor& fc1_b, const at::Tensor& fc2_wp, const at::Tensor& fc2_b,
                        const at::Tensor& gamma) {
  const at::Tensor xc = checked_nhwc(x, "convffn_nhwc");
  at::Tensor y = at::empty_like(xc, xc.options().memory_format(c10::MemoryFormat::Contiguous));
  const FfnArgs a = ffn_args("convffn_nhwc", xc, dw_w, dw_b, fc1_wp, fc1_b, fc2_wp, fc2_b, gamma);
  const int64_t B = a.B, H = a.H, W = a.W, C = a.C, K = a.K, Hd = a.Hd;
  if (B == 0 || H == 0 || W == 0 || C == 0) return y;
  const bool bf16 = xc.scalar_type() == at::kBFloat16;
  const void* xp = xc.data_ptr();
  void* yp = y.data_ptr();
  const float *pdw = a.pdw, *pdb = a.pdb, *pb1 = a.pb1, *pb2 = a.pb2, *pg = a.pg;
  const Tiling tl = gemm_tiling(B, H * W);
  const int64_t T = tl.T, tiles = B * tl.n;
  if (a.dp) {
    const auto* q1 = static_cast<const uint16_t*>(a.w1p);
    const auto* q2 = static_cast<const uint16_t*>(a.w2p);
    parallel_tiles(tiles, ffn_avx512bf16::ffn_dp_scratch(T, C, Hd), [&](int64_t b, int64_t e, float* buf) {
      FVK_DP(a.isa, ffn_dp_tiles, static_cast<const uint16_t*>(xp), static_cast<uint16_t*>(yp), H, W, C, Hd, K, pdw,
                                   pdb, q1, pb1, q2, pb2, pg, tl.n, T, b, e, buf);
    });
    return y;
  }
  const float *p1 = static_cast<const float*>(a.w1p), *p2 = static_cast<const float*>(a.w2p);
  const int64_t scratch = ffn_avx512::ffn_scratch(T, C, Hd);  // the widest ISA's strides: >= every ISA's
  FVK_PARALLEL_TILES(ffn_tiles, tiles, scratch, a.isa, xp, yp, bf16, H, W, C, Hd, K, pdw, pdb, p1, pb1, p2, pb2,
                     pg, tl.n, T);
  return y;
}

// The rectangles of repmixer_nhwc (mix_rect): about th x tw = 6 x 32 pixels (FASTVLM_MIX_TILE=THxTW
// overrides), gh x gw per image, gh raised where that makes the tile count over the batch a multiple
// of the thread count (as gemm_tiling). th, tw returned: the largest rectangle mix_rect makes. On
// the Zen 4 of bench/results, 6 x 32 measured 2-6% faster per op than 6 x 16, 12 x 8, 12 x 12 and
// 8 x 24 at stage 0 and about level at stages 1-2 (calls alternated in one process).
struct MixTiling {
  int64_t gh, gw, th, tw;
};
static MixTiling mix_tiling(int64_t B, int64_t H, int64_t W) {
  int64_t th = 6, tw = 32;
  if (const char* env = std::getenv("FASTVLM_MIX_TILE")) {
    long long a = 0, b = 0;
    char rest = 0;
    TORCH_CHECK(std::sscanf(env, "%lldx%lld%c", &a, &b, &rest) == 2 && a > 0 && b > 0,
                "FASTVLM_MIX_TILE must be THxTW with positive integers (e.g. 6x32), got '", env, "'");
    th = a, tw = b;
  }
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads()), gw = (W + tw - 1) / tw;
  int64_t gh = (H + th - 1) / th;
  for (int64_t k = 0; k < nth && (B * gh * gw) % nth && gh < H; ++k) ++gh;
  return {gh, gw, (H + gh - 1) / gh, (W + gw - 1) / gw};
}

// fastvlm_C::repmixer_nhwc -- the RepMixer block: m = dwKm(x) (mix_w (Km, Km, C), mix_b (C): the
// RepMixer with its residual folded in), then y = m + gamma * fc2(GELU(fc1(dw_bnfolded(m)))) (the
// ConvFFN, convffn_nhwc's arguments), fused (ffn_impl.h, mix_tiles): one rectangle of pixels at a
// time, m computed over the rectangle plus the depthwise's halo in per-thread scratch, never in
// memory. m is float32 for either x dtype: for bf16 x a bf16 m would round the residual stream twice
// per block (m, then y); eager bf16 does, and at 1024x1024 that alone made the encoder's error 1.6x
// that of fp32-accumulating ops rounded once (rel-L2 3.3e-2 against 2.0e-2 at 512x512, train-form
// random weights).
at::Tensor repmixer_nhwc(const at::Tensor& x, const at::Tensor& mix_w, const at::Tensor& mix_b,
                         const at::Tensor& dw_w, const at::Tensor& dw_b, const at::Tensor& fc1_wp,
                         const at::Tensor& fc1_b, const at::Tensor& fc2_wp, const at::Tensor& fc2_b,
                         const at::Tensor& gamma) {
  const at::Tensor xc = checked_nhwc(x, "repmixer_nhwc");
  const int64_t C = xc.size(3);
  TORCH_CHECK(mix_w.dim() == 3 && mix_w.size(0) == mix_w.size(1) && mix_w.size(0) % 2 == 1,
              "repmixer_nhwc: mix_w must be (K, K, C) with odd K, got ", mix_w.sizes());
  const int64_t Km = mix_w.size(0);
  const at::Tensor mw = as_f32(mix_w, "repmixer_nhwc: mix_w", {Km, Km, C});
  const at::Tensor mb = as_f32(mix_b, "repmixer_nhwc: mix_b", {C});
  at::Tensor y = at::empty_like(xc, xc.options().memory_format(c10::MemoryFormat::Contiguous));
  const FfnArgs a = ffn_args("repmixer_nhwc", xc, dw_w, dw_b, fc1_wp, fc1_b, fc2_wp, fc2_b, gamma);
  const int64_t B = a.B, H = a.H, W = a.W, K = a.K, Hd = a.Hd;
  if (B == 0 || H == 0 || W == 0 || C == 0) return y;
  const bool bf16 = xc.scalar_type() == at::kBFloat16;
  const void* xp = xc.data_ptr();
  void* yp = y.data_ptr();
  const float *pmw = mw.data_ptr<float>(), *pmb = mb.data_ptr<float>(), *pdw = a.pdw, *pdb = a.pdb, *pb1 = a.pb1,
              *pb2 = a.pb2, *pg = a.pg;
  const MixTiling tl = mix_tiling(B, H, W);
  const int64_t tiles = B * tl.gh * tl.gw;
  if (a.dp) {
    const auto* q1 = static_cast<const uint16_t*>(a.w1p);
    const auto* q2 = static_cast<const uint16_t*>(a.w2p);
    parallel_tiles(tiles, ffn_avx512bf16::mix_dp_scratch(tl.th, tl.tw, C, Hd, K),
                   [&](int64_t b, int64_t e, float* buf) {
                     FVK_DP(a.isa, mix_dp_tiles, static_cast<const uint16_t*>(xp), static_cast<uint16_t*>(yp), H, W,
                                                  C, Hd, Km, pmw, pmb, K, pdw, pdb, q1, pb1, q2, pb2, pg, tl.gh,
                                                  tl.gw, tl.th, tl.tw, b, e, buf);
                   });
    return y;
  }
  const float *p1 = static_cast<const float*>(a.w1p), *p2 = static_cast<const float*>(a.w2p);
  FVK_PARALLEL_TILES(mix_tiles, tiles, ffn_avx512::mix_scratch(tl.th, tl.tw, C, Hd, K), a.isa, xp, yp, bf16, H, W, C,
                     Hd, Km, pmw, pmb, K, pdw, pdb, p1, pb1, p2, pb2, pg, tl.gh, tl.gw, tl.th, tl.tw);
  return y;
}

// dwconv_nhwc's fast path (dwconv.cpp calls it for multiplier 1, stride 1, padding K / 2, odd K): x
// and y (B, H, W, C) contiguous, both float32 or both bfloat16; w (K, K, C) float32 contiguous; b (C)
// float32 or null. Parallel over image rows; thread-count independent.
void dwconv_same_fast(const at::Tensor& x, const float* w, const float* b, int64_t K, at::Tensor& y, bool gelu) {
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  at::Tensor zeros;
  if (!b) {
    zeros = at::zeros({C}, x.options().dtype(at::kFloat));
    b = zeros.data_ptr<float>();
  }
  const Isa isa = active_isa();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), "dwconv_same_fast: y must have x's dtype");
  const void* xp = x.data_ptr();
  void* yp = y.data_ptr();
  if (K == 7) {  // RepCPE: packed channel blocks (dwb_tiles)
    const int64_t RB = ffn_avx2::dwb_band(H), DB = ffn_avx2::DB;
    const int64_t tiles = B * ((C + DB - 1) / DB) * ((H + RB - 1) / RB);
    FVK_PARALLEL_TILES(dwb_tiles, tiles, ffn_avx2::dwb_scratch(H, W), isa, xp, yp, bf16, H, W, C, w, b, gelu);
    return;
  }
  FVK_PARALLEL_TILES(dw_same_rows, B * H, W * C, isa, xp, yp, bf16, H, W, C, K, w, b, gelu);
}

// conv_exp_nhwc's two passes (dwconv.cpp): x (B, H, W, Cin) contiguous float32/bf16, w (K, K, Co) and
// b (Co) float32; z (B*H*W, Co) float32 and rowsums (B*H, Co); then y (B, H, W, Co) = GELU(z * s).
void conv_exp_dw_fast(const at::Tensor& x, const float* w, const float* b, int64_t K, int64_t Co, float* z,
                      float* rowsums) {
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), Cin = x.size(3);
  const Isa isa = active_isa();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const void* xp = x.data_ptr();
  FVK_PARALLEL_TILES(convexp_rows, B * H, 0, isa, xp, bf16, H, W, Cin, Co, K, w, b, z, rowsums);
}

// conv_exp's SE GEMVs: y[i] = act(bias[i] + W[i] . v), i < rows, W (rows, n) float32; act 0 ReLU,
// 1 sigmoid. Rows split over threads; each row summed in a fixed order.
void se_gemv_fast(const float* W, const float* v, const float* bias, int64_t rows, int64_t n, int act, float* y) {
  const Isa isa = active_isa();
  FVK_PARALLEL_TILES(gemv_rows, rows, 0, isa, W, v, bias, n, act, y);
}

void conv_exp_scale_gelu_fast(const float* z, const float* s, at::Tensor& y) {
  const int64_t B = y.size(0), H = y.size(1), W = y.size(2), Co = y.size(3);
  const Isa isa = active_isa();
  const bool bf16 = y.scalar_type() == at::kBFloat16;
  void* yp = y.data_ptr();
  FVK_PARALLEL_TILES(scale_gelu_rows, B * H, 0, isa, z, s, yp, bf16, H, W, Co);
}

// fastvlm_C::stem_nhwc -- GELU(conv3x3 s2) -> GELU(dw3x3 s2) -> GELU(1x1), fused (see stem_block in ffn_impl.h).
//   x (B, H, W, Cin) float32/bf16, any strides; w0 (C, Cin, 3, 3), b0 (C); w1 (3, 3, C), b1 (C);
//   w2p = pack_linear(w2 (C, C)), b2 (C)
at::Tensor stem_nhwc(const at::Tensor& x, const at::Tensor& w0, const at::Tensor& b0, const at::Tensor& w1,
                     const at::Tensor& b1, const at::Tensor& w2p, const at::Tensor& b2) {
  TORCH_CHECK(x.device().is_cpu(), "stem_nhwc: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "stem_nhwc: x must be 4-D (B, H, W, Cin), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "stem_nhwc: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(w0.dim() == 4 && w0.size(2) == 3 && w0.size(3) == 3, "stem_nhwc: w0 must be (C, Cin, 3, 3), got ",
              w0.sizes());
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), Cin = x.size(3), C = w0.size(0);
  TORCH_CHECK(w0.size(1) == Cin, "stem_nhwc: w0 expects ", w0.size(1), " input channels, x has ", Cin);
  TORCH_CHECK(H >= 1 && W >= 1, "stem_nhwc: x must have H, W >= 1, got ", x.sizes());
  check_packed(w2p, C, C, "stem_nhwc: w2p");
  const int64_t Cp = padded_width(C);
  // the conv3x3 as a GEMM over (3, 3, Cin) patches: its weight packed like the 1x1s (small: per call)
  const at::Tensor w0p = pack_linear(as_f32(w0, "stem_nhwc: w0", {C, Cin, 3, 3}).permute({0, 2, 3, 1}).reshape({C, 9 * Cin}));
  const at::Tensor fb0 = padded_f32(b0, "stem_nhwc: b0", C, Cp), fb1 = padded_f32(b1, "stem_nhwc: b1", C, Cp);
  const at::Tensor fw1 = at::constant_pad_nd(as_f32(w1, "stem_nhwc: w1", {3, 3, C}), {0, Cp - C}).contiguous();
  const at::Tensor fb2 = padded_f32(b2, "stem_nhwc: b2", C, Cp);
  const int64_t H1 = (H - 1) / 2 + 1, W1 = (W - 1) / 2 + 1, H2 = (H1 - 1) / 2 + 1, W2 = (W1 - 1) / 2 + 1;
  // x is read through its strides (the model passes the NCHW pixels' permuted view): no NHWC copy
  const int64_t xs[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  at::Tensor y = at::empty({B, H2, W2, C}, x.options().memory_format(c10::MemoryFormat::Contiguous));
  if (B == 0 || C == 0) return y;
  const Isa isa = active_isa();
  // blocks of RB x SW final pixels (FASTVLM_STEM_BLOCK=RBxSW overrides the 32 x 32; any block shape
  // gives the same results: each value is summed in the same order whatever block computes it)
  int64_t RB = 32, SW = 32;
  if (const char* env = std::getenv("FASTVLM_STEM_BLOCK")) {
    long long rb = 0, sw = 0;
    TORCH_CHECK(std::sscanf(env, "%lldx%lld", &rb, &sw) == 2 && rb >= 1 && sw >= 1 && rb <= 256 && sw <= 1024,
                "FASTVLM_STEM_BLOCK must read RBxSW (e.g. 32x32, 1 <= RB <= 256, 1 <= SW <= 1024), got '", env, "'");
    RB = rb, SW = sw;
  }
  const int64_t tiles = B * ((H2 + RB - 1) / RB) * ((W2 + SW - 1) / SW);
  const int64_t scratch = ffn_avx2::stem_scratch(SW, Cin, Cp);  // the same on every ISA
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const void* xp = x.data_ptr();
  void* yp = y.data_ptr();
  const float *p0 = w0p.data_ptr<float>(), *pb0 = fb0.data_ptr<float>(), *p1 = fw1.data_ptr<float>(),
              *pb1 = fb1.data_ptr<float>(), *p2 = w2p.data_ptr<float>(), *pb2 = fb2.data_ptr<float>();
  FVK_PARALLEL_TILES(stem_tiles, tiles, scratch, isa, xp, xs, yp, bf16, H, W, Cin, C, Cp, p0, pb0, p1, pb1, p2, pb2, RB,
                     SW);
  return y;
}

// fastvlm_C::patch_embed_nhwc -- GELU(dw KxK stride s, multiplier Co/Cin) -> GELU(1x1), fused.
//   x (B, H, W, Cin) float32/bf16; dw_w (K, K, Co), dw_b (Co); pw_p = pack_linear(pw_w (Co, Co)), pw_b (Co).
//   For bf16 x on the avx512_bf16 ISA, pw_p may be pack_linear_bf16(pw_w): the 1x1 then multiplies
//   bf16 pairs, its input (the dw + GELU output) rounded to bf16 (ffn_dp_impl.h).
at::Tensor patch_embed_nhwc(const at::Tensor& x, const at::Tensor& dw_w, const at::Tensor& dw_b,
                            const at::Tensor& pw_p, const at::Tensor& pw_b, int64_t stride) {
  TORCH_CHECK(x.device().is_cpu(), "patch_embed_nhwc: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "patch_embed_nhwc: x must be 4-D (B, H, W, C), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "patch_embed_nhwc: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(dw_w.dim() == 3 && dw_w.size(0) == dw_w.size(1) && dw_w.size(0) % 2 == 1,
              "patch_embed_nhwc: dw_w must be (K, K, Co) with odd K, got ", dw_w.sizes());
  TORCH_CHECK(stride >= 1, "patch_embed_nhwc: stride must be >= 1, got ", stride);
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), Cin = x.size(3), K = dw_w.size(0), Co = dw_w.size(2);
  TORCH_CHECK(Cin >= 1 && Co % Cin == 0, "patch_embed_nhwc: dw_w's Co (", Co, ") must be a multiple of x's channels (",
              Cin, ")");
  TORCH_CHECK(H >= 1 && W >= 1, "patch_embed_nhwc: x must have H, W >= 1, got ", x.sizes());
  const Isa isa = active_isa();
  const bool dp = pw_p.scalar_type() == at::kBFloat16;  // bf16-pair panels: the AVX512_BF16 1x1
  if (dp) {
    check_packed_bf16(pw_p, Co, Co, "patch_embed_nhwc: pw_p", "pw_w");
    check_dp_call(x.scalar_type(), isa, "patch_embed_nhwc");
  } else {
    check_packed(pw_p, Co, Co, "patch_embed_nhwc: pw_p");
  }
  const int64_t Cop = padded_width(Co);
  const at::Tensor fw = as_f32(dw_w, "patch_embed_nhwc: dw_w", {K, K, Co}), fb = as_f32(dw_b, "patch_embed_nhwc: dw_b", {Co});
  const at::Tensor pb = padded_f32(pw_b, "patch_embed_nhwc: pw_b", Co, Cop);
  const bool pairs = ffn_avx2::dwm_slides(K, stride, Cin, Co);  // the same on every ISA
  const at::Tensor w2 = pair_layout(fw.data_ptr<float>(), K * K, Co, isa, pairs),
                   b2 = pair_layout(fb.data_ptr<float>(), 1, Co, isa, pairs);
  const float *pw2 = data_or_null(w2), *pb2 = data_or_null(b2);
  const int64_t pad = K / 2, Ho = (H + 2 * pad - K) / stride + 1, Wo = (W + 2 * pad - K) / stride + 1;
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({B, Ho, Wo, Co}, xc.options().memory_format(c10::MemoryFormat::Contiguous));
  if (B == 0) return y;
  const Tiling tl = gemm_tiling(B, Ho * Wo);
  const int64_t T = tl.T, tiles = B * tl.n;
  const int64_t scratch = T * (Co + Cop);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const void* xp = xc.data_ptr();
  void* yp = y.data_ptr();
  const float *pfw = fw.data_ptr<float>(), *pfb = fb.data_ptr<float>(), *ppb = pb.data_ptr<float>();
  if (dp) {
    const auto* wp = reinterpret_cast<const uint16_t*>(pw_p.data_ptr());
    parallel_tiles(tiles, ffn_avx512bf16::dwpw_dp_scratch(T, Co, Cop), [&](int64_t b, int64_t e, float* buf) {
      FVK_DP(isa, dwpw_dp_tiles, static_cast<const uint16_t*>(xp), static_cast<uint16_t*>(yp), H, W, Cin, Co, K,
                                    stride, pfw, pfb, pw2, pb2, wp, ppb, tl.n, T, b, e, buf);
    });
    return y;
  }
  const float* ppw = pw_p.data_ptr<float>();
  FVK_PARALLEL_TILES(dwpw_tiles, tiles, scratch, isa, xp, yp, bf16, H, W, Cin, Co, K, stride, pfw, pfb, pw2, pb2, ppw,
                     ppb, tl.n, T);
  return y;
}

// fastvlm_C::attention_mixer_nhwc -- y = x + gamma * proj(MHSA(LayerNormChannel(x))) (attn_impl.h):
// LayerNorm fused into the qkv GEMM, flash attention (online softmax over key blocks, no N x N
// matrix), proj + bias + layer scale + residual in the epilogue.
//   x (B, H, W, C) float32/bf16; ln_w, ln_b (C); qkv_wp = pack_linear(qkv_w (3C, C)) [q | k | v,
//   heads of head_dim]; proj_wp = pack_linear(proj_w (C, C)), proj_b (C); gamma (C).
//   Softmax scale head_dim^-0.5 (computed in base 2: log2(e) folded into q's scale), LayerNorm eps 1e-5.
at::Tensor attention_mixer_nhwc(const at::Tensor& x, const at::Tensor& ln_w, const at::Tensor& ln_b,
                                const at::Tensor& qkv_wp, const at::Tensor& proj_wp, const at::Tensor& proj_b,
                                const at::Tensor& gamma, int64_t head_dim) {
  TORCH_CHECK(x.device().is_cpu(), "attention_mixer_nhwc: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "attention_mixer_nhwc: x must be 4-D (B, H, W, C), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "attention_mixer_nhwc: x must be float32 or bfloat16, got ", x.scalar_type());
  const int64_t B = x.size(0), N = x.size(1) * x.size(2), C = x.size(3);
  TORCH_CHECK(head_dim >= 1 && C % head_dim == 0, "attention_mixer_nhwc: C = ", C, " is not a multiple of head_dim ",
              head_dim);
  const at::Tensor lw = as_f32(ln_w, "attention_mixer_nhwc: ln_w", {C}), lb = as_f32(ln_b, "attention_mixer_nhwc: ln_b", {C});
  const Isa isa = active_isa();
  // bf16-pair panels (pack_linear_bf16): qkv, S, P V and proj on the AVX512_BF16 kernels (ffn_dp_impl.h)
  const bool dp = qkv_wp.scalar_type() == at::kBFloat16 || proj_wp.scalar_type() == at::kBFloat16;
  if (dp) {
    check_packed_bf16(qkv_wp, 3 * C, C, "attention_mixer_nhwc: qkv_wp", "qkv_w");
    check_packed_bf16(proj_wp, C, C, "attention_mixer_nhwc: proj_wp", "proj_w");
    check_dp_call(x.scalar_type(), isa, "attention_mixer_nhwc");
  } else {
    check_packed(qkv_wp, 3 * C, C, "attention_mixer_nhwc: qkv_wp");
    check_packed(proj_wp, C, C, "attention_mixer_nhwc: proj_wp");
  }
  const int64_t Cp = padded_width(C), ldq = padded_width(3 * C);
  const at::Tensor bp = padded_f32(proj_b, "attention_mixer_nhwc: proj_b", C, Cp),
                   g = padded_f32(gamma, "attention_mixer_nhwc: gamma", C, Cp);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc, xc.options().memory_format(c10::MemoryFormat::Contiguous));
  if (B == 0 || N == 0 || C == 0) return y;

  const int64_t nr = isa >= Isa::avx512 ? 32 : (isa == Isa::avx2 ? 16 : 8);
  const Tiling tl = gemm_tiling(B, N);  // phases 1 and 3
  const int64_t Tq = 2 * nr, BK = 128;
  const int64_t Np = (N + Tq - 1) / Tq * Tq + Tq;
  const auto f32 = xc.options().dtype(at::kFloat);
  at::Tensor O = at::empty({B, N, C}, f32);
  at::Tensor zeros = at::zeros({std::max<int64_t>(ldq, BK) + 64}, f32);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const void* xp = xc.data_ptr();
  void* yp = y.data_ptr();
  float* po = O.data_ptr<float>();
  const float *plw = lw.data_ptr<float>(), *plb = lb.data_ptr<float>(), *pbp = bp.data_ptr<float>(),
              *pg = g.data_ptr<float>(), *pz = zeros.data_ptr<float>();
  // q's scale with log2(e) folded in: the scores come out in base 2 and the softmax takes 2^x (vexp2_neg),
  // the same softmax with a cheaper exponential
  const float scale = static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(head_dim)));
  const int64_t tiles = B * tl.n, T = tl.T, per_image = tl.n, tiles2 = B * ((N + Tq - 1) / Tq);
  if (dp) {  // q, k, v in bf16 pair layouts (ffn_dp_impl.h), zero where no token writes
    const int64_t heads = C / head_dim, hp = ffn_avx512bf16::attn_hp(head_dim);
    const auto h16 = xc.options().dtype(at::kBFloat16);
    at::Tensor Qp = at::zeros({B, heads * hp * Np}, h16), Kh = at::zeros({B, heads * N * hp}, h16);
    at::Tensor Vh = at::zeros({B, C * Np}, h16);
    auto* pq = reinterpret_cast<uint16_t*>(Qp.data_ptr());
    auto* pk = reinterpret_cast<uint16_t*>(Kh.data_ptr());
    auto* pv = reinterpret_cast<uint16_t*>(Vh.data_ptr());
    const auto* wq = reinterpret_cast<const uint16_t*>(qkv_wp.data_ptr());
    const auto* wpr = reinterpret_cast<const uint16_t*>(proj_wp.data_ptr());
    const auto* xh = static_cast<const uint16_t*>(xp);
    auto* yh = static_cast<uint16_t*>(yp);
    parallel_tiles(tiles, ffn_avx512bf16::qkv_dp_scratch(T, C, ldq), [&](int64_t b, int64_t e, float* buf) {
      FVK_DP(isa, qkv_dp_tiles, xh, N, C, head_dim, plw, plb, wq, pz, scale, pq, pk, pv, Np, ldq, per_image, T, b,
                                   e, buf);
    });
    parallel_tiles(tiles2, ffn_avx512bf16::attn_dp_scratch(Tq, BK, head_dim), [&](int64_t b, int64_t e, float* buf) {
      FVK_DP(isa, attn_dp_tiles, N, C, head_dim, pq, pk, pv, Np, pz, Tq, BK, po, b, e, buf);
    });
    parallel_tiles(tiles, ffn_avx512bf16::proj_dp_scratch(T, C, Cp), [&](int64_t b, int64_t e, float* buf) {
      FVK_DP(isa, proj_dp_tiles, xh, yh, N, C, po, wpr, pbp, pg, Cp, per_image, T, b, e, buf);
    });
    return y;
  }
  at::Tensor Qt = at::zeros({B, C, Np}, f32), Vt = at::zeros({B, C, Np}, f32), Kb = at::empty({B, N, C}, f32);
  float *pq = Qt.data_ptr<float>(), *pk = Kb.data_ptr<float>(), *pv = Vt.data_ptr<float>();
  const int64_t scratch2 = BK * Tq + 2 * head_dim * Tq + 2 * Tq;
  const float *pwq = qkv_wp.data_ptr<float>(), *pwp = proj_wp.data_ptr<float>();
  FVK_PARALLEL_TILES(qkv_tiles, tiles, T * (C + ldq), isa, xp, bf16, N, C, head_dim, plw, plb, pwq, pz, scale, pq, pk,
                     pv, Np, ldq, per_image, T);
  FVK_PARALLEL_TILES(attn_tiles, tiles2, scratch2, isa, N, C, head_dim, pq, pk, pv, Np, pz, Tq, BK, po);
  FVK_PARALLEL_TILES(proj_tiles, tiles, T * Cp, isa, xp, yp, bf16, N, C, po, pwp, pbp, pg, Cp, per_image, T);
  return y;
}

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
  float (*chains)(int64_t, float) = ffn_sse::fma_chains;
  int per_iter = ffn_sse::CHAIN_FLOPS;
  if (bf16_dot) {
    chains = ffn_avx512bf16::dp_chains, per_iter = ffn_avx512bf16::DP_CHAIN_FLOPS;
#ifdef FVK_HAVE_AMX
    if (isa == Isa::amx_bf16) chains = ffn_amx::amx_chains, per_iter = ffn_amx::AMX_CHAIN_FLOPS;
#endif
  } else if (isa >= Isa::avx512) {
    chains = ffn_avx512::fma_chains, per_iter = ffn_avx512::CHAIN_FLOPS;
  } else if (isa == Isa::avx2) {
    chains = ffn_avx2::fma_chains, per_iter = ffn_avx2::CHAIN_FLOPS;
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
