// ---- patch_embed: GELU(dw KxK stride s, channel multiplier M) -> GELU(1x1), fused ---------------
// Per tile of output pixels: the grouped conv output (Co = M * Cin channels, GELU) goes pixel-major
// into the tile, then the 1x1 runs on pgemm (packed weights, GELU epilogue into y); the Co-wide
// intermediate never leaves the tile. dw_w: (K, K, Co).
// Depthwise KxK, stride s, padding K / 2, channel multiplier M = Co / Cin (BN folded) of one output
// pixel (oh, ow): out[c] = b[c] + sum over the window of x[.][c / M] * w[.][c], GELU'd if `gelu`,
// for channels [c0, Co) (c0 a multiple of 2 VL, or past the vectorised ones).
// M = 2 (patch_embed, conv_exp) runs on duplicated half vectors; other multipliers and the channels
// past the vectorised ones are scalar.
template <typename T_>
static inline void dwm_pixel(const T_* x, int64_t H, int64_t Wd, int64_t Cin, int64_t Co, int64_t Kk, int64_t s,
                             const float* dw_w, const float* dw_b, int64_t oh, int64_t ow, bool gelu, float* out,
                             int64_t c0 = 0) {
  const int64_t M = Co / Cin, pad = Kk / 2, Cv = Co / VL * VL;
  const int64_t kh0 = pad - oh * s > 0 ? pad - oh * s : 0, kh1 = H + pad - oh * s < Kk ? H + pad - oh * s : Kk;
  const int64_t kw0 = pad - ow * s > 0 ? pad - ow * s : 0, kw1 = Wd + pad - ow * s < Kk ? Wd + pad - ow * s : Kk;
  int64_t c = c0;
  if (M == 2) {  // output channels 2ci, 2ci + 1 read input channel ci: duplicated half vectors
    for (; c + 2 * VL <= Cv; c += 2 * VL) {
      vf a0 = vload(dw_b + c), a1 = vload(dw_b + c + VL);
      for (int64_t kh = kh0; kh < kh1; ++kh) {
        const T_* xr = x + ((oh * s - pad + kh) * Wd + (ow * s - pad)) * Cin + c / 2;
        const float* wr = dw_w + kh * Kk * Co + c;
        for (int64_t kw = kw0; kw < kw1; ++kw) {
          a0 += dup2(xr + kw * Cin) * vload(wr + kw * Co);
          a1 += dup2(xr + kw * Cin + VL / 2) * vload(wr + kw * Co + VL);
        }
      }
      if (gelu) a0 = vgelu(a0), a1 = vgelu(a1);
      vstore(out + c, a0), vstore(out + c + VL, a1);
    }
  }
  for (; c < Co; ++c) {
    float a = dw_b[c];
    for (int64_t kh = kh0; kh < kh1; ++kh)
      for (int64_t kw = kw0; kw < kw1; ++kw)
        a += ld(x, ((oh * s - pad + kh) * Wd + (ow * s - pad + kw)) * Cin + c / M) * dw_w[(kh * Kk + kw) * Co + c];
    out[c] = gelu ? ::fastvlm::gelu_scalar(a) : a;
  }
}

// Whether dwm_rows runs a shape on the sliding window (so patch_embed_nhwc makes the pair layout).
FVK_ENTRY bool dwm_slides(int64_t Kk, int64_t s, int64_t Cin, int64_t Co) { return Kk == 7 && s == 2 && Co == 2 * Cin; }

// The grouped dw + GELU of output pixels [p0, p0 + np) (output grid Wo wide), pixel-major into d (np x Co).
// w2 / b2: dw_w / dw_b in pair layout (dw_slide's PAIR form, M = 2 on AVX-512), or null.
template <typename T_>
static void dwm_rows(const T_* x, int64_t H, int64_t Wd, int64_t Cin, int64_t Co, int64_t Kk, int64_t s,
                     const float* dw_w, const float* dw_b, const float* w2, const float* b2, int64_t Wo, int64_t p0,
                     int64_t np, float* d) {
  if (dwm_slides(Kk, s, Cin, Co)) {  // FastViTHD's patch_embed: the sliding window, 6 outputs
    dw_slide_rows<7, 6, 2, 2, true>(x, H, Wd, Cin, Co, dw_w, dw_b, w2, b2, Wo, p0, np, d,
                                    [&](int64_t oh, int64_t ow, int64_t c0, float* out) {
                                      dwm_pixel(x, H, Wd, Cin, Co, Kk, s, dw_w, dw_b, oh, ow, true, out, c0);
                                    });
  } else {
    for (int64_t j = 0; j < np; ++j) {
      const int64_t p = p0 + j;
      dwm_pixel(x, H, Wd, Cin, Co, Kk, s, dw_w, dw_b, p / Wo, p % Wo, true, d + j * Co);
    }
  }
}

template <typename T_>
static void dwpw_tile(const T_* x, T_* y, int64_t H, int64_t Wd, int64_t Cin, int64_t Co, int64_t Kk, int64_t s,
                      const float* dw_w, const float* dw_b, const float* w2, const float* b2, const float* pw_p,
                      const float* pw_b, int64_t Wo, int64_t p0, int64_t np, float* d, float* buf) {
  const int64_t Cop = (Co + NR - 1) / NR * NR;
  dwm_rows(x, H, Wd, Cin, Co, Kk, s, dw_w, dw_b, w2, b2, Wo, p0, np, d);
  pgemm<2, T_>(d, Co, np, Co, pw_p, Co, pw_b, buf, Cop, nullptr, y + p0 * Co, Co, nullptr);
}

// Tiles [t_begin, t_end) of a batch; pw_b padded to Cop floats. `scratch`: T * (Co + Cop) floats.
FVK_ENTRY void dwpw_tiles(const void* x, void* y, bool bf16, int64_t H, int64_t Wd, int64_t Cin, int64_t Co, int64_t Kk,
                       int64_t s, const float* dw_w, const float* dw_b, const float* w2, const float* b2,
                       const float* pw_p, const float* pw_b,
                       int64_t per_image, int64_t T, int64_t t_begin, int64_t t_end, float* scratch) {
  const int64_t pad = Kk / 2, Ho = (H + 2 * pad - Kk) / s + 1, Wo = (Wd + 2 * pad - Kk) / s + 1;
  const int64_t HWo = Ho * Wo;
  float *d = scratch, *buf = d + Co * T;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t b = t / per_image, p0 = tile_start(HWo, per_image, t % per_image);
    const int64_t np = tile_start(HWo, per_image, t % per_image + 1) - p0;
    if (bf16) {
      dwpw_tile(static_cast<const uint16_t*>(x) + b * H * Wd * Cin, static_cast<uint16_t*>(y) + b * HWo * Co, H, Wd,
                Cin, Co, Kk, s, dw_w, dw_b, w2, b2, pw_p, pw_b, Wo, p0, np, d, buf);
    } else {
      dwpw_tile(static_cast<const float*>(x) + b * H * Wd * Cin, static_cast<float*>(y) + b * HWo * Co, H, Wd, Cin,
                Co, Kk, s, dw_w, dw_b, w2, b2, pw_p, pw_b, Wo, p0, np, d, buf);
    }
  }
}
