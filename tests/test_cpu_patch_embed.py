"""The C++ patch_embed op (csrc/ops/patch_embed.cpp, kernels/patch_embed.h) on every ISA."""
import pytest
import torch
import torch.nn.functional as F

from fastvlm.testing import rel_l2
from cpu_cases import PAIR_ISAS, isas, needs_ext, patch_embed_c, use_pair_isa
from rounding_models import gelu_bf16_pw


@needs_ext
@pytest.mark.parametrize("B,H,W,C", [(1, 13, 17, 11), (2, 1, 1, 8), (3, 7, 33, 20), (0, 5, 5, 4), (1, 21, 18, 25),
                                     (1, 30, 29, 24), (2, 9, 3, 8), (1, 4, 26, 16)])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_patch_embed_nhwc_every_isa(monkeypatch, B, H, W, C, dtype, bound):
    """The dw7x7 s2 runs as a sliding window of 6 outputs per row (whole channel vectors; the channels
    past them per pixel): output rows of 15, 2 and 13 pixels, channel counts with and without tails."""
    from fastvlm_kernels import reference
    g = torch.Generator().manual_seed(C)

    def r(*s, sc=1.0):
        return torch.randn(*s, generator=g, dtype=torch.float64) * sc
    a = [r(7, 7, 2 * C, sc=0.2), r(2 * C, sc=0.1), r(2 * C, 2 * C, sc=(2 * C) ** -0.5), r(2 * C, sc=0.1)]
    x = torch.randn(B, H, W, C, dtype=torch.float64, generator=g)
    ref = reference.patch_embed(x, *a)
    for isa in isas(dp=True):
        monkeypatch.setenv("FASTVLM_CPU_ISA", isa)
        y = patch_embed_c(x.to(dtype), [t.to(dtype) for t in a])
        assert y.shape == ref.shape and y.dtype == dtype
        if B:
            assert rel_l2(y, ref) <= bound, (isa, rel_l2(y, ref))
    with pytest.raises(RuntimeError, match="multiple"):
        patch_embed_c(torch.randn(1, 5, 5, 7), [t.float() for t in a])  # 2C is no multiple of 7
    with pytest.raises(RuntimeError, match=r"pw_p must be pack_linear\(\)"):
        torch.ops.fastvlm_C.patch_embed_nhwc(torch.randn(1, 5, 5, C), *[t.float() for t in a], 2)


@needs_ext
@pytest.mark.parametrize("pair_isa", PAIR_ISAS)
@pytest.mark.parametrize("B,H,W,C", [(2, 15, 29, 16), (1, 9, 13, 19), (1, 32, 32, 48)])  # odd 2C-wide tails
def test_patch_embed_bf16_pair_kernel(monkeypatch, pair_isa, B, H, W, C):
    """The bf16-pair patch_embed (the 1x1 on bf16 pairs, its input the dw + GELU output rounded to
    bf16; AVX512_BF16 or AMX tiles) matches a float64 model of exactly that far more closely than the
    fp32-compute path does."""
    use_pair_isa(monkeypatch, pair_isa)
    g = torch.Generator().manual_seed(C + 1)
    r64 = lambda *s, sc=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * sc  # noqa: E731
    a = [r64(7, 7, 2 * C, sc=0.2), r64(2 * C, sc=0.1), r64(2 * C, 2 * C, sc=(2 * C) ** -0.5), r64(2 * C, sc=0.1)]
    x = torch.randn(B, H, W, C, dtype=torch.float64, generator=g).bfloat16()
    ab = [t.bfloat16() for t in a]
    r = lambda t: t.to(torch.bfloat16).to(torch.float64)  # noqa: E731
    w = [r(t) for t in a]
    h = F.gelu(F.conv2d(x.double().permute(0, 3, 1, 2), w[0].permute(2, 0, 1)[:, None], w[1], 2, 3, groups=C))
    want = F.gelu(F.conv2d(r(h), w[2][:, :, None, None], w[3])).permute(0, 2, 3, 1).bfloat16()
    y = patch_embed_c(x, ab)
    monkeypatch.setenv("FASTVLM_CPU_ISA", "avx512")
    y32 = patch_embed_c(x, ab)
    e, e32 = rel_l2(y, want), rel_l2(y32, want)
    assert e <= 5e-4 and e < e32 / 4, (e, e32)


