"""The C++ stem op (csrc/ops/stem.cpp, kernels/stem.h) on every ISA."""
import pytest
import torch

from fastvlm.testing import rel_l2
from cpu_cases import isas, needs_ext, stem_c


@needs_ext
@pytest.mark.parametrize("B,H,W,C", [(1, 13, 17, 13), (2, 1, 1, 8), (3, 7, 33, 20), (0, 9, 9, 8), (1, 19, 23, 45),
                                     (2, 21, 150, 13)])  # the last: several 4 x 32 blocks per image
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_stem_nhwc_every_isa(monkeypatch, B, H, W, C, dtype, bound):
    from fastvlm_kernels import reference
    g = torch.Generator().manual_seed(C)

    def r(*s, sc=1.0):
        return torch.randn(*s, generator=g, dtype=torch.float64) * sc
    a = [r(C, 3, 3, 3, sc=0.5), r(C, sc=0.1), r(3, 3, C, sc=0.4), r(C, sc=0.1), r(C, C, sc=C ** -0.5), r(C, sc=0.1)]
    x = torch.rand(B, H, W, 3, dtype=torch.float64, generator=g)
    ref = reference.stem(x, *a)
    # the same pixels through other strides: the NCHW tensor's permuted view (what FusedStem passes)
    # and a strided slice of a wider, NaN-filled buffer (an offset, no stride of 1); read in place
    xd = x.to(dtype)
    wide = torch.full((B, H + 2, 2 * W + 3, 7), float("nan"), dtype=dtype)
    wide[:, 1:H + 1, 1:2 * W + 1:2, 2:7:2] = xd
    views = [xd.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1), wide[:, 1:H + 1, 1:2 * W + 1:2, 2:7:2]]
    for isa in isas():
        monkeypatch.setenv("FASTVLM_CPU_ISA", isa)
        y = stem_c(xd, [t.to(dtype) for t in a])
        assert y.shape == ref.shape and y.dtype == dtype
        if B:
            assert rel_l2(y, ref) <= bound, (isa, rel_l2(y, ref))
        for v in views:
            assert torch.equal(v, xd) and (v.stride() != xd.stride() or B == 0 or H * W == 1)
            assert torch.equal(stem_c(v, [t.to(dtype) for t in a]), y), isa
    with pytest.raises(RuntimeError, match="input channels"):
        stem_c(torch.rand(1, 8, 8, 4), [t.float() for t in a])
    with pytest.raises(RuntimeError, match=r"w2p must be pack_linear\(\)"):  # an unpacked 1x1 weight
        torch.ops.fastvlm_C.stem_nhwc(torch.rand(1, 8, 8, 3), *[t.float() for t in a])
    monkeypatch.setenv("FASTVLM_STEM_BLOCK", "4by32")
    with pytest.raises(RuntimeError, match="FASTVLM_STEM_BLOCK must read RBxSW"):
        stem_c(torch.rand(1, 8, 8, 3), [t.float() for t in a])
