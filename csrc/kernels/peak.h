// ---- the multiply-add peak of this ISA (bench/: the roofline floors; fastvlm_C::peak_gflops) -----
// `iters` rounds of NCH independent chains acc = acc * m + c on VL floats (one FMA each on AVX2 /
// AVX-512, a multiply and an add on SSE): more chains than an FMA's latency times its issue width on
// the x86 cores this project targets (4 cycles x 2 pipes), so the loop runs at the issue rate, with
// no memory traffic. 2 VL flops per chain step. Returns a value that depends on every result.
constexpr int NCH = 12;
constexpr int CHAIN_FLOPS = 2 * VL * NCH;  // per iteration of fma_chains
template <int N>
static inline float sum_chains(const vf* a) {  // all lanes of a[0 .. N)
  vf s = a[0];
#pragma GCC unroll 16
  for (int i = 1; i < N; ++i) s += a[i];
  float r = 0.f;
  for (int l = 0; l < VL; ++l) r += s[l];
  return r;
}
FVK_ENTRY float fma_chains(int64_t iters, float seed) {
  vf a[NCH];
#pragma GCC unroll 12
  for (int i = 0; i < NCH; ++i) a[i] = vset(seed * static_cast<float>(i + 1));
  const vf m = vset(0.99999994f), c = vset(1e-7f);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < NCH; ++i) a[i] = a[i] * m + c;
  }
  return sum_chains<NCH>(a);
}
