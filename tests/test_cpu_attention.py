"""The C++ attention mixer op (csrc/ops/attention_mixer.cpp, kernels/attention.h) on every ISA."""
import pytest
import torch

from fastvlm.testing import rel_l2
from cpu_cases import PAIR_ISAS, attn_args, attn_c, isas, needs_ext, use_pair_isa
from rounding_models import attention_bf16_rounded


@needs_ext
def test_attention_bf16_pair_weights_need_bf16_x_and_avx512_bf16(monkeypatch):
    a = [t.bfloat16() for t in attn_args(24, seed=2)]
    pk, pf = torch.ops.fastvlm_C.pack_linear_bf16, torch.ops.fastvlm_C.pack_linear
    x = torch.randn(1, 3, 5, 24, dtype=torch.bfloat16)
    op = torch.ops.fastvlm_C.attention_mixer_nhwc
    monkeypatch.setenv("FASTVLM_CPU_ISA", "avx512")
    with pytest.raises(RuntimeError, match="need the avx512_bf16 kernels, but this call runs"):
        op(x, a[0], a[1], pk(a[2]), pk(a[3]), a[4], a[5], 8)
    with pytest.raises(RuntimeError, match="need bfloat16 x"):
        op(x.float(), a[0], a[1], pk(a[2]), pk(a[3]), a[4], a[5], 8)
    with pytest.raises(RuntimeError, match=r"proj_wp must be pack_linear_bf16\(proj_w\)"):  # mixed layouts
        op(x, a[0], a[1], pk(a[2]), pf(a[3]), a[4], a[5], 8)
    with pytest.raises(RuntimeError, match=r"qkv_wp must be pack_linear_bf16\(qkv_w\)"):
        op(x, a[0], a[1], pk(a[3]), pk(a[3]), a[4], a[5], 8)


@needs_ext
# N = 1, 91, 231 (two key blocks of 128), 400 (four): the online-softmax rescaling across blocks runs
@pytest.mark.parametrize("B,H,W,C,hd", [(1, 1, 1, 64, 32), (3, 7, 13, 40, 8), (1, 33, 7, 64, 32),
                                        (2, 20, 20, 96, 32), (0, 4, 4, 32, 32), (1, 3, 5, 24, 12), (2, 5, 6, 21, 7)])
# term_bound: the attention term alone (y - x); fp32 measured 2-7e-7, and 1.6-2.1e-5 with one of
# vexp2_neg's polynomial coefficients 2% off
@pytest.mark.parametrize("dtype,bound,term_bound", [(torch.float32, 1e-5, 5e-6), (torch.bfloat16, 1e-2, 1e-1)])
def test_attention_mixer_nhwc_every_isa(monkeypatch, B, H, W, C, hd, dtype, bound, term_bound):
    from fastvlm_kernels import reference
    a = attn_args(C, seed=C + hd)
    x = torch.randn(B, H, W, C, dtype=torch.float64) * 2
    ref = reference.attention_mixer(x, *a, hd)
    outs = {}
    for isa in isas(dp=True):
        monkeypatch.setenv("FASTVLM_CPU_ISA", isa)
        y = attn_c(x.to(dtype), [t.to(dtype) for t in a], hd)
        assert y.dtype == dtype and y.shape == x.shape
        if B:
            assert rel_l2(y, ref) <= bound, (isa, rel_l2(y, ref))
            # the attention term itself, not only the residual, matches
            assert rel_l2(y.double() - x, ref - x) <= term_bound, (isa, rel_l2(y.double() - x, ref - x))
        outs[isa] = y
    for isa in set(PAIR_ISAS) & set(outs):
        if dtype == torch.bfloat16 and B * H * W * C >= 1000:
            # qkv / proj on bf16 pairs round their operands: not the fp32-compute path's result
            assert not torch.equal(outs[isa], outs["avx512"]), isa
    with pytest.raises(RuntimeError, match="multiple of head_dim"):
        attn_c(torch.randn(1, 2, 2, C), [t.float() for t in a], C + 1)
    with pytest.raises(RuntimeError, match="qkv_wp must be pack_linear"):
        bad = [t.float() for t in a]
        bad[2] = bad[2][:, :-1]
        attn_c(torch.randn(1, 2, 2, C), bad, hd)
    with pytest.raises(RuntimeError, match="proj_wp must be pack_linear"):  # unpacked weights
        f = [t.float() for t in a]
        torch.ops.fastvlm_C.attention_mixer_nhwc(torch.randn(1, 2, 2, C), f[0], f[1],
                                                 torch.ops.fastvlm_C.pack_linear(f[2]), f[3], f[4], f[5], hd)


@needs_ext
# N = 143 (two key blocks, an odd last one), 256 (two full), 35; head_dim 32, 16, and 9 (odd: a zero partner)
@pytest.mark.parametrize("pair_isa", PAIR_ISAS)
@pytest.mark.parametrize("B,H,W,C,hd", [(2, 11, 13, 64, 32), (1, 16, 16, 96, 16), (1, 5, 7, 27, 9)])
def test_attention_bf16_pair_kernels(monkeypatch, pair_isa, B, H, W, C, hd):
    """The bf16-pair attention mixer (qkv, S = K Q^T, P V and proj on bf16 pairs: AVX512_BF16, or
    AMX tiles where K is a multiple of 32) computes what it says: it matches a float64 model of
    exactly its roundings far more closely than the fp32-compute bf16 path (avx512) does, which
    shows that it, not a fallback, ran."""
    use_pair_isa(monkeypatch, pair_isa)
    a = attn_args(C, seed=hd)
    x = (torch.randn(B, H, W, C, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2).bfloat16()
    ab = [t.to(torch.bfloat16) for t in a]
    want = attention_bf16_rounded(x, a, hd)
    y = attn_c(x, ab, hd)
    monkeypatch.setenv("FASTVLM_CPU_ISA", "avx512")
    y32 = attn_c(x, ab, hd)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    # the attention term itself (the residual x is exact in both)
    e, e32 = rel_l2(y.double() - x.double(), want.double() - x.double()), rel_l2(y32.double() - x.double(),
                                                                                  want.double() - x.double())
    assert e <= 1e-3 and e < e32 / 4, (e, e32)  # measured: e 0 .. 1.1e-4, e32 6-7e-3; fp32 phase 2: 6e-3
    from fastvlm_kernels import reference
    assert rel_l2(y, reference.attention_mixer(x.to(torch.float64), *a, hd)) <= 1e-2
