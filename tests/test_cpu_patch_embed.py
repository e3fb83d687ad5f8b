"""The C++ patch_embed op (csrc/ops/patch_embed.cpp, kernels/patch_embed.h) on every ISA."""
import pytest
import torch
import torch.nn.functional as F

from fastvlm.testing import rel_l2
from cpu_cases import PAIR_ISAS, isas, needs_ext, patch_embed_c, use_pair_isa


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
