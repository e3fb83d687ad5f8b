"""The C++ dwconv op: the general path (any stride, multiplier, padding) and the 'same' path, on every ISA."""
import pytest
import torch
import torch.nn.functional as F

from fastvlm.testing import rel_l2
from cpu_cases import dw_weight, isas, needs_ext


@needs_ext
@pytest.mark.parametrize("C,M,K,stride,pad,gelu,H,W,B", [
    (5, 1, 3, 1, 1, False, 7, 9, 3), (6, 2, 7, 2, 3, True, 13, 33, 1), (3, 1, 7, 1, 3, True, 1, 1, 1),
    (17, 2, 3, 2, 1, True, 33, 7, 2), (96, 1, 3, 2, 1, True, 13, 13, 1), (19, 1, 7, 1, 3, False, 1, 13, 0),
])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_dwconv_nhwc_matches_float64(C, M, K, stride, pad, gelu, H, W, B, dtype, bound):
    g = torch.Generator().manual_seed(C * 100 + K)
    x = torch.randn(B, C, H, W, dtype=torch.float64, generator=g)
    w = torch.randn(C * M, 1, K, K, dtype=torch.float64, generator=g)
    b = torch.randn(C * M, dtype=torch.float64, generator=g)
    ref = F.conv2d(x, w, b, stride, pad, groups=C)
    ref = F.gelu(ref) if gelu else ref
    xin = x.to(dtype).permute(0, 2, 3, 1)  # non-contiguous NHWC view: the op makes it contiguous
    out = torch.ops.fastvlm_C.dwconv_nhwc(xin, dw_weight(w), b.float(), stride, pad, gelu)
    assert out.dtype == dtype and out.shape == (B, ref.shape[2], ref.shape[3], C * M)
    if B:
        assert rel_l2(out.permute(0, 3, 1, 2), ref) <= bound
    # no bias
    out_nb = torch.ops.fastvlm_C.dwconv_nhwc(xin, dw_weight(w), None, stride, pad, False)
    if B:
        assert rel_l2(out_nb.permute(0, 3, 1, 2), F.conv2d(x, w, None, stride, pad, groups=C)) <= bound


@needs_ext
@pytest.mark.parametrize("B,H,W,C,K,gelu", [(1, 13, 17, 19, 7, True), (2, 5, 9, 40, 3, False), (1, 1, 70, 33, 7, True),
                                            (3, 8, 4, 8, 3, True), (1, 3, 2, 24, 7, False), (2, 9, 15, 17, 7, False),
                                            (1, 6, 23, 8, 7, True), (1, 4, 1, 40, 7, False),
                                            (1, 70, 9, 48, 7, True), (2, 65, 3, 20, 7, False)])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_dwconv_nhwc_same_padding_path_every_isa(monkeypatch, B, H, W, C, K, gelu, dtype, bound):
    """Multiplier 1, stride 1, 'same' padding (the RepMixer / RepCPE convs) runs the register-blocked
    kernels of csrc/kernels/depthwise.h, compiled per ISA: for K = 7 dwb_tiles, the sliding window of 8 outputs over
    packed blocks of 16 channels (rows narrower than, equal to and just past its 14-column span, runs
    ending past the row, partial channel blocks, images taller than 64 rows in bands of 32 with a short
    last band); for K = 3 runs of 4 pixels and the per-pixel edges."""
    g = torch.Generator().manual_seed(C * 10 + K)
    x = torch.randn(B, C, H, W, dtype=torch.float64, generator=g)
    w = torch.randn(C, 1, K, K, dtype=torch.float64, generator=g)
    b = torch.randn(C, dtype=torch.float64, generator=g)
    ref = F.conv2d(x, w, b, 1, K // 2, groups=C)
    ref = F.gelu(ref) if gelu else ref
    for isa in isas():
        monkeypatch.setenv("FASTVLM_CPU_ISA", isa)
        out = torch.ops.fastvlm_C.dwconv_nhwc(x.to(dtype).permute(0, 2, 3, 1), dw_weight(w), b.float(), 1, K // 2, gelu)
        assert out.dtype == dtype and out.shape == (B, H, W, C)
        assert rel_l2(out.permute(0, 3, 1, 2), ref) <= bound, (isa, rel_l2(out.permute(0, 3, 1, 2), ref))
        out_nb = torch.ops.fastvlm_C.dwconv_nhwc(x.to(dtype).permute(0, 2, 3, 1), dw_weight(w), None, 1, K // 2, False)
        assert rel_l2(out_nb.permute(0, 3, 1, 2), F.conv2d(x, w, None, 1, K // 2, groups=C)) <= bound


@needs_ext
def test_dwconv_nhwc_thread_count_does_not_change_results():
    x = torch.randn(2, 29, 31, 40)
    w, b = torch.randn(7, 7, 40), torch.randn(40)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = torch.ops.fastvlm_C.dwconv_nhwc(x, w, b, 1, 3, True)
        torch.set_num_threads(max(2, n))
        c = torch.ops.fastvlm_C.dwconv_nhwc(x, w, b, 1, 3, True)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, c)


@needs_ext
@pytest.mark.parametrize("args,msg", [
    ((torch.randn(2, 3, 4), torch.randn(3, 3, 4), None, 1, 1, False), "4-D"),
    ((torch.randn(1, 5, 5, 4, dtype=torch.float64), torch.randn(3, 3, 4), None, 1, 1, False), "float32 or bfloat16"),
    ((torch.randn(1, 5, 5, 4), torch.randn(3, 3, 6), None, 1, 1, False), "multiple"),
    ((torch.randn(1, 5, 5, 4), torch.randn(3, 3, 4), torch.randn(5), 1, 1, False), "bias"),
    ((torch.randn(1, 5, 5, 4), torch.randn(3, 3, 4), None, 0, 1, False), "stride"),
    ((torch.randn(1, 2, 2, 4), torch.randn(7, 7, 4), None, 1, 0, False), "smaller than"),
])
def test_dwconv_nhwc_rejects_bad_input(args, msg):
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.fastvlm_C.dwconv_nhwc(*args)
