// ---- stem: GELU(conv3x3 s2, Cin -> C) -> GELU(dw3x3 s2) -> GELU(1x1 C -> C), fused --------------
// A tile is a block of RB x SW final-grid pixels (rows oh0 .., columns ow0 ..; smaller at the grid's
// edges), walked one final row at a time. Final row oh reads intermediate rows 2 oh - 1 .. 2 oh + 1,
// (2 sw + 1) intermediate pixels of each; the next final row shares the last of them, so a ring of
// three intermediate rows holds them and each final row computes two new ones (the block's first,
// three). An intermediate row: the 3 x 3 x Cin input patches of its pixels go into rows of K0 = 9 Cin
// floats (zero outside the image) and the conv runs on pgemm (packed weight, GELU epilogue: fc1's).
// Neighbouring blocks share one intermediate row / column, so each intermediate value is computed
// (2 RB + 1)(2 SW + 1) / (4 RB SW) times on average (1.03 at 32 x 32; the 4 x 32 blocks used before,
// which held all their intermediate rows at once, 1.14), and the full-resolution intermediate
// (C x H/2 x W/2) never reaches memory. Then the dw3x3 s2 + GELU of the final row's pixels, and the
// 1x1 on pgemm (GELU epilogue into y).
//   w0p: pack_linear of w0 as (C, 3, 3, Cin); b0, w1 (3, 3, Cp), b1 zero padded to Cp (>= NR-rounded C).
// scratch per block: stem_scratch(SW, Cin, Cp) floats (im, the ring, d, and the 1x1's accumulator
// for one final row, used when C > KC_MAX).
FVK_ENTRY int64_t stem_scratch(int64_t SW, int64_t Cin, int64_t Cp) {
  const int64_t mc = 2 * SW + 1;
  return mc * (9 * Cin + 3 * Cp) + 2 * SW * Cp;
}

// x: one image, element (h, w, ci) at x[h * sH + w * sW + ci * sC] (any strides: the NCHW pixels'
// permuted view is read in place, without a copy to NHWC).
template <typename T_>
static void stem_block(const T_* x, int64_t sH, int64_t sW, int64_t sC, T_* y, int64_t H, int64_t Wd, int64_t Cin,
                       int64_t C, int64_t Cp,
                       const float* w0p, const float* b0, const float* w1, const float* b1, const float* w2p,
                       const float* b2, int64_t H1, int64_t W1, int64_t W2, int64_t oh0, int64_t rb, int64_t ow0,
                       int64_t sw, int64_t SW, float* scratch) {
  const int64_t K0 = 9 * Cin, Cv = (C + NR - 1) / NR * NR;  // a ring row's columns [0, Cv) are written by pgemm
  const int64_t mc = 2 * sw + 1, iw0 = 2 * ow0 - 1, mrow = (2 * SW + 1) * Cp;
  float *im = scratch, *ring = im + (2 * SW + 1) * K0, *d = ring + 3 * mrow, *buf = d + SW * Cp;
  const auto slot = [&](int64_t ih1) { return ring + (ih1 + 3) % 3 * mrow; };  // ih1 >= -1
  const auto zero_px = [&](float* p) {  // an intermediate pixel outside the grid: the dw's zero padding
    for (int64_t c = 0; c < Cv; c += VL) vstore(p + c, vset(0.f));
  };
  // Intermediate row ih1 (pixels iw0 .. iw0 + mc - 1) into its ring slot, zero outside the
  // intermediate grid (the dw's padding). im2col first: im row v holds the 3 x 3 x Cin patch at
  // (2 ih1 - 1 .., 2 iw1 - 1 ..), iw1 = iw0 + v, zero outside the image; filled one input row segment
  // at a time (fixed th and ci, all v): the loads walk along w, contiguous in the NCHW pixels' view.
  const auto inter_row = [&](int64_t ih1) {
    float* mid = slot(ih1);
    if (ih1 < 0 || ih1 >= H1) {
      for (int64_t v = 0; v < mc; ++v) zero_px(mid + v * Cp);
      return;
    }
    for (int64_t th = 0; th < 3; ++th) {
      const int64_t ih = 2 * ih1 - 1 + th;
      const bool row_ok = ih >= 0 && ih < H;
      for (int64_t ci = 0; ci < Cin; ++ci) {
        float* o = im + th * 3 * Cin + ci;
        if (!row_ok) {
          for (int64_t v = 0; v < mc; ++v)
            for (int64_t tw = 0; tw < 3; ++tw) o[v * K0 + tw * Cin] = 0.f;
          continue;
        }
        const T_* seg = x + ih * sH + ci * sC;
        for (int64_t v = 0; v < mc; ++v) {
          const int64_t iw1 = iw0 + v, iw = 2 * iw1 - 1;
          if (iw1 >= 1 && iw + 2 < Wd) {  // the patch's three columns inside (so is the pixel)
            o[v * K0] = ld(seg, iw * sW);
            o[v * K0 + Cin] = ld(seg, (iw + 1) * sW);
            o[v * K0 + 2 * Cin] = ld(seg, (iw + 2) * sW);
            continue;
          }
          const bool col_ok = iw1 >= 0 && iw1 < W1;
          for (int64_t tw = 0; tw < 3; ++tw)
            o[v * K0 + tw * Cin] = col_ok && iw + tw >= 0 && iw + tw < Wd ? ld(seg, (iw + tw) * sW) : 0.f;
        }
      }
    }
    pgemm<0, T_>(im, K0, mc, K0, w0p, C, b0, mid, Cp, nullptr, nullptr, 0, nullptr);
    for (int64_t v = 0; v < mc; ++v)  // left / right of the grid
      if (iw0 + v < 0 || iw0 + v >= W1) zero_px(mid + v * Cp);
  };
  // dw3x3 s2 + GELU of final pixel j of the row whose intermediate rows are m[0 .. 2], U channel vectors
  // from c: it reads their columns 2j .. 2j + 2. U independent chains (4, else 2: Cv is a multiple of
  // 2 VL) keep the FMA and the GELU's division latencies overlapped; one vector at a time, perf put a
  // quarter of this loop's samples on the division and the multiply waiting for it.
  const auto dw = [&](auto u_, const float* const* m, int64_t j, int64_t c) {
    constexpr int U = decltype(u_)::value;
    vf acc[U];
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) acc[u] = vload(b1 + c + u * VL);
    for (int64_t kh = 0; kh < 3; ++kh)
      for (int64_t kw = 0; kw < 3; ++kw) {
        const float *mp = m[kh] + (2 * j + kw) * Cp + c, *w = w1 + (kh * 3 + kw) * Cp + c;
#pragma GCC unroll 4
        for (int u = 0; u < U; ++u) acc[u] += vload(mp + u * VL) * vload(w + u * VL);
      }
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) vstore(d + j * Cp + c + u * VL, vgelu(acc[u]));
  };
  inter_row(2 * oh0 - 1);
  for (int64_t i = 0; i < rb; ++i) {
    const int64_t r0 = 2 * (oh0 + i) - 1;  // the row's first intermediate row
    inter_row(r0 + 1);
    inter_row(r0 + 2);
    const float* m[3] = {slot(r0), slot(r0 + 1), slot(r0 + 2)};
    for (int64_t j = 0; j < sw; ++j) {
      int64_t c = 0;
      for (; c + 4 * VL <= Cv; c += 4 * VL) dw(std::integral_constant<int, 4>{}, m, j, c);
      for (; c < Cv; c += 2 * VL) dw(std::integral_constant<int, 2>{}, m, j, c);
    }
    pgemm<2, T_>(d, Cp, sw, C, w2p, C, b2, buf, Cp, nullptr, y + ((oh0 + i) * W2 + ow0) * C, C, nullptr);
  }
}

