// ---- the RepMixer block, fused: m = dwKm(x), y = m + gamma * ConvFFN(m) ---------------------------
// A tile is a rectangle of one image (mix_rect). Its mixer output m is computed over the rectangle
// grown by the ConvFFN depthwise's padding and clipped to the image (the window) into per-thread
// scratch, so m never reaches memory: the KxK reads a tile pixel's neighbours from the window (any
// neighbour outside it lies outside the image: the zero padding, so the window is an image of its
// own to dw_rows) and the residual reads its centre. Neighbouring tiles recompute the window's
// border: for 6 x 32 tiles and a 7x7, 456 window pixels per 192, at the mixer's Km^2 = 9 multiply-
// adds per pixel and channel against the GEMMs' 8C. Each output is the same sum, in the same order,
// as repmixer_nhwc's earlier form (m through memory, then convffn_nhwc's 1-D tiles) computed it.
struct Rect {
  int64_t b, h0, h1, w0, w1;  // image b, rows [h0, h1), columns [w0, w1)
};
// Tile t of a batch cut into gh x gw rectangles per image (boundaries spread evenly), row-major.
static inline Rect mix_rect(int64_t H, int64_t Wd, int64_t gh, int64_t gw, int64_t t) {
  const int64_t i = t % (gh * gw), r = i / gw, c = i % gw;
  return {t / (gh * gw), r * H / gh, (r + 1) * H / gh, c * Wd / gw, (c + 1) * Wd / gw};
}
// The window of tile r: rows [a0, a1), columns [c0, c1) of the image (r grown by pad, clipped).
struct Win {
  int64_t a0, a1, c0, c1;
};
static inline Win mix_window(const Rect& r, int64_t H, int64_t Wd, int64_t pad) {
  return {r.h0 - pad > 0 ? r.h0 - pad : 0, r.h1 + pad < H ? r.h1 + pad : H, r.w0 - pad > 0 ? r.w0 - pad : 0,
          r.w1 + pad < Wd ? r.w1 + pad : Wd};
}
// mix_dw's packed rows for a tile tw wide: Wm pixels (whole runs of R, and the 7x7's reach).
static inline int64_t mix_wm(int64_t tw) { return (tw + DWB_R - 1) / DWB_R * DWB_R + 8; }
// Floats of one tile's window for tiles of at most th x tw pixels, then (pad 3: a 7x7) mix_dw's packed
// channel block: x's rows (th + 8 of Wm + 2 pixels), m's rows (th + 6 of Wm), the weights and biases.
static inline int64_t mix_window_floats(int64_t th, int64_t tw, int64_t C, int64_t pad) {
  return (th + 2 * pad) * (tw + 2 * pad) * C +
         (pad == 3 ? ((th + 8) * (mix_wm(tw) + 2) + (th + 6) * mix_wm(tw) + 60) * DB + 16 : 0);
}

