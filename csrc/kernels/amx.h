// The bf16-pair GEMMs of bf16_pairs.h on AMX tiles (Isa::amx_bf16). Included by bf16_pairs.h right
// after pgemm_dp_part, in the isa_amx namespace only (csrc/isa/amx.cpp (FVK_AMX; compiled for AVX-512 + AVX512_BF16 +
// AMX-TILE + AMX-BF16), where every GEMM of bf16_pairs.h -- the ConvFFN's fc1 / fc2, attention's
// qkv, S, P V and proj, patch_embed's 1x1 -- then goes through pgemm_amx_part instead.
//
// Same operands, same packed weights, same contract as pgemm_dp_part: A is bf16 pixel rows, the
// weight is pack_linear_bf16's panels, whose rows of 16 channel pairs (64 bytes) are exactly the rows
// of an AMX B tile (16 pairs of k x 16 columns). One TDPBF16PS multiplies a 16 x 32 bf16 A tile by a
// 32 x 16 B tile into a 16 x 16 fp32 C tile (8192 multiply-adds; vdpbf16ps does 32).
//
// Blocking: 32 x 32 blocks of C, in four C tiles (tmm0-3: rows 0-15 / 16-31 x columns 0-15 / 16-31),
// two A tiles (tmm4, tmm5: the two 16-row halves) and two B tiles (tmm6, tmm7: the two panels), the
// whole K range per block (each A and B tile used twice). A C block starts from the bias (a tile
// load with row stride 0 puts bias[n0 .. n0 + 16) in every row) or from the fp32 partial sums in
// buf, and ends in buf, or through a 32 x 32 fp32 block on the stack into pgemm_dp_part's epilogues.
// The last block of rows may hold fewer than 32: its second half's tiles are configured with the
// remaining rows (ldtilecfg; a block of at most 16 rows uses the second half's tiles alone), so no
// tile reads or writes a row past np. K must be a multiple of 32 (whole 16-pair tiles): other K go
// to pgemm_dp_part (vdpbf16ps), which FastViTHD's shapes never need (channel counts are multiples of
// 32; only a partial last key block of attention's P V does).
//
// Numerics: TDPBF16PS adds each pair's two products into the fp32 sum as vdpbf16ps does, with its
// denormal inputs treated as zero and denormal results flushed (Intel SDM); the sums run over k in
// the same order. Results need not be bitwise those of pgemm_dp_part.

struct AmxConfig {  // the 64-byte operand of ldtilecfg, palette 1
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
// Tiles 0, 1, 4 with 16 rows, tiles 2, 3, 5 (the block's second half) with r1 rows, 6 and 7 16 rows;
// every tile 64 bytes (16 fp32, or 32 bf16) wide.
static inline void amx_configure(int r1) {
  AmxConfig c;
  __builtin_memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int t = 0; t < 8; ++t) c.colsb[t] = 64, c.rows[t] = 16;
  c.rows[2] = c.rows[3] = c.rows[5] = static_cast<uint8_t>(r1);
  _tile_loadconfig(&c);
}

// The tile loads (GCC's _tile_loadd) do not tell the compiler that they read memory: this barrier
// keeps every store before it (A rows, the partial sums in buf) ahead of the loads that follow.
#define FVK_AMX_BARRIER() __asm__ volatile("" ::: "memory")

// A finished 32 x 32 C block (fp32, row stride 32) waiting for pgemm_dp_part's epilogue: rows
// [done, rows) of the output block at (m0, n0) still to write.
struct AmxPending {
  const float* blk;
  int64_t m0, n0, rows, done;
};
template <int EPI>
static inline void amx_epilogue(AmxPending& p, int64_t upto, int64_t N, uint16_t* h, int64_t ldh, const uint16_t* x,
                                uint16_t* y, int64_t ldy, const float* gamma) {
  const int64_t end = upto < p.rows ? upto : p.rows, n0 = p.n0;
  for (int64_t r = p.done; r < end; ++r) {  // one pixel row at a time
    vf acc0[1] = {vload(p.blk + r * 32)}, acc1[1] = {vload(p.blk + r * 32 + VL)};
    const int64_t t = p.m0 + r;
    if (EPI == 0) {
      vst(h + t * ldh + n0, vgelu_bf16(acc0[0]));
      vst(h + t * ldh + n0 + VL, vgelu_bf16(acc1[0]));
    } else if (EPI == 2) {
      gelu_out<1, true>(acc0, acc1, n0, N, y + t * ldy, ldy);
    } else {
      residual_out<1>(acc0, acc1, n0, N, x + t * ldy, y + t * ldy, ldy, gamma);
    }
  }
  if (end > p.done) p.done = end;
}