// Blocks [t_begin, t_end) of a batch of images (H x Wd x Cin; element (b, h, w, ci) at b * xs[0] + h *
// xs[1] + w * xs[2] + ci * xs[3]) -> y (H2 x W2 x C, contiguous): per image, ceil(H2 / RB) x ceil(W2 /
// SW) blocks in row-major order. b0, w1, b1 and b2 zero padded to Cp floats per tap.
FVK_ENTRY void stem_tiles(const void* x, const int64_t* xs, void* y, bool bf16, int64_t H, int64_t Wd, int64_t Cin,
                       int64_t C,
                       int64_t Cp, const float* w0p, const float* b0, const float* w1, const float* b1, const float* w2p,
                       const float* b2, int64_t RB, int64_t SW, int64_t t_begin, int64_t t_end, float* scratch) {
  const int64_t H1 = (H - 1) / 2 + 1, W1 = (Wd - 1) / 2 + 1, H2 = (H1 - 1) / 2 + 1, W2 = (W1 - 1) / 2 + 1;
  const int64_t nbh = (H2 + RB - 1) / RB, nbw = (W2 + SW - 1) / SW, per_image = nbh * nbw;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t b = t / per_image, bh = t % per_image / nbw, bw = t % nbw;
    const int64_t oh0 = bh * RB, ow0 = bw * SW;
    const int64_t rb = H2 - oh0 < RB ? H2 - oh0 : RB, sw = W2 - ow0 < SW ? W2 - ow0 : SW;
    if (bf16) {
      stem_block(static_cast<const uint16_t*>(x) + b * xs[0], xs[1], xs[2], xs[3],
                 static_cast<uint16_t*>(y) + b * H2 * W2 * C, H, Wd, Cin, C, Cp, w0p, b0, w1, b1, w2p, b2, H1, W1, W2,
                 oh0, rb, ow0, sw, SW, scratch);
    } else {
      stem_block(static_cast<const float*>(x) + b * xs[0], xs[1], xs[2], xs[3], static_cast<float*>(y) + b * H2 * W2 * C,
                 H, Wd, Cin, C, Cp, w0p, b0, w1, b1, w2p, b2, H1, W1, W2, oh0, rb, ow0, sw, SW, scratch);
    }
  }
}