// Steps 1-2 of a tile: m = the mixer output over the window (image x: H x Wd x C), then d (np x C) =
// the ConvFFN's depthwise of the rectangle's pixels; returns where m's rectangle pixels are for the
// residual. mix_dw and mix_residual are kept out of line, so that profiles show them apart from the
// GEMMs.
struct MView {
  const float* p;  // m at the rectangle's pixel (i, j): p + i * row + j * C
  int64_t row;
};
template <typename TX>
__attribute__((noinline)) static MView mix_dw(const TX* x, int64_t H, int64_t Wd, int64_t C, int64_t Km,
                                              const float* mix_w, const float* mix_b, int64_t Kk, const float* dw_w,
                                              const float* dw_b, const Rect& r, const Win& w, float* mw, float* d) {
  const int64_t ww = w.c1 - w.c0, wh = w.a1 - w.a0, tw = r.w1 - r.w0, th = r.h1 - r.h0;
  if (Km != 3 || Kk != 7) {  // the window's m pixel-major into mw (dw_rows), then the depthwise from it
    for (int64_t a = w.a0; a < w.a1; ++a)
      dw_rows(x, H, Wd, C, Km, mix_w, mix_b, a * Wd + w.c0, ww, mw + (a - w.a0) * ww * C);
    for (int64_t h = r.h0; h < r.h1; ++h)
      dw_rows(static_cast<const float*>(mw), wh, ww, C, Kk, dw_w, dw_b, (h - w.a0) * ww + (r.w0 - w.c0), tw,
              d + (h - r.h0) * tw * C);
    return {mw + ((r.h0 - w.a0) * ww + (r.w0 - w.c0)) * C, ww * C};
  }
  // Km = 3, Kk = 7 (FastViTHD's RepMixer): per block of DB channels (dwb_tiles' packed layout), x over
  // the rectangle grown by 4 into xb (zero outside the image), the 3x3 of it over the rectangle
  // grown by 3 into mb (rows and columns outside the image then zeroed: the 7x7's padding is zeros
  // of m), the rectangle's m into mc (np x C, for the residual), and the 7x7 of mb into d. Each
  // input pixel line is read once per tile, and both convs slide over contiguous rows without
  // border tests. On the dw_rows path the 3x3 runs on x in place (runs of 4 pixels) and the 7x7 on
  // the pixel-major window: perf on the Zen 3's stage-0 op put 16% of the op's kernel samples in
  // the two; here the copies, both convs and the zeroing take 13% (bench.ab: 0.92x on that op).
  // Same sums in the same order as the dw_rows path: bitwise equal up to the sign of zero.
  const int64_t Wm = mix_wm(tw), Wx = Wm + 2;
  float* mc = mw;  // np x C: the window's pixel-major m is not needed on this path
  float* xb = mw + ((th + 6) * (tw + 6) * C + 15) / 16 * 16;  // after mix_window_floats' window part
  float* mb = xb + (th + 8) * Wx * DB;
  float* w3 = mb + (th + 6) * Wm * DB;
  float* b3 = w3 + 9 * DB;
  float* w7 = b3 + DB;
  float* b7 = w7 + 49 * DB;
  const int64_t ax = r.h0 - 4, ux = r.w0 - 4;  // xb's first row and column in the image
  const int64_t j0 = -ux > 0 ? -ux : 0, j1 = Wd - ux < Wx ? Wd - ux : Wx;  // xb's columns in the image
  // mb's columns in the image: mb column j is xb column j + 1
  const int64_t m0 = j0 > 1 ? j0 - 1 : 0, m1 = j1 - 1 < Wm ? j1 - 1 : Wm;
  for (int64_t c0 = 0; c0 < C; c0 += DB) {
    const int64_t nc = C - c0 < DB ? C - c0 : DB;
    dwb_weights(mix_w, mix_b, C, c0, nc, w3, b3, 9);
    dwb_weights(dw_w, dw_b, C, c0, nc, w7, b7, 49);
    for (int64_t i = 0; i < th + 8; ++i) {
      const int64_t a = ax + i;
      const bool in = a >= 0 && a < H;
      dwb_pack_row(x + ((in ? a : 0) * Wd + ux + j0) * C + c0, C, nc, j0, in ? j1 : 0, Wx, xb + i * Wx * DB);
    }
    for (int64_t i = 0; i < th + 6; ++i) {
      float* dst = mb + i * Wm * DB;
      const int64_t a = ax + 1 + i;  // m's image row
      if (a < 0 || a >= H) {
        for (int64_t q = 0; q < Wm * DB; q += VL) vstore(dst + q, vf{});
        continue;
      }
      dwb_row<3>(xb, Wx, Wm, w3, b3, false, i, dst, DB, DB);
      for (int64_t q = 0; q < m0 * DB; q += VL) vstore(dst + q, vf{});
      for (int64_t q = m1 * DB; q < Wm * DB; q += VL) vstore(dst + q, vf{});
      if (i >= 3 && i < th + 3) {
        float* mrow = mc + (i - 3) * tw * C + c0;
        const float* m = dst + 3 * DB;
        if (nc == DB) {
          for (int64_t j = 0; j < tw; ++j)
#pragma GCC unroll 4
            for (int64_t q = 0; q < DB; q += VL) vstore(mrow + j * C + q, vload(m + j * DB + q));
        } else {
          for (int64_t j = 0; j < tw; ++j)
            for (int64_t q = 0; q < nc; ++q) mrow[j * C + q] = m[j * DB + q];
        }
      }
    }
    for (int64_t h = 0; h < th; ++h) dwb_row<7>(mb, Wm, tw, w7, b7, false, h, d + h * tw * C + c0, C, nc);
  }
  return {mc, tw * C};
}

