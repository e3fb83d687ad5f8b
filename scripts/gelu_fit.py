"""Fits the table of gelu.h's piecewise bf16-output GELU (namespace gelu_bf16_pw: vec.h's vgelu_bf16 on
16 lanes, the AVX-512 kernels' GELU for results rounded to bf16 next) and prints it as C++, with its
error in float32 evaluated as the kernels do.

GELU(x) = x Phi(x), with Phi (the normal CDF) piecewise: 32 intervals of width H indexed by
i = round(x / H + MID) (clamped below at 0), so interval i holds [(i - MID - 0.5) H, (i - MID + 0.5) H):
interval 0 (x < -15.5 H) is Phi = 0, interval 31 (x >= 14.5 H) Phi = 1, and intervals 1..30 a cubic in
x each, fitted by least squares of its error relative to Phi. (Reweighted towards the minimax, the
maximum error falls from 2.9e-6 to 2.0e-6, but more values round to a different bf16 than the exact
GELU's: least squares keeps the average error lower.)
numpy only:  python scripts/gelu_fit.py"""
import math

import numpy as np

H, N, MID = 0.32, 32, 16  # i = round(x / H + MID)
HI = (N - 1 - MID) * H  # the clamp of t: inside interval 31, where the table's cubic is 1
_erf = np.vectorize(math.erf)


def phi(x):
    return 0.5 * (1 + _erf(x / math.sqrt(2)))


def gelu(x):
    return x * phi(x)


def fit():
    c = np.zeros((N, 4))
    c[N - 1, 0] = 1.0
    for i in range(1, N - 1):
        lo, hi = (i - MID - 0.5) * H, (i - MID + 0.5) * H
        x = np.linspace(lo - 0.01 * H, hi + 0.01 * H, 2001)  # a little past both ends: ties round to even
        y = phi(x)
        v = np.vander(x, 4, increasing=True)
        c[i] = np.linalg.lstsq(v / y[:, None], np.ones_like(y), rcond=None)[0]  # least squares of (cubic - Phi) / Phi
    return c.astype(np.float32)


def evaluate(c, x):
    """The kernels' evaluation in float32: t = min(x, HI), i from one multiply-add on a 1.5 * 2^23
    offset (its low 5 bits), clamped below, Horner in t, times x."""
    x = x.astype(np.float32)
    t = np.minimum(x, np.float32(HI))
    v = (t.astype(np.float64) * np.float32(1 / H) + np.float32(1.5 * 2**23 + MID)).astype(np.float32)
    i = np.maximum(v, np.float32(1.5 * 2**23)).view(np.int32) & (N - 1)
    p = c[i, 3]
    for k in (2, 1, 0):
        p = (p.astype(np.float64) * t + c[i, k]).astype(np.float32)
    return x * p


if __name__ == "__main__":
    c = fit()
    x = np.linspace(-12, 12, 2_000_001).astype(np.float32)
    err = np.abs(evaluate(c, x) - gelu(x.astype(np.float64))) / np.maximum(1, np.abs(x))
    print(f"// H = {H}, 1 / H = {float(np.float32(1 / H))!r}f, HI = {float(np.float32(HI))!r}f; max |error| on "
          f"[-12, 12] relative to max(1, |x|): {err.max():.3g}")
    for k in range(4):
        vals = ", ".join(f"{v:.9e}f" for v in c[:, k])
        print(f"constexpr float C{k}[32] = {{{vals}}};")
