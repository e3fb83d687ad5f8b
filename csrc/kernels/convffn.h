// One tile of the ConvFFN: pixels [p0, p0 + np) of one image x (H x Wd x C):
//   d(np x C)    = depthwise KxK (BN folded) of x, pixel-major
//   hid(np x HC) = GELU(d . W1^T + b1) for one chunk of HC hidden channels at a time
//   y[p]         = x[p] + gamma * (hid . W2^T + b2)   (fc2's K ranges accumulate in `acc`)
// The hidden activation goes through in chunks of HC channels: fc1 + GELU for a chunk's channels
// (T x HC, in L2), then that chunk's share of fc2's sum into the fp32 accumulator (T x Cp), so the
// tile's hidden activation is never in cache whole (T x 4C was 0.6-1.6 MB at FastViTHD's stages 2-4
// with T = 96: more than a Zen 3 L2). Bitwise the same as fc1 over all Hd then fc2: each fc2 output
// still sums k = 0 .. Hd - 1 in order. HC is a multiple of NR on every ISA.
#ifndef FVK_HC
#define FVK_HC 256
#endif
constexpr int64_t HC = FVK_HC;
// Row strides: d C, hid hid_stride(Hd), acc Cp (C rounded up to NR so whole vectors can be stored).
// hid's row stride: the chunk width rounded up to NR, plus 16 floats. Without the 16, rows a multiple
// of 4 KB apart would put the 6 rows a micro-tile broadcasts from into the same L1 set, beside the
// weight panel slice: conflict misses in fc2's inner loop.
static inline int64_t hid_stride(int64_t Hd) { return ((Hd < HC ? Hd : HC) + NR - 1) / NR * NR + 16; }
// Scratch floats of ffn_tiles for tiles of T pixels: d (T x C), hid (T x hid_stride), acc (T x Cp).
FVK_ENTRY int64_t ffn_scratch(int64_t T, int64_t C, int64_t Hd) {
  return T * (C + hid_stride(Hd) + (C + NR - 1) / NR * NR);
}

// fc1 + GELU and fc2 (+ layer scale + residual) of one tile's depthwise output d (np x C, fp32):
//   hid(np x HC) = GELU(d . W1^T + b1) for one chunk of HC hidden channels at a time
//   y[t]         = x[t] + gamma * (hid . W2^T + b2)   (fc2's K ranges accumulate in `acc`, np x Cp)
// x, y: the tile's first pixel (row stride C). x null: no epilogue; fc2's finished sums are left in
// acc for the caller's (mix_tile's pixels are not one run of rows).
template <typename T_>
static void ffn_gemms(const float* d, int64_t np, int64_t C, int64_t Hd, const float* w1p, const float* b1,
                      const float* w2p, const float* b2, const float* gamma, const T_* x, T_* y, float* hid,
                      float* acc) {
  const int64_t ldh = hid_stride(Hd), Cp = (C + NR - 1) / NR * NR;
  for (int64_t h0 = 0; h0 < Hd; h0 += HC) {
    const int64_t hc = Hd - h0 < HC ? Hd - h0 : HC;
    // fc1 + GELU, hidden channels [h0, h0 + hc): panels from h0 / PW (h0 is a multiple of PW)
    pgemm_part<0, float>(d, C, np, C, w1p + (h0 / PW) * C * PW, C, hc, b1 + h0, hid, ldh, nullptr, nullptr, 0,
                         nullptr, true, true);
    // fc2's k range [h0, h0 + hc) of its Hd-long sum
    pgemm_part<1, T_>(hid, ldh, np, hc, w2p + h0 * PW, Hd, C, b2, acc, Cp, x, y, C, gamma, h0 == 0,
                      x && h0 + hc == Hd);
  }
}

// One tile of the ConvFFN: pixels [p0, p0 + np) of one image x (H x Wd x C): d(np x C) = depthwise
// KxK (BN folded) of x, pixel-major, then ffn_gemms.
template <typename T_>
static void ffn_tile(const T_* x, T_* y, int64_t H, int64_t Wd, int64_t C, int64_t Hd, int64_t Kk,
                     const float* dw_w, const float* dw_b, const float* w1p, const float* b1, const float* w2p,
                     const float* b2, const float* gamma, int64_t p0, int64_t np, float* d, float* hid, float* acc) {
  dw_rows(x, H, Wd, C, Kk, dw_w, dw_b, p0, np, d);
  ffn_gemms(d, np, C, Hd, w1p, b1, w2p, b2, gamma, x + p0 * C, y + p0 * C, hid, acc);
}

// Tiles [t_begin, t_end) of a batch: tile t covers image t / tiles_per_image, pixels from
// (t % tiles_per_image) * T. b1, b2 and gamma are zero padded to Hdp / Cp floats. x and y both fp32,
// or both bf16 (bf16). `scratch`: ffn_scratch(T, C, Hd) floats.
FVK_ENTRY void ffn_tiles(const void* x, void* y, bool bf16, int64_t H, int64_t Wd, int64_t C, int64_t Hd, int64_t Kk,
                      const float* dw_w, const float* dw_b, const float* w1p, const float* b1, const float* w2p,
                      const float* b2, const float* gamma, int64_t per_image, int64_t T, int64_t t_begin,
                      int64_t t_end, float* scratch) {
  const int64_t HW = H * Wd;
  float *d = scratch, *hid = d + C * T, *acc = hid + hid_stride(Hd) * T;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t b = t / per_image, p0 = tile_start(HW, per_image, t % per_image);
    const int64_t np = tile_start(HW, per_image, t % per_image + 1) - p0;
    const auto tile = [&](const auto* xi, auto* yi) {
      ffn_tile(xi + b * HW * C, yi + b * HW * C, H, Wd, C, Hd, Kk, dw_w, dw_b, w1p, b1, w2p, b2, gamma, p0, np, d, hid,
               acc);
    };
    if (bf16) tile(static_cast<const uint16_t*>(x), static_cast<uint16_t*>(y));
    else tile(static_cast<const float*>(x), static_cast<float*>(y));
  }
}