// Software pipelining of the epilogue: the vector work of block j's epilogue (GELU, bf16 rounding,
// the residual) runs interleaved with block j + 1's tile loop, a share of its rows after each K step,
// so the vector units and the tile unit work at the same time (the tile instructions' results are
// not needed by it, and in order retirement would otherwise hold the epilogue behind the whole loop).
template <int EPI>
static void pgemm_amx_part(const uint16_t* a, int64_t lda, int64_t np, int64_t K, const uint16_t* Wp, int64_t ldp,
                           int64_t N, const float* bias, float* buf, int64_t ldb, uint16_t* h, int64_t ldh,
                           const uint16_t* x, uint16_t* y, int64_t ldy, const float* gamma, bool first_part,
                           bool last_part) {
  if (K % 32 != 0 || np <= 0 || N <= 0)
    return pgemm_dp_part<EPI>(a, lda, np, K, Wp, ldp, N, bias, buf, ldb, h, ldh, x, y, ldy, gamma, first_part,
                              last_part);
  FVK_AMX_BARRIER();
  const int64_t kb_end = K / 32, sa = lda * 2, sb = ldb * 4;  // K blocks of 16 pairs; byte strides
  const bool to_buf = !last_part || EPI == 3;
  alignas(64) float blks[2][32 * 32];  // finished C blocks: the one being written out, the next
  AmxPending pend{blks[1], 0, 0, 0, 0};  // nothing pending yet (rows 0)
  int64_t step = 0;                       // pending rows written after each K step
  int cur = 0;                            // the blks entry the next block goes to
  int configured = 0;
  for (int64_t m0 = 0; m0 < np; m0 += 32) {
    const int64_t rows = np - m0 < 32 ? np - m0 : 32;
    const bool two = rows > 16;                     // both halves (tiles 0, 1, 4 full), or the second alone
    const int r1 = static_cast<int>(two ? rows - 16 : rows);
    if (r1 != configured) amx_configure(r1), configured = r1;
    const int64_t m1 = two ? m0 + 16 : m0;          // the first row of the second half's tiles
    const uint16_t *a0 = a + m0 * lda, *a1 = a + m1 * lda;
    for (int64_t n0 = 0; n0 < N; n0 += 2 * PW) {     // n0: a multiple of 2 panels
      const uint16_t* w0 = Wp + (n0 / PW) * ldp * 2 * PW;
      const uint16_t* w1 = w0 + ldp * 2 * PW;
      if (first_part) {
        _tile_loadd(2, bias + n0, 0);
        _tile_loadd(3, bias + n0 + PW, 0);
        if (two) {
          _tile_loadd(0, bias + n0, 0);
          _tile_loadd(1, bias + n0 + PW, 0);
        }
      } else {
        _tile_loadd(2, buf + m1 * ldb + n0, sb);
        _tile_loadd(3, buf + m1 * ldb + n0 + PW, sb);
        if (two) {
          _tile_loadd(0, buf + m0 * ldb + n0, sb);
          _tile_loadd(1, buf + m0 * ldb + n0 + PW, sb);
        }
      }
      for (int64_t kb = 0; kb < kb_end; ++kb) {
        _tile_loadd(6, w0 + kb * 32 * PW, 64);
        _tile_loadd(7, w1 + kb * 32 * PW, 64);
        if (two) {
          _tile_loadd(4, a0 + kb * 32, sa);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
        }
        _tile_loadd(5, a1 + kb * 32, sa);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
        if (!to_buf) amx_epilogue<EPI>(pend, (kb + 1) * step, N, h, ldh, x, y, ldy, gamma);
      }
      if (to_buf) {
        _tile_stored(2, buf + m1 * ldb + n0, sb);
        _tile_stored(3, buf + m1 * ldb + n0 + PW, sb);
        if (two) {
          _tile_stored(0, buf + m0 * ldb + n0, sb);
          _tile_stored(1, buf + m0 * ldb + n0 + PW, sb);
        }
        continue;
      }
      amx_epilogue<EPI>(pend, pend.rows, N, h, ldh, x, y, ldy, gamma);  // what the K steps left
      float* blk = blks[cur];
      const int64_t o1 = two ? 16 * 32 : 0;  // the second half's rows in blk
      _tile_stored(2, blk + o1, 128);
      _tile_stored(3, blk + o1 + PW, 128);
      if (two) {
        _tile_stored(0, blk, 128);
        _tile_stored(1, blk + PW, 128);
      }
      pend = AmxPending{blk, m0, n0, rows, 0};  // written out during the next block's K steps
      step = (rows + kb_end - 1) / kb_end;
      cur ^= 1;
    }
  }
  if (!to_buf) amx_epilogue<EPI>(pend, pend.rows, N, h, ldh, x, y, ldy, gamma);
  _tile_release();  // the tile state back to its init state: not saved on context switches
}

// The AMX multiply-add peak (fastvlm_C::peak_gflops on amx_bf16): `iters` rounds of TDPBF16PS into
// four independent C tiles (2 x 16 x 16 x 32 flops each), from two A and two B tiles of small values.
constexpr int AMX_CHAIN_FLOPS = 4 * 2 * 16 * 16 * 32;  // per iteration of amx_chains
float amx_chains(int64_t iters, float seed) {
  alignas(64) uint16_t ab[16 * 32];
  alignas(64) float c[16 * 16];
  for (int i = 0; i < 16 * 32; ++i) ab[i] = 0x2B80;  // bf16 2^-40: the sums stay tiny and normal
  for (int i = 0; i < 16 * 16; ++i) c[i] = seed;
  amx_configure(16);
  FVK_AMX_BARRIER();
  _tile_loadd(0, c, 64);
  _tile_loadd(1, c, 64);
  _tile_loadd(2, c, 64);
  _tile_loadd(3, c, 64);
  _tile_loadd(4, ab, 64);
  _tile_loadd(5, ab, 64);
  _tile_loadd(6, ab, 64);
  _tile_loadd(7, ab, 64);
  for (int64_t it = 0; it < iters; ++it) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  float s = 0.f;  // tile numbers are immediates: one store per tile
  _tile_stored(0, c, 64);
  s += c[0];
  _tile_stored(1, c, 64);
  s += c[0];
  _tile_stored(2, c, 64);
  s += c[0];
  _tile_stored(3, c, 64);
  s += c[0];
  _tile_release();
  return s;
}
