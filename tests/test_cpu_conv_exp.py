"""The C++ conv_exp op (csrc/ops/conv_exp.cpp, kernels/conv_exp.h) on every ISA."""
import pytest
import torch

from fastvlm.testing import rel_l2
from cpu_cases import isas, needs_ext


@needs_ext
@pytest.mark.parametrize("B,H,W,Cin,M", [(1, 13, 7, 20, 2), (2, 1, 1, 8, 2), (3, 5, 9, 12, 3), (1, 16, 16, 48, 2),
                                         (2, 6, 17, 13, 2)])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_conv_exp_nhwc_every_isa(monkeypatch, B, H, W, Cin, M, dtype, bound):
    """conv_exp's vectorised passes (multiplier 2 on duplicated half vectors, channel tails, other
    multipliers scalar) on every ISA against the float64 reference."""
    from fastvlm_kernels import reference
    g = torch.Generator().manual_seed(Cin * M + H)
    Co, rd = Cin * M, max(1, Cin * M // 4)

    def r(*s, sc=1.0):
        return torch.randn(*s, generator=g, dtype=torch.float64) * sc
    ce = [r(3, 3, Co, sc=0.3), r(Co, sc=0.1), r(rd, Co, sc=0.4), r(rd, sc=0.1), r(Co, rd, sc=0.4), r(Co, sc=0.1)]
    x = r(B, H, W, Cin)
    ref = reference.conv_exp(x.to(dtype).double(), *ce)
    for isa in isas():
        monkeypatch.setenv("FASTVLM_CPU_ISA", isa)
        y = torch.ops.fastvlm_C.conv_exp_nhwc(x.to(dtype), *[t.float() for t in ce])
        assert y.dtype == dtype and y.shape == (B, H, W, Co)
        assert rel_l2(y, ref) <= bound, (isa, rel_l2(y, ref))