@needs_ext
@pytest.mark.parametrize("pair_isa", PAIR_ISAS)
def test_bf16_pair_gelu_over_its_range(monkeypatch, pair_isa):
    """The bf16-pair kernels' GELU (vec.h's vgelu_bf16: on AVX-512 gelu.h's piecewise x Phi(x), Phi a
    cubic on each of 32 intervals, 0 below -4.96 and 1 above 4.64), alone: the patch_embed 1x1's
    epilogue, with the dw reduced to its centre tap on inputs in [5, 10] (its GELU is the identity
    there, in bf16), a 1x1 that adds two of its channels, one scaled by 2^-9, and biases that put its
    sums (exact) all over [-12, 12] and on NaN and the infinities. Every output is a bf16 rounding of
    a value within 4e-6 max(1, |x|) of float64's GELU (gelu.h: 2.9e-6), and is the bf16 rounding of
    rounding_models.gelu_bf16_pw, a float32 model of that form read from gelu.h (a change to its table
    or its code that bf16 can resolve shows); NaN stays NaN, +inf +inf, and -inf gives NaN as torch's
    GELU does."""
    use_pair_isa(monkeypatch, pair_isa)
    g = torch.Generator().manual_seed(5)
    # avx512_bf16: 2C = 80 channels, two whole 32-channel columns and a partial one; amx_bf16: a K of
    # 2C = 96, a multiple of 32, so that the tile unit runs the 1x1 (and its epilogue the GELU)
    C, H = (48 if pair_isa == "amx_bf16" else 40), 64
    dw = torch.zeros(7, 7, 2 * C)
    dw[3, 3] = 1.0
    x = (5 + 5 * torch.rand(1, H, H, C, generator=g)).bfloat16()
    b = (torch.rand(2 * C, generator=g) * 19 - 17).bfloat16()  # with h in [5, 10]: sums in [-12, 12]
    b[[7, 40, 65, 2 * C - 1]] = torch.tensor([float("nan"), float("inf"), float("-inf"), 3e38]).bfloat16()
    perm = torch.randperm(2 * C, generator=g)
    w = torch.eye(2 * C)[perm] + 2.0 ** -9 * torch.eye(2 * C)[perm.roll(-1)]  # bf16 exactly
    y = patch_embed_c(x, [dw.bfloat16(), torch.zeros(2 * C).bfloat16(), w.bfloat16(), b]).double()
    h = x.double()[:, ::2, ::2].repeat_interleave(2, dim=-1)  # the grouped dw: channel 2c + e reads c
    # y[n] = GELU(h[perm[n]] + 2^-9 h[perm[n + 1]] + b[n]): on a grid of 2^-14 below 16, so the kernel's
    # float32 sums are exact, and fine enough that each interval of the table holds many distinct values
    acc = h[..., perm] + 2.0 ** -9 * h[..., perm.roll(-1)] + b.double()
    ref = F.gelu(acc)
    fin = torch.isfinite(acc)
    # a bf16 rounding of GELU(acc) +- the form's error: half an ulp of bf16 (8 bits) above that error
    e = 4e-6 * acc.abs().clamp(min=1.0)
    half_ulp = torch.exp2(torch.floor(torch.log2((ref.abs() + e).clamp(min=1e-30))) - 8)
    err = (y - ref).abs()
    assert (err[fin] <= (half_ulp + e)[fin]).all(), (err - half_ulp - e)[fin].max().item()
    model = gelu_bf16_pw(acc.float()).bfloat16().double()
    same = (y == model) | (y.isnan() & model.isnan())
    assert same.all(), (same.logical_not().sum().item(), acc[~same][:5], y[~same][:5], model[~same][:5])
    assert (acc[fin] < -5.0).any() and (acc[fin] > 4.7).any() and ((acc[fin] > -4) & (acc[fin] < 4)).sum() > 20000
    assert y[..., 7].isnan().all() and y[..., 65].isnan().all()  # NaN and -inf (-inf * 0)
    assert (y[..., 40] == float("inf")).all() and (y[..., -1] == b[-1].double()).all()  # GELU(3e38 + h) rounds to 3e38