// Step 4: y at the rectangle's pixels (image row stride Wd * C) = m + gamma * acc, residual_out's
// arithmetic (whole 2-vector columns, then the product rounded before the add), m from the window.
template <typename TY>
__attribute__((noinline)) static void mix_residual(MView mv, const Rect& r, const float* acc, int64_t C,
                                                   const float* gamma, TY* y, int64_t Wd) {
  const int64_t tw = r.w1 - r.w0, Cp = (C + NR - 1) / NR * NR, Cv = C / NR * NR;
  for (int64_t h = r.h0; h < r.h1; ++h)
    for (int64_t j = 0; j < tw; ++j) {
      const float* m = mv.p + (h - r.h0) * mv.row + j * C;
      const float* s = acc + ((h - r.h0) * tw + j) * Cp;
      TY* o = y + (h * Wd + r.w0 + j) * C;
      for (int64_t c = 0; c < Cv; c += VL) vst(o + c, vld(m + c) + vload(gamma + c) * vload(s + c));
      if (Cv < C) {
        alignas(64) float g[NR];
        vstore(g, vload(gamma + Cv) * vload(s + Cv));
        vstore(g + VL, vload(gamma + Cv + VL) * vload(s + Cv + VL));
        for (int64_t c = Cv; c < C; ++c) st(o, c, m[c] + g[c - Cv]);
      }
    }
}

// Tiles [t_begin, t_end) of a batch (mix_rect's gh x gw per image, of at most th x tw pixels): x and y
// (B, H, Wd, C), both fp32 or both bf16 (fp32 compute). `scratch`: mix_scratch floats.
FVK_ENTRY int64_t mix_scratch(int64_t th, int64_t tw, int64_t C, int64_t Hd, int64_t Kk) {
  return mix_window_floats(th, tw, C, Kk / 2) + ffn_scratch(th * tw, C, Hd);
}
FVK_ENTRY void mix_tiles(const void* x, void* y, bool bf16, int64_t H, int64_t Wd, int64_t C, int64_t Hd, int64_t Km,
                      const float* mix_w, const float* mix_b, int64_t Kk, const float* dw_w, const float* dw_b,
                      const float* w1p, const float* b1, const float* w2p, const float* b2, const float* gamma,
                      int64_t gh, int64_t gw, int64_t th, int64_t tw, int64_t t_begin, int64_t t_end, float* scratch) {
  float *mw = scratch, *d = mw + mix_window_floats(th, tw, C, Kk / 2), *hid = d + th * tw * C,
        *acc = hid + hid_stride(Hd) * th * tw;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const Rect r = mix_rect(H, Wd, gh, gw, t);
    const Win w = mix_window(r, H, Wd, Kk / 2);
    const int64_t np = (r.h1 - r.h0) * (r.w1 - r.w0), img = r.b * H * Wd * C;
    const auto tile = [&](const auto* xi, auto* yi) {
      const MView mv = mix_dw(xi + img, H, Wd, C, Km, mix_w, mix_b, Kk, dw_w, dw_b, r, w, mw, d);
      ffn_gemms<float>(d, np, C, Hd, w1p, b1, w2p, b2, gamma, nullptr, nullptr, hid, acc);
      mix_residual(mv, r, acc, C, gamma, yi + img, Wd);
    };
    if (bf16) tile(static_cast<const uint16_t*>(x), static_cast<uint16_t*>(y));
    else tile(static_cast<const float*>(x), static_cast<float*>(y));
  }
}
