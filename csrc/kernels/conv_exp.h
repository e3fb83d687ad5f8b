// ---- conv_exp (ops/conv_exp.cpp's conv_exp_nhwc): the two passes over the output, vectorised ----
// Pass 1, output rows [r_begin, r_end) of a batch (row r: image r / H): z = dw KxK, stride 1,
// padding K / 2, multiplier Co / Cin (fp32, the row's pixels in order) and the row's per-channel
// sums (summed over the row's pixels in order: thread-count independent).
FVK_ENTRY void convexp_rows(const void* x, bool bf16, int64_t H, int64_t Wd, int64_t Cin, int64_t Co, int64_t Kk,
                         const float* w, const float* b, float* z, float* rowsums, int64_t r_begin, int64_t r_end,
                         float*) {
  const int64_t Cv = Co / VL * VL;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const int64_t bi = r / H, oh = r % H;
    float* zr = z + r * Wd * Co;
    auto row = [&](auto xi) {
      if (Kk == 3 && Co == 2 * Cin) {  // FastViTHD's conv_exp: the sliding window, 8 outputs per run
        // (dw_slide's PAIR form measured 1.03x slower here, 3x3 stride 1: not used)
        dw_slide_rows<3, 8, 1, 2, false>(xi, H, Wd, Cin, Co, w, b, nullptr, nullptr, Wd, oh * Wd, Wd, zr,
                                         [&](int64_t h, int64_t ow, int64_t c0, float* out) {
                                           dwm_pixel(xi, H, Wd, Cin, Co, Kk, 1, w, b, h, ow, false, out, c0);
                                         });
      } else {
        for (int64_t ow = 0; ow < Wd; ++ow) dwm_pixel(xi, H, Wd, Cin, Co, Kk, 1, w, b, oh, ow, false, zr + ow * Co);
      }
    };
    if (bf16) row(static_cast<const uint16_t*>(x) + bi * H * Wd * Cin);
    else row(static_cast<const float*>(x) + bi * H * Wd * Cin);
    float* rs = rowsums + r * Co;  // pixel-outer: streams z's row (a channel-outer sum was 12 KB strides)
    for (int64_t c = 0; c < Co; ++c) rs[c] = 0.f;
    for (int64_t ow = 0; ow < Wd; ++ow) {
      const float* zp = zr + ow * Co;
      for (int64_t c = 0; c < Cv; c += VL) vstore(rs + c, vload(rs + c) + vload(zp + c));
      for (int64_t c = Cv; c < Co; ++c) rs[c] += zp[c];
    }
  }
}

// The SE's two small GEMVs, rows [i_begin, i_end): y[i] = act(bias[i] + W[i] . v), W rows of n
// floats; act 0: ReLU, 1: sigmoid. Four vector accumulators, then the lanes in a fixed order: each
// row is summed the same way whatever thread computes it.
FVK_ENTRY void gemv_rows(const float* W, const float* v, const float* bias, int64_t n, int act, float* y,
                      int64_t i_begin, int64_t i_end, float*) {
  const int64_t n4 = n / (4 * VL) * (4 * VL), nv = n / VL * VL;
  for (int64_t i = i_begin; i < i_end; ++i) {
    const float* w = W + i * n;
    vf a0 = vset(0.f), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k < n4; k += 4 * VL) {
      a0 += vload(w + k) * vload(v + k);
      a1 += vload(w + k + VL) * vload(v + k + VL);
      a2 += vload(w + k + 2 * VL) * vload(v + k + 2 * VL);
      a3 += vload(w + k + 3 * VL) * vload(v + k + 3 * VL);
    }
    for (; k < nv; k += VL) a0 += vload(w + k) * vload(v + k);
    const vf a = (a0 + a1) + (a2 + a3);
    float acc = bias[i];
    for (int l = 0; l < VL; ++l) acc += a[l];
    for (; k < n; ++k) acc += w[k] * v[k];
    y[i] = act == 0 ? (acc > 0.f ? acc : 0.f) : 1.f / (1.f + vexp(vset(-acc))[0]);  // vexp clamps to [-87, 88]
  }
}

// Pass 2, rows [r_begin, r_end): y = GELU(z * s[image]) in y's dtype (y may be z itself, fp32).
FVK_ENTRY void scale_gelu_rows(const float* z, const float* sc, void* y, bool bf16, int64_t H, int64_t Wd, int64_t Co,
                            int64_t r_begin, int64_t r_end, float*) {
  const int64_t Cv = Co / VL * VL;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const float* s = sc + (r / H) * Co;
    for (int64_t ow = 0; ow < Wd; ++ow) {
      const int64_t o = (r * Wd + ow) * Co;
      for (int64_t c = 0; c < Cv; c += VL) {
        const vf v = vgelu(vload(z + o + c) * vload(s + c));
        if (bf16) vst(static_cast<uint16_t*>(y) + o + c, v);
        else vstore(static_cast<float*>(y) + o + c, v);
      }
      for (int64_t c = Cv; c < Co; ++c) {
        const float v = ::fastvlm::gelu_scalar(z[o + c] * s[c]);
        if (bf16) st(static_cast<uint16_t*>(y), o + c, v);
        else static_cast<float*>(y)[o + c] = v;
      }
    }
  }
}
