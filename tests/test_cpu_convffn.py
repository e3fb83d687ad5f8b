"""The C++ ConvFFN op (csrc/ops/convffn.cpp, kernels/convffn.h; bf16 pairs: kernels/bf16_pairs.h) on every ISA."""
import pytest
import torch

from fastvlm.testing import rel_l2
from cpu_cases import PAIR_ISAS, convffn_c, ffn_args, isas, needs_ext, use_pair_isa
from rounding_models import convffn_bf16_rounded


@needs_ext
@pytest.mark.parametrize("B,H,W,C,Hd", [(1, 7, 13, 19, 76), (3, 1, 1, 5, 20), (2, 33, 7, 40, 160),
                                        (1, 13, 13, 96, 384), (0, 5, 5, 8, 32), (1, 2, 70, 17, 33),
                                        (1, 5, 9, 20, 600)])  # hidden chunks of 256, 256, 88
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_convffn_nhwc_every_isa(monkeypatch, B, H, W, C, Hd, dtype, bound):
    from fastvlm_kernels import reference
    a = ffn_args(C, Hd)
    x = torch.randn(B, H, W, C, dtype=torch.float64)
    ref = reference.convffn(x, *a)
    outs = {}
    for isa in isas(dp=True):
        monkeypatch.setenv("FASTVLM_CPU_ISA", isa)
        y = convffn_c(x.to(dtype), [t.to(dtype) for t in a])
        assert y.dtype == dtype and y.shape == x.shape
        if B:
            assert rel_l2(y, ref) <= bound, (isa, rel_l2(y, ref))
        outs[isa] = y
    assert "avx2" in outs or "sse" in outs  # the narrow paths always run here


@needs_ext
@pytest.mark.parametrize("pair_isa", PAIR_ISAS)
# odd C, odd chunks; then C multiples of 32 (the AMX tiles run: pixel counts 169, 99, 1 leave partial
# blocks of rows; Hd 600's last chunk of 88 falls back to vdpbf16ps)
@pytest.mark.parametrize("B,H,W,C,Hd", [(1, 7, 13, 19, 76), (3, 1, 1, 5, 21), (2, 33, 7, 40, 160),
                                        (1, 5, 9, 20, 600), (1, 4, 6, 33, 515), (1, 13, 13, 96, 384),
                                        (2, 9, 11, 64, 600), (3, 1, 1, 32, 128)])
