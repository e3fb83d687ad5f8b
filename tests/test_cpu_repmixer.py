"""The C++ RepMixer block op (csrc/ops/repmixer.cpp, kernels/repmixer.h) on every ISA."""
import pytest
import torch
import torch.nn.functional as F

import fastvlm_kernels
from fastvlm.testing import rel_l2
from cpu_cases import PAIR_ISAS, ffn_args, isas, mix_args, needs_ext, repmixer_c
from rounding_models import convffn_bf16_rounded


@needs_ext
@pytest.mark.parametrize("B,H,W,C,Hd", [(1, 7, 13, 19, 76), (3, 1, 1, 5, 20), (2, 33, 7, 40, 160),
                                        (0, 5, 5, 8, 32), (1, 5, 9, 20, 600)])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_repmixer_nhwc_every_isa(monkeypatch, B, H, W, C, Hd, dtype, bound):
    from fastvlm_kernels import reference
    mix, a = mix_args(C, seed=C), ffn_args(C, Hd, seed=1)
    x = torch.randn(B, H, W, C, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = reference.repmixer_block(x, *mix, *a)
    for isa in isas(dp=True):
        monkeypatch.setenv("FASTVLM_CPU_ISA", isa)
        y = repmixer_c(x.to(dtype), [t.to(dtype) for t in mix], [t.to(dtype) for t in a])
        assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
        if B:
            assert rel_l2(y, ref) <= bound, (isa, rel_l2(y, ref))


@needs_ext
@pytest.mark.parametrize("Km,K", [(5, 7), (3, 5), (1, 3)])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_repmixer_nhwc_other_kernel_sizes_every_isa(monkeypatch, Km, K, dtype, bound):
    """Mixer / ConvFFN kernel sizes other than FastViTHD's 3 / 7 take mix_dw's dw_rows path (the
    pixel-major window) instead of the packed channel blocks: the same op, checked the same way."""
    from fastvlm_kernels import reference
    g = torch.Generator().manual_seed(Km * 10 + K)
    C, Hd = 21, 84
    w = torch.randn(Km, Km, C, generator=g, dtype=torch.float64) * 0.2
    w[Km // 2, Km // 2] += 1.0
    mix = [w, torch.randn(C, generator=g, dtype=torch.float64) * 0.1]
    a = ffn_args(C, Hd, K=K, seed=5)
    x = torch.randn(2, 11, 37, C, dtype=torch.float64, generator=g)
    ref = reference.repmixer_block(x, *mix, *a)
    for isa in isas(dp=True):
        monkeypatch.setenv("FASTVLM_CPU_ISA", isa)
        y = repmixer_c(x.to(dtype), [t.to(dtype) for t in mix], [t.to(dtype) for t in a])
        assert y.dtype == dtype and y.shape == x.shape
        assert rel_l2(y, ref) <= bound, (isa, rel_l2(y, ref))


@needs_ext
@pytest.mark.parametrize("B,H,W,C,Hd", [(1, 9, 13, 40, 160), (2, 7, 5, 19, 300)])
def test_repmixer_nhwc_bf16_rounds_the_residual_stream_once(monkeypatch, B, H, W, C, Hd):
    """bf16 storage, fp32 inside the block: the mixer output m stays fp32 between the dw3x3 and the
    ConvFFN, so y = bf16(m + gamma * ffn(m)) is rounded once. (The block used to store m in bf16,
    so the residual stream was rounded twice per block: rel-L2 ~1e-3 here, and at 1024x1024 a
    whole-encoder error of 3.8e-2 against eager bf16's 3.5e-2.) On the fp32-compute paths the op
    then equals the reference op in fp32 up to rare rounding flips; on the AVX512_BF16 path it matches
    a float64 model of its own roundings (the GEMM operands d and GELU output in bf16, m not)."""
    import fastvlm_kernels.cpu as cpu
    from fastvlm_kernels import reference
    mix, a = mix_args(C, seed=3), ffn_args(C, Hd, seed=4)
    x = torch.randn(B, H, W, C, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    mixb, ab = [t.to(torch.bfloat16) for t in mix], [t.to(torch.bfloat16) for t in a]
    r64 = lambda ts: [t.to(torch.float64) for t in ts]  # noqa: E731  (the bf16 weights' values)
    once = reference.repmixer_block(x.to(torch.float64), *r64(mixb), *r64(ab)).to(torch.bfloat16)
    for isa in isas(dp=True):
        monkeypatch.setenv("FASTVLM_CPU_ISA", isa)
        y = repmixer_c(x, mixb, ab)
        if isa in PAIR_ISAS:
            h = F.conv2d(x.to(torch.float64).permute(0, 3, 1, 2), r64(mixb)[0].permute(2, 0, 1)[:, None],
                         r64(mixb)[1], padding=1, groups=C)
            want = convffn_bf16_rounded(h.permute(0, 2, 3, 1), a)  # m exact, then the pair kernel's roundings
            assert rel_l2(y, want) <= 3e-4, (isa, rel_l2(y, want))
        else:
            assert rel_l2(y, once) <= 1e-4, (isa, rel_l2(y, once))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_repmixer_nhwc_rectangles_do_not_change_results(monkeypatch, dtype):
    """repmixer_nhwc cuts each image into rectangles (FASTVLM_MIX_TILE=THxTW) and computes the mixer
    output over each rectangle plus the 7x7's halo: the halo's recomputed pixels, windows clipped
    at every image edge, one-pixel and one-row rectangles, partial channel vectors (C = 40) must give
    bitwise the same result for any rectangle size, on every ISA, and the right one."""
    from fastvlm_kernels import reference
    mix, a = mix_args(40, seed=8), ffn_args(40, 300, seed=9)
    x = torch.randn(2, 13, 41, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    ref = reference.repmixer_block(x.to(dtype).double(), *[t.to(dtype).double() for t in mix],
                                   *[t.to(dtype).double() for t in a])
    for isa in isas(dp=True):
        monkeypatch.setenv("FASTVLM_CPU_ISA", isa)
        outs = []
        for tile in ("1x1", "2x3", "5x7", "13x41", "6x32"):
            monkeypatch.setenv("FASTVLM_MIX_TILE", tile)
            outs.append(repmixer_c(x.to(dtype), [t.to(dtype) for t in mix], [t.to(dtype) for t in a]))
        assert rel_l2(outs[-1], ref) <= (1e-5 if dtype == torch.float32 else 1e-2), (isa, rel_l2(outs[-1], ref))
        for tile, y in zip(("1x1", "2x3", "5x7", "13x41"), outs):
            assert torch.equal(y, outs[-1]), (isa, tile)
    for bad in ("6", "6x", "0x4", "ax3", "6x32y"):
        monkeypatch.setenv("FASTVLM_MIX_TILE", bad)
        with pytest.raises(RuntimeError, match="FASTVLM_MIX_TILE must be THxTW"):
            repmixer_c(x.float(), [t.float() for t in mix], [t.float() for t in a])


@needs_ext
def test_repmixer_nhwc_rejects_bad_input():
    mix, a = [t.float() for t in mix_args(8)], [t.float() for t in ffn_args(8, 32)]
    x = torch.randn(1, 5, 5, 8)
    with pytest.raises(RuntimeError, match="repmixer_nhwc: x must be 4-D"):
        repmixer_c(x[0], mix, a)
    with pytest.raises(RuntimeError, match="repmixer_nhwc: x must be float32 or bfloat16"):
        repmixer_c(x.double(), mix, a)
    with pytest.raises(RuntimeError, match=r"repmixer_nhwc: mix_w must be \(K, K, C\) with odd K"):
        repmixer_c(x, [torch.randn(2, 2, 8), mix[1]], a)
    with pytest.raises(RuntimeError, match=r"repmixer_nhwc: mix_w must have shape \[3, 3, 8\]"):
        repmixer_c(x, [torch.randn(3, 3, 9), mix[1]], a)
    with pytest.raises(RuntimeError, match=r"repmixer_nhwc: mix_b must have shape \[8\]"):
        repmixer_c(x, [mix[0], torch.randn(7)], a)
    with pytest.raises(RuntimeError, match=r"repmixer_nhwc: fc1_wp must be pack_linear\(fc1_w\)"):
        torch.ops.fastvlm_C.repmixer_nhwc(x, *mix, a[0], a[1], a[2], a[3], torch.ops.fastvlm_C.pack_linear(a[4]),
                                          a[5], a[6])