def test_convffn_bf16_pair_kernel(monkeypatch, pair_isa, B, H, W, C, Hd):
    """The bf16-pair ConvFFN (AVX512_BF16, real or emulated in scripts/asan.sh's build; AMX tiles)
    computes what it says: bf16 operands, fp32 sums. It matches a float64 model of exactly that far
    more closely than the fp32-compute bf16 path (avx512) does, which shows that it, not a fallback, ran."""
    use_pair_isa(monkeypatch, pair_isa)
    a = ffn_args(C, Hd, seed=7)
    x = torch.randn(B, H, W, C, dtype=torch.float64, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    ab = [t.to(torch.bfloat16) for t in a]
    want = convffn_bf16_rounded(x, a)
    y = convffn_c(x, ab)
    monkeypatch.setenv("FASTVLM_CPU_ISA", "avx512")
    y32 = convffn_c(x, ab)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    e, e32 = rel_l2(y, want), rel_l2(y32, want)
    # measured: e 0 .. 2.1e-4 (the kernel's bf16-output GELU, gelu.h, rounds about 1 in 1000 hidden
    # values one bf16 ulp away from the exact GELU's), e32 0.9e-3 .. 2.6e-3
    assert e <= 5e-4 and e < e32 / 4, (e, e32)
    from fastvlm_kernels import reference
    assert rel_l2(y, reference.convffn(x.to(torch.float64), *a)) <= 1e-2


@needs_ext
@pytest.mark.parametrize("B,H,W,C,Hd", [(1, 13, 13, 96, 384), (2, 9, 11, 64, 256)])
def test_convffn_amx_tiles_run(monkeypatch, B, H, W, C, Hd):
    """On amx_bf16 the ConvFFN's GEMMs run on the tile unit, not on the vdpbf16ps kernel it falls back
    to: same operands, but the sums' roundings differ somewhere (TDPBF16PS's own; both match the
    float64 model in test_convffn_bf16_pair_kernel), so the outputs are not bitwise equal."""
    use_pair_isa(monkeypatch, "amx_bf16")
    a = [t.to(torch.bfloat16) for t in ffn_args(C, Hd, seed=7)]
    x = torch.randn(B, H, W, C, dtype=torch.float64, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    y = convffn_c(x, a)
    monkeypatch.setenv("FASTVLM_CPU_ISA", "avx512_bf16")
    y_dp = convffn_c(x, a)
    assert rel_l2(y, y_dp) <= 1e-4 and not torch.equal(y, y_dp), rel_l2(y, y_dp)


@needs_ext
def test_convffn_bf16_pair_weights_need_bf16_x_and_avx512_bf16(monkeypatch):
    a = [t.bfloat16() for t in ffn_args(24, 96)]
    pk = torch.ops.fastvlm_C.pack_linear_bf16
    x = torch.randn(1, 5, 6, 24, dtype=torch.bfloat16)
    w1, w2 = pk(a[2]), pk(a[4])
    monkeypatch.setenv("FASTVLM_CPU_ISA", "avx512")  # caps every CPU below avx512_bf16
    with pytest.raises(RuntimeError, match="need the avx512_bf16 kernels, but this call runs"):
        torch.ops.fastvlm_C.convffn_nhwc(x, a[0], a[1], w1, a[3], w2, a[5], a[6])
    with pytest.raises(RuntimeError, match="need bfloat16 x"):
        torch.ops.fastvlm_C.convffn_nhwc(x.float(), a[0], a[1], w1, a[3], w2, a[5], a[6])
    with pytest.raises(RuntimeError, match=r"fc2_wp must be pack_linear_bf16\(fc2_w\)"):  # mixed layouts
        torch.ops.fastvlm_C.convffn_nhwc(x, a[0], a[1], w1, a[3], torch.ops.fastvlm_C.pack_linear(a[4]), a[5], a[6])
    with pytest.raises(RuntimeError, match=r"fc1_wp must be pack_linear_bf16\(fc1_w\)"):  # fc1 and fc2 swapped
        torch.ops.fastvlm_C.convffn_nhwc(x, a[0], a[1], w2, a[3], w1, a[5], a[6])


@needs_ext
def test_convffn_nhwc_writes_every_output_and_ignores_input_strides():
    a = [t.float() for t in ffn_args(24, 96)]
    x = torch.randn(2, 9, 11, 24)
    y1 = convffn_c(x, a)
    xt = x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)  # same values, other strides
    y2 = convffn_c(xt, a)
    assert torch.isfinite(y1).all() and torch.equal(y1, y2)


@needs_ext
def test_convffn_nhwc_rejects_bad_input():
    a = [t.float() for t in ffn_args(8, 32)]
    with pytest.raises(RuntimeError, match="4-D"):
        convffn_c(torch.randn(5, 5, 8), a)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        convffn_c(torch.randn(1, 5, 5, 8, dtype=torch.float64), a)
    bad = list(a)
    bad[2] = torch.randn(32, 9)
    with pytest.raises(RuntimeError, match="fc1_w"):
        convffn_c(torch.randn(1, 5, 5, 8), bad)
    with pytest.raises(RuntimeError, match=r"fc1_wp must be pack_linear\(fc1_w\)"):  # unpacked weights
        torch.ops.fastvlm_C.convffn_nhwc(torch.randn(1, 5, 5, 8), *a)
    bad = list(a)
    bad[0] = torch.randn(6, 6, 8)
    with pytest.raises(RuntimeError, match="odd K"):
        convffn_c(torch.randn(1, 5, 5, 8), bad)
