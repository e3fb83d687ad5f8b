"""The compiled extension: builds, registers its op, computes it right; the package works without it."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastvlm_kernels
from fastvlm.testing import cpu_flags, rel_l2

needs_ext = pytest.mark.skipif(not fastvlm_kernels.extension_available(),
                               reason=f"extension not built: {fastvlm_kernels.extension_error()}")


def _pack(w):  # (Cout, 1, K, K) -> (K, K, Cout) float32
    return w.float()[:, 0].permute(1, 2, 0).contiguous()


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
    out = torch.ops.fastvlm_C.dwconv_nhwc(xin, _pack(w), b.float(), stride, pad, gelu)
    assert out.dtype == dtype and out.shape == (B, ref.shape[2], ref.shape[3], C * M)
    if B:
        assert rel_l2(out.permute(0, 3, 1, 2), ref) <= bound
    # no bias
    out_nb = torch.ops.fastvlm_C.dwconv_nhwc(xin, _pack(w), None, stride, pad, False)
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
    kernels of ffn_impl.h, compiled per ISA: for K = 7 dwb_tiles, the sliding window of 8 outputs over
    packed blocks of 16 channels (rows narrower than, equal to and just past its 14-column span, runs
    ending past the row, partial channel blocks, images taller than 64 rows in bands of 32 with a short
    last band); for K = 3 runs of 4 pixels and the per-pixel edges."""
    g = torch.Generator().manual_seed(C * 10 + K)
    x = torch.randn(B, C, H, W, dtype=torch.float64, generator=g)
    w = torch.randn(C, 1, K, K, dtype=torch.float64, generator=g)
    b = torch.randn(C, dtype=torch.float64, generator=g)
    ref = F.conv2d(x, w, b, 1, K // 2, groups=C)
    ref = F.gelu(ref) if gelu else ref
    for isa in _isas():
        monkeypatch.setenv("FASTVLM_CPU_ISA", isa)
        out = torch.ops.fastvlm_C.dwconv_nhwc(x.to(dtype).permute(0, 2, 3, 1), _pack(w), b.float(), 1, K // 2, gelu)
        assert out.dtype == dtype and out.shape == (B, H, W, C)
        assert rel_l2(out.permute(0, 3, 1, 2), ref) <= bound, (isa, rel_l2(out.permute(0, 3, 1, 2), ref))
        out_nb = torch.ops.fastvlm_C.dwconv_nhwc(x.to(dtype).permute(0, 2, 3, 1), _pack(w), None, 1, K // 2, False)
        assert rel_l2(out_nb.permute(0, 3, 1, 2), F.conv2d(x, w, None, 1, K // 2, groups=C)) <= bound


@needs_ext
@pytest.mark.parametrize("C", [37, 48])
def test_gelu_clamp_edges_nan_and_inf_every_isa(monkeypatch, C):
    """The vector GELU (ffn_impl.h's vgelu, its clamp on the ISA's min / max instructions) and the
    scalar one of the tail, through dwconv's GELU with a 1x1 identity kernel: values around
    erf's clamp at |x| = 3.925 * sqrt(2) = 5.5508, far beyond it, zeros of both signs and random
    ones against float64 GELU; a NaN stays NaN, +inf stays +inf and -inf gives NaN as torch's
    GELU does (-inf * 0)."""
    g = torch.Generator().manual_seed(C)
    edge = [5.5508, 5.54, 5.56, 6.0, 9.5, 1e3, 3e38, 0.0, -0.0, 1e-30]
    edge = torch.tensor(edge + [-v for v in edge], dtype=torch.float64)
    x = torch.randn(1, 4, 6, C, dtype=torch.float64, generator=g) * 3
    flat = x.view(-1)
    pos = torch.randperm(flat.numel(), generator=g)
    flat[pos[:edge.numel()]] = edge
    nan_at, pinf_at, ninf_at = pos[edge.numel()], pos[edge.numel() + 1], pos[edge.numel() + 2]
    flat[nan_at], flat[pinf_at], flat[ninf_at] = float("nan"), float("inf"), float("-inf")
    w = torch.ones(1, 1, C)  # out = GELU(x * 1 + 0)
    ref = F.gelu(x)
    finite = torch.isfinite(x)
    for isa in _isas():
        monkeypatch.setenv("FASTVLM_CPU_ISA", isa)
        out = torch.ops.fastvlm_C.dwconv_nhwc(x.float(), w, torch.zeros(C), 1, 0, True).double()
        err = (out - ref).abs()[finite]
        tol = 1e-6 * torch.clamp(x.abs()[finite], min=1.0)
        assert (err <= tol).all(), (isa, err.max().item())
        o = out.view(-1)
        assert o[nan_at].isnan() and o[ninf_at].isnan(), isa
        assert o[pinf_at].item() == float("inf"), isa


@needs_ext
def test_exp_clamps_in_sigmoid_and_softmax_every_isa(monkeypatch):
    """ffn_impl.h's vexp clamps its argument to [-87, 88] and vexp2_neg (attention's softmax, in base
    2) below at -125, on the ISA's max / min instructions: conv_exp's SE sigmoid with logits far past
    both ends (exp of +-200, +-95, +-88.5), and attention with scores sharp enough that most
    2^(s - max) fall below 2^-125, against float64."""
    from fastvlm_kernels import reference
    g = torch.Generator().manual_seed(9)
    C, Co, rd = 8, 16, 4
    x = torch.randn(1, 5, 6, C, dtype=torch.float64, generator=g)
    w, b = torch.randn(3, 3, Co, dtype=torch.float64, generator=g), torch.randn(Co, dtype=torch.float64, generator=g)
    se_r_w, se_r_b = torch.randn(rd, Co, dtype=torch.float64, generator=g) * 0.1, torch.zeros(rd, dtype=torch.float64)
    se_e_w = torch.randn(Co, rd, dtype=torch.float64, generator=g) * 0.01
    se_e_b = torch.tensor([-200, -95, -88.5, -87, -80, -1, 0, 1, 80, 87, 88.5, 95, 200, -150, 150, 3], dtype=torch.float64)
    ce = [w, b, se_r_w, se_r_b, se_e_w, se_e_b]
    ref_ce = reference.conv_exp(x, *ce)
    a = _attn_args(32, seed=3)
    a[2] = a[2] * 12  # qkv: scores of several hundred
    xa = torch.randn(1, 6, 7, 32, dtype=torch.float64, generator=g)
    ref_at = reference.attention_mixer(xa, *a, 8)
    for isa in _isas():
        monkeypatch.setenv("FASTVLM_CPU_ISA", isa)
        y = torch.ops.fastvlm_C.conv_exp_nhwc(x.float(), *[t.float() for t in ce]).double()
        assert torch.isfinite(y).all(), isa
        assert (y - ref_ce).abs().max() <= 1e-5 * ref_ce.abs().max(), (isa, (y - ref_ce).abs().max().item())
        ya = _attn_c(xa.float(), [t.float() for t in a], 8).double()
        assert torch.isfinite(ya).all(), isa
        assert rel_l2(ya - xa, ref_at - xa) <= 1e-4, (isa, rel_l2(ya - xa, ref_at - xa))


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


def test_package_imports_without_extension(tmp_path):
    """With _C unimportable, fastvlm_kernels imports, warns once, and fastvlm still runs."""
    code = r"""
import sys, warnings, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "fastvlm_kernels._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import fastvlm_kernels
    a = fastvlm_kernels.extension_available(); b = fastvlm_kernels.extension_available()
msgs = [str(x.message) for x in w if "C++ extension" in str(x.message)]
import torch, fastvlm
m = fastvlm.FastViTHD(fastvlm.FastViTHDConfig.tiny()).eval()
assert m(torch.rand(1, 3, 64, 64)).shape == (1, 1, 256)
print(a, b, len(msgs))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "1"]


# ---- the fused ConvFFN kernel (csrc/ffn.cpp) -------------------------------------------------------

def _ffn_args(C, Hd, K=7, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s, sc=1.0):
        return torch.randn(*s, generator=g, dtype=torch.float64) * sc
    return [r(K, K, C, sc=0.2), r(C, sc=0.1), r(Hd, C, sc=C ** -0.5), r(Hd, sc=0.1), r(C, Hd, sc=Hd ** -0.5),
            r(C, sc=0.1), r(C).abs() + 0.5]


def _convffn_c(x, a):
    """The C++ op with fc1_w / fc2_w packed as the cpu backend packs them: pack_linear's panels, or
    pack_linear_bf16's pairs where the bf16 ConvFFN runs the AVX512_BF16 kernel now."""
    import fastvlm_kernels.cpu as cpu
    pk = torch.ops.fastvlm_C.pack_linear_bf16 if cpu.uses_bf16_pairs(x.dtype) else torch.ops.fastvlm_C.pack_linear
    return torch.ops.fastvlm_C.convffn_nhwc(x, a[0], a[1], pk(a[2]), a[3], pk(a[4]), a[5], a[6])


def _attn_c(x, a, hd):
    """The C++ attention mixer with qkv_w / proj_w packed as the cpu backend packs them (pack_linear,
    or pack_linear_bf16 where bf16 runs the AVX512_BF16 kernels now)."""
    import fastvlm_kernels.cpu as cpu
    pk = torch.ops.fastvlm_C.pack_linear_bf16 if cpu.uses_bf16_pairs(x.dtype) else torch.ops.fastvlm_C.pack_linear
    return torch.ops.fastvlm_C.attention_mixer_nhwc(x, a[0], a[1], pk(a[2]), pk(a[3]), a[4], a[5], hd)


@needs_ext
@pytest.mark.parametrize("N,K", [(1, 1), (17, 5), (32, 3), (33, 7), (96, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_linear_layout(N, K, dtype):
    w = torch.randn(N, K).to(dtype)
    p = torch.ops.fastvlm_C.pack_linear(w)
    P = (N + 31) // 32 * 2
    assert p.dtype == torch.float32 and p.shape == (P, K, 16)
    full = torch.zeros(P * 16, K)
    full[:N] = w.float()
    assert torch.equal(p, full.reshape(P, 16, K).transpose(1, 2))  # p[q][k][i] = w[16q + i][k], zero padded


@needs_ext
@pytest.mark.parametrize("N,K", [(1, 1), (17, 5), (32, 4), (33, 7), (96, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_linear_bf16_layout(N, K, dtype):
    w = torch.randn(N, K).to(dtype)
    p = torch.ops.fastvlm_C.pack_linear_bf16(w)
    P, KP = (N + 31) // 32 * 2, (K + 1) // 2
    assert p.dtype == torch.bfloat16 and p.shape == (P, KP, 32)
    full = torch.zeros(P * 16, 2 * KP, dtype=torch.bfloat16)
    full[:N, :K] = w.bfloat16()  # float32 rounds to nearest even
    # p[q][j][2i + e] = w[16q + i][2j + e], zero padded (channels past N, k = K when K is odd)
    assert torch.equal(p, full.reshape(P, 16, KP, 2).permute(0, 2, 1, 3).reshape(P, KP, 32))


@needs_ext
def test_cpu_backend_repacks_when_a_weight_changes_in_place():
    import fastvlm_kernels.cpu as cpu
    w = torch.randn(40, 12)
    p1 = cpu.packed(w)
    assert cpu.packed(w) is p1  # packed once
    with torch.no_grad():
        w.mul_(2)
    p2 = cpu.packed(w)
    assert p2 is not p1 and torch.equal(p2, 2 * p1)
    with torch.inference_mode():
        wi = torch.randn(40, 12)
    assert torch.equal(cpu.packed(wi), torch.ops.fastvlm_C.pack_linear(wi))  # no version counter: packed per call
    # the bf16-pair layout is cached beside the float32 one, and repacked the same way
    q1 = cpu.packed(w, pairs=True)
    assert q1.dtype == torch.bfloat16 and cpu.packed(w, pairs=True) is q1 and cpu.packed(w) is p2
    with torch.no_grad():
        w.mul_(-1)
    assert torch.equal(cpu.packed(w, pairs=True), -q1) and torch.equal(cpu.packed(w), -p2)


def _stem_c(x, a):  # the C++ stem with its 1x1 weight packed
    return torch.ops.fastvlm_C.stem_nhwc(x, *a[:4], torch.ops.fastvlm_C.pack_linear(a[4]), a[5])


def _patch_embed_c(x, a):
    """The C++ patch_embed with its 1x1 weight packed as the cpu backend packs it (pack_linear, or
    pack_linear_bf16 where bf16 runs the AVX512_BF16 kernels now)."""
    import fastvlm_kernels.cpu as cpu
    pk = torch.ops.fastvlm_C.pack_linear_bf16 if cpu.uses_bf16_pairs(x.dtype) else torch.ops.fastvlm_C.pack_linear
    return torch.ops.fastvlm_C.patch_embed_nhwc(x, a[0], a[1], pk(a[2]), a[3], 2)


PAIR_ISAS = ("amx_bf16", "avx512_bf16")  # the ISAs whose bf16 GEMMs multiply bf16 pairs (ffn_dp_impl.h)


def _isas(dp=False):
    """Every ISA path this CPU can run (the widest first): FASTVLM_CPU_ISA caps the choice.
    amx_bf16 and avx512_bf16 are only listed with dp (they change the bf16 GEMMs only)."""
    import fastvlm_kernels.cpu as cpu
    best = cpu.cpu_isa()
    order = ["amx_bf16", "avx512_bf16", "avx512", "avx2", "sse"]
    if not dp:
        order, best = order[2:], ("avx512" if best in PAIR_ISAS else best)
    return order[order.index(best):]


def _use_pair_isa(monkeypatch, isa):
    """Runs the rest of the test on the bf16-pair ISA `isa` (FASTVLM_CPU_ISA), or skips it where this
    CPU does not have it."""
    import fastvlm_kernels.cpu as cpu
    if isa not in _isas(dp=True):
        pytest.skip(f"no {isa} here (scripts/asan.sh tests the avx512_bf16 kernels emulated on AVX2 CPUs)")
    monkeypatch.setenv("FASTVLM_CPU_ISA", isa)
    assert cpu.cpu_isa() == isa


@needs_ext
@pytest.mark.parametrize("B,H,W,C,Hd", [(1, 7, 13, 19, 76), (3, 1, 1, 5, 20), (2, 33, 7, 40, 160),
                                        (1, 13, 13, 96, 384), (0, 5, 5, 8, 32), (1, 2, 70, 17, 33),
                                        (1, 5, 9, 20, 600)])  # hidden chunks of 256, 256, 88
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_convffn_nhwc_every_isa(monkeypatch, B, H, W, C, Hd, dtype, bound):
    from fastvlm_kernels import reference
    a = _ffn_args(C, Hd)
    x = torch.randn(B, H, W, C, dtype=torch.float64)
    ref = reference.convffn(x, *a)
    outs = {}
    for isa in _isas(dp=True):
        monkeypatch.setenv("FASTVLM_CPU_ISA", isa)
        y = _convffn_c(x.to(dtype), [t.to(dtype) for t in a])
        assert y.dtype == dtype and y.shape == x.shape
        if B:
            assert rel_l2(y, ref) <= bound, (isa, rel_l2(y, ref))
        outs[isa] = y
    assert "avx2" in outs or "sse" in outs  # the narrow paths always run here


def _convffn_bf16_rounded(x, a):
    """The bf16 ConvFFN as the AVX512_BF16 kernel computes it, in float64: the depthwise output and
    the GELU output rounded to bf16 (the operands of the pair products), weights in bf16, the
    result rounded to bf16."""
    import torch.nn.functional as F
    r = lambda t: t.to(torch.bfloat16).to(torch.float64)  # noqa: E731
    w = [r(t) for t in a]
    h = x.to(torch.float64).permute(0, 3, 1, 2)
    k = w[0].shape[0]
    d = r(F.conv2d(h, w[0].permute(2, 0, 1)[:, None], w[1], padding=k // 2, groups=h.shape[1]))
    hid = r(F.gelu(F.conv2d(d, w[2][:, :, None, None], w[3])))
    f = F.conv2d(hid, w[4][:, :, None, None], w[5])
    return (h + w[6][None, :, None, None] * f).permute(0, 2, 3, 1).to(torch.bfloat16)


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
    _use_pair_isa(monkeypatch, pair_isa)
    a = _ffn_args(C, Hd, seed=7)
    x = torch.randn(B, H, W, C, dtype=torch.float64, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    ab = [t.to(torch.bfloat16) for t in a]
    want = _convffn_bf16_rounded(x, a)
    y = _convffn_c(x, ab)
    monkeypatch.setenv("FASTVLM_CPU_ISA", "avx512")
    y32 = _convffn_c(x, ab)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    e, e32 = rel_l2(y, want), rel_l2(y32, want)
    assert e <= 5e-4 and e < e32 / 4, (e, e32)  # measured: e 0 .. 1e-4, e32 0.9e-3 .. 2.6e-3
    from fastvlm_kernels import reference
    assert rel_l2(y, reference.convffn(x.to(torch.float64), *a)) <= 1e-2


@needs_ext
@pytest.mark.parametrize("B,H,W,C,Hd", [(1, 13, 13, 96, 384), (2, 9, 11, 64, 256)])
def test_convffn_amx_tiles_run(monkeypatch, B, H, W, C, Hd):
    """On amx_bf16 the ConvFFN's GEMMs run on the tile unit, not on the vdpbf16ps kernel it falls back
    to: same operands, but the sums' roundings differ somewhere (TDPBF16PS's own; both match the
    float64 model in test_convffn_bf16_pair_kernel), so the outputs are not bitwise equal."""
    _use_pair_isa(monkeypatch, "amx_bf16")
    a = [t.to(torch.bfloat16) for t in _ffn_args(C, Hd, seed=7)]
    x = torch.randn(B, H, W, C, dtype=torch.float64, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    y = _convffn_c(x, a)
    monkeypatch.setenv("FASTVLM_CPU_ISA", "avx512_bf16")
    y_dp = _convffn_c(x, a)
    assert rel_l2(y, y_dp) <= 1e-4 and not torch.equal(y, y_dp), rel_l2(y, y_dp)


def _mix_args(C, seed=0):  # the RepMixer's dw3x3 (residual folded in): (3, 3, C) weight, (C) bias
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 3, C, generator=g, dtype=torch.float64) * 0.2
    w[1, 1] += 1.0  # the folded identity: m stays of the order of x, as in FastViTHD
    return [w, torch.randn(C, generator=g, dtype=torch.float64) * 0.1]


def _repmixer_c(x, mix, a):
    """The C++ RepMixer block with fc1_w / fc2_w packed as the cpu backend packs them."""
    import fastvlm_kernels.cpu as cpu
    pk = torch.ops.fastvlm_C.pack_linear_bf16 if cpu.uses_bf16_pairs(x.dtype) else torch.ops.fastvlm_C.pack_linear
    return torch.ops.fastvlm_C.repmixer_nhwc(x, mix[0], mix[1], a[0], a[1], pk(a[2]), a[3], pk(a[4]), a[5], a[6])


@needs_ext
@pytest.mark.parametrize("B,H,W,C,Hd", [(1, 7, 13, 19, 76), (3, 1, 1, 5, 20), (2, 33, 7, 40, 160),
                                        (0, 5, 5, 8, 32), (1, 5, 9, 20, 600)])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_repmixer_nhwc_every_isa(monkeypatch, B, H, W, C, Hd, dtype, bound):
    from fastvlm_kernels import reference
    mix, a = _mix_args(C, seed=C), _ffn_args(C, Hd, seed=1)
    x = torch.randn(B, H, W, C, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = reference.repmixer_block(x, *mix, *a)
    for isa in _isas(dp=True):
        monkeypatch.setenv("FASTVLM_CPU_ISA", isa)
        y = _repmixer_c(x.to(dtype), [t.to(dtype) for t in mix], [t.to(dtype) for t in a])
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
    a = _ffn_args(C, Hd, K=K, seed=5)
    x = torch.randn(2, 11, 37, C, dtype=torch.float64, generator=g)
    ref = reference.repmixer_block(x, *mix, *a)
    for isa in _isas(dp=True):
        monkeypatch.setenv("FASTVLM_CPU_ISA", isa)
        y = _repmixer_c(x.to(dtype), [t.to(dtype) for t in mix], [t.to(dtype) for t in a])
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
    mix, a = _mix_args(C, seed=3), _ffn_args(C, Hd, seed=4)
    x = torch.randn(B, H, W, C, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    mixb, ab = [t.to(torch.bfloat16) for t in mix], [t.to(torch.bfloat16) for t in a]
    r64 = lambda ts: [t.to(torch.float64) for t in ts]  # noqa: E731  (the bf16 weights' values)
    once = reference.repmixer_block(x.to(torch.float64), *r64(mixb), *r64(ab)).to(torch.bfloat16)
    for isa in _isas(dp=True):
        monkeypatch.setenv("FASTVLM_CPU_ISA", isa)
        y = _repmixer_c(x, mixb, ab)
        if isa in PAIR_ISAS:
            h = F.conv2d(x.to(torch.float64).permute(0, 3, 1, 2), r64(mixb)[0].permute(2, 0, 1)[:, None],
                         r64(mixb)[1], padding=1, groups=C)
            want = _convffn_bf16_rounded(h.permute(0, 2, 3, 1), a)  # m exact, then the pair kernel's roundings
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
    mix, a = _mix_args(40, seed=8), _ffn_args(40, 300, seed=9)
    x = torch.randn(2, 13, 41, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    ref = reference.repmixer_block(x.to(dtype).double(), *[t.to(dtype).double() for t in mix],
                                   *[t.to(dtype).double() for t in a])
    for isa in _isas(dp=True):
        monkeypatch.setenv("FASTVLM_CPU_ISA", isa)
        outs = []
        for tile in ("1x1", "2x3", "5x7", "13x41", "6x32"):
            monkeypatch.setenv("FASTVLM_MIX_TILE", tile)
            outs.append(_repmixer_c(x.to(dtype), [t.to(dtype) for t in mix], [t.to(dtype) for t in a]))
        assert rel_l2(outs[-1], ref) <= (1e-5 if dtype == torch.float32 else 1e-2), (isa, rel_l2(outs[-1], ref))
        for tile, y in zip(("1x1", "2x3", "5x7", "13x41"), outs):
            assert torch.equal(y, outs[-1]), (isa, tile)
    for bad in ("6", "6x", "0x4", "ax3", "6x32y"):
        monkeypatch.setenv("FASTVLM_MIX_TILE", bad)
        with pytest.raises(RuntimeError, match="FASTVLM_MIX_TILE must be THxTW"):
            _repmixer_c(x.float(), [t.float() for t in mix], [t.float() for t in a])


@needs_ext
def test_repmixer_nhwc_rejects_bad_input():
    mix, a = [t.float() for t in _mix_args(8)], [t.float() for t in _ffn_args(8, 32)]
    x = torch.randn(1, 5, 5, 8)
    with pytest.raises(RuntimeError, match="repmixer_nhwc: x must be 4-D"):
        _repmixer_c(x[0], mix, a)
    with pytest.raises(RuntimeError, match="repmixer_nhwc: x must be float32 or bfloat16"):
        _repmixer_c(x.double(), mix, a)
    with pytest.raises(RuntimeError, match=r"repmixer_nhwc: mix_w must be \(K, K, C\) with odd K"):
        _repmixer_c(x, [torch.randn(2, 2, 8), mix[1]], a)
    with pytest.raises(RuntimeError, match=r"repmixer_nhwc: mix_w must have shape \[3, 3, 8\]"):
        _repmixer_c(x, [torch.randn(3, 3, 9), mix[1]], a)
    with pytest.raises(RuntimeError, match=r"repmixer_nhwc: mix_b must have shape \[8\]"):
        _repmixer_c(x, [mix[0], torch.randn(7)], a)
    with pytest.raises(RuntimeError, match=r"repmixer_nhwc: fc1_wp must be pack_linear\(fc1_w\)"):
        torch.ops.fastvlm_C.repmixer_nhwc(x, *mix, a[0], a[1], a[2], a[3], torch.ops.fastvlm_C.pack_linear(a[4]),
                                          a[5], a[6])


@needs_ext
def test_convffn_bf16_pair_weights_need_bf16_x_and_avx512_bf16(monkeypatch):
    a = [t.bfloat16() for t in _ffn_args(24, 96)]
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
@pytest.mark.parametrize("epi", [0, 1, 3])  # fc1 + GELU, fc2 / proj + residual, qkv
def test_avx512_bf16_micro_kernel_codegen(epi):
    """Where no AVX512_BF16 CPU runs the pair-dot kernels (this project's CI machine so far), this
    at least checks what the compiler made of them in the built extension, as the Triton kernels
    are compiled ahead of time in their tests: the 8 x 2 micro-tile's inner loop is 16 vdpbf16ps
    (or a multiple: unrolled) on the 2 loaded weight vectors and 8 broadcast pairs, with no stack
    access inside it (no register spills)."""
    import shutil
    import fastvlm_kernels.cpu as cpu
    if shutil.which("objdump") is None or shutil.which("nm") is None:
        pytest.skip("needs binutils (nm, objdump)")
    if cpu.cpu_isa() == "avx512_bf16" and "avx512_bf16" not in cpu_flags():
        pytest.skip("an emulated build (FASTVLM_EMULATE_AVX512): no vdpbf16ps in it")
    so = fastvlm_kernels.load_extension().__file__
    syms = subprocess.run(["nm", "-C", "-S", so], capture_output=True, text=True, check=True).stdout.splitlines()
    if any("__asan_" in line for line in syms):
        pytest.skip("an AddressSanitizer build (scripts/asan.sh): its checks sit inside the loops")
    import re
    # the micro-tile, or its caller if inlined (their x storage type, if any, follows the EPI)
    want = [f"ptile_dp<8, {epi}", f"pgemm_dp_part<{epi}"]
    for name in want:
        pat = re.compile(re.escape(name) + "[,>]")
        hits = [line.split() for line in syms if "ffn_avx512bf16" in line and pat.search(line) and len(line.split()) > 3]
        if hits:
            break
    assert hits, f"no ffn_avx512bf16::{want[0]}> or {want[1]}> in {so}"
    start, size = int(hits[0][0], 16), int(hits[0][1], 16)
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--start-address={start}",
                          f"--stop-address={start + size}", so], capture_output=True, text=True, check=True)
    lines = [line for line in dis.stdout.splitlines() if "\t" in line]
    dp = [i for i, line in enumerate(lines) if "vdpbf16ps" in line]
    assert dp, f"no vdpbf16ps in ffn_avx512bf16::{name}"
    clusters, cur = [], [dp[0]]  # runs of vdpbf16ps at most 4 instructions apart: the inner loop
    for i in dp[1:]:
        if i - cur[-1] <= 4:
            cur.append(i)
        else:
            clusters.append(cur)
            cur = [i]
    clusters.append(cur)
    loop = max(clusters, key=len)
    body = lines[loop[0]:loop[-1] + 1]
    assert len(loop) % 16 == 0, (len(loop), "\n".join(body))
    assert not [line for line in body if "rsp" in line or "rbp" in line], "\n".join(body)  # no spills
    loads = sum("vmovups" in line or "vmovdqu" in line or "vmovaps" in line for line in lines[loop[0] - 12:loop[-1]])
    bcasts = sum("vpbroadcastd" in line or "1to16" in line for line in lines[loop[0] - 12:loop[-1]])
    assert bcasts >= len(loop) // 2 and loads >= len(loop) // 8, (bcasts, loads, "\n".join(body))


@needs_ext
def test_attention_bf16_pair_weights_need_bf16_x_and_avx512_bf16(monkeypatch):
    a = [t.bfloat16() for t in _attn_args(24, seed=2)]
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
def test_convffn_nhwc_writes_every_output_and_ignores_input_strides():
    a = [t.float() for t in _ffn_args(24, 96)]
    x = torch.randn(2, 9, 11, 24)
    y1 = _convffn_c(x, a)
    xt = x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)  # same values, other strides
    y2 = _convffn_c(xt, a)
    assert torch.isfinite(y1).all() and torch.equal(y1, y2)


@needs_ext
@pytest.mark.parametrize("op", ["convffn", "repmixer", "dwconv", "attention_mixer", "conv_exp", "stem"])
def test_thread_counts_and_concurrent_callers_agree(op):
    import threading
    if op == "stem":  # several 4 x 32 blocks per image
        g = torch.Generator().manual_seed(4)
        st = [torch.randn(20, 3, 3, 3, generator=g) * 0.5, torch.randn(20, generator=g) * 0.1,
              torch.randn(3, 3, 20, generator=g) * 0.4, torch.randn(20, generator=g) * 0.1,
              torch.randn(20, 20, generator=g) * 0.2, torch.randn(20, generator=g) * 0.1]
        x = torch.rand(2, 45, 141, 3, generator=g)

        def call():
            return _stem_c(x, st)
    elif op == "conv_exp":
        g = torch.Generator().manual_seed(2)
        ce = [torch.randn(3, 3, 48, generator=g), torch.randn(48, generator=g), torch.randn(12, 48, generator=g) * 0.2,
              torch.randn(12, generator=g), torch.randn(48, 12, generator=g) * 0.3, torch.randn(48, generator=g)]
        x = torch.randn(3, 13, 11, 24, generator=g)

        def call():
            return torch.ops.fastvlm_C.conv_exp_nhwc(x, *ce)
    elif op == "attention_mixer":
        a = [t.float() for t in _attn_args(64, seed=5)]
        x = torch.randn(2, 17, 15, 64)

        def call():
            return _attn_c(x, a, 32)
    elif op == "convffn":
        a = [t.float() for t in _ffn_args(40, 300, seed=3)]  # two hidden chunks
        x = torch.randn(2, 37, 29, 40)

        def call():
            return _convffn_c(x, a)
    elif op == "repmixer":  # 7 x 3 rectangles per image with 1 thread, 8 x 3 with 2 (an even count)
        mix, a = [t.float() for t in _mix_args(40, seed=7)], [t.float() for t in _ffn_args(40, 300, seed=3)]
        x = torch.randn(1, 37, 70, 40)

        def call():
            return _repmixer_c(x, mix, a)
    else:
        x, w, b = torch.randn(2, 29, 31, 40), torch.randn(7, 7, 40), torch.randn(40)

        def call():
            return torch.ops.fastvlm_C.dwconv_nhwc(x, w, b, 1, 3, True)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = call()
        torch.set_num_threads(2)
        two = call()
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, two)
    results = [None] * 4

    def worker(i):
        results[i] = call()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, one) for r in results)


@needs_ext
def test_convffn_nhwc_rejects_bad_input():
    a = [t.float() for t in _ffn_args(8, 32)]
    with pytest.raises(RuntimeError, match="4-D"):
        _convffn_c(torch.randn(5, 5, 8), a)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        _convffn_c(torch.randn(1, 5, 5, 8, dtype=torch.float64), a)
    bad = list(a)
    bad[2] = torch.randn(32, 9)
    with pytest.raises(RuntimeError, match="fc1_w"):
        _convffn_c(torch.randn(1, 5, 5, 8), bad)
    with pytest.raises(RuntimeError, match=r"fc1_wp must be pack_linear\(fc1_w\)"):  # unpacked weights
        torch.ops.fastvlm_C.convffn_nhwc(torch.randn(1, 5, 5, 8), *a)
    bad = list(a)
    bad[0] = torch.randn(6, 6, 8)
    with pytest.raises(RuntimeError, match="odd K"):
        _convffn_c(torch.randn(1, 5, 5, 8), bad)


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
    for isa in _isas():
        monkeypatch.setenv("FASTVLM_CPU_ISA", isa)
        y = _stem_c(xd, [t.to(dtype) for t in a])
        assert y.shape == ref.shape and y.dtype == dtype
        if B:
            assert rel_l2(y, ref) <= bound, (isa, rel_l2(y, ref))
        for v in views:
            assert torch.equal(v, xd) and (v.stride() != xd.stride() or B == 0 or H * W == 1)
            assert torch.equal(_stem_c(v, [t.to(dtype) for t in a]), y), isa
    with pytest.raises(RuntimeError, match="input channels"):
        _stem_c(torch.rand(1, 8, 8, 4), [t.float() for t in a])
    with pytest.raises(RuntimeError, match=r"w2p must be pack_linear\(\)"):  # an unpacked 1x1 weight
        torch.ops.fastvlm_C.stem_nhwc(torch.rand(1, 8, 8, 3), *[t.float() for t in a])
    monkeypatch.setenv("FASTVLM_STEM_BLOCK", "4by32")
    with pytest.raises(RuntimeError, match="FASTVLM_STEM_BLOCK must read RBxSW"):
        _stem_c(torch.rand(1, 8, 8, 3), [t.float() for t in a])


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
    for isa in _isas(dp=True):
        monkeypatch.setenv("FASTVLM_CPU_ISA", isa)
        y = _patch_embed_c(x.to(dtype), [t.to(dtype) for t in a])
        assert y.shape == ref.shape and y.dtype == dtype
        if B:
            assert rel_l2(y, ref) <= bound, (isa, rel_l2(y, ref))
    with pytest.raises(RuntimeError, match="multiple"):
        _patch_embed_c(torch.randn(1, 5, 5, 7), [t.float() for t in a])  # 2C is no multiple of 7
    with pytest.raises(RuntimeError, match=r"pw_p must be pack_linear\(\)"):
        torch.ops.fastvlm_C.patch_embed_nhwc(torch.randn(1, 5, 5, C), *[t.float() for t in a], 2)



@needs_ext
@pytest.mark.parametrize("pair_isa", PAIR_ISAS)
@pytest.mark.parametrize("B,H,W,C", [(2, 15, 29, 16), (1, 9, 13, 19), (1, 32, 32, 48)])  # odd 2C-wide tails
def test_patch_embed_bf16_pair_kernel(monkeypatch, pair_isa, B, H, W, C):
    """The bf16-pair patch_embed (the 1x1 on bf16 pairs, its input the dw + GELU output rounded to
    bf16; AVX512_BF16 or AMX tiles) matches a float64 model of exactly that far more closely than the
    fp32-compute path does."""
    _use_pair_isa(monkeypatch, pair_isa)
    g = torch.Generator().manual_seed(C + 1)
    r64 = lambda *s, sc=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * sc  # noqa: E731
    a = [r64(7, 7, 2 * C, sc=0.2), r64(2 * C, sc=0.1), r64(2 * C, 2 * C, sc=(2 * C) ** -0.5), r64(2 * C, sc=0.1)]
    x = torch.randn(B, H, W, C, dtype=torch.float64, generator=g).bfloat16()
    ab = [t.bfloat16() for t in a]
    r = lambda t: t.to(torch.bfloat16).to(torch.float64)  # noqa: E731
    w = [r(t) for t in a]
    h = F.gelu(F.conv2d(x.double().permute(0, 3, 1, 2), w[0].permute(2, 0, 1)[:, None], w[1], 2, 3, groups=C))
    want = F.gelu(F.conv2d(r(h), w[2][:, :, None, None], w[3])).permute(0, 2, 3, 1).bfloat16()
    y = _patch_embed_c(x, ab)
    monkeypatch.setenv("FASTVLM_CPU_ISA", "avx512")
    y32 = _patch_embed_c(x, ab)
    e, e32 = rel_l2(y, want), rel_l2(y32, want)
    assert e <= 5e-4 and e < e32 / 4, (e, e32)

def _attn_args(C, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s, sc=1.0):
        return torch.randn(*s, generator=g, dtype=torch.float64) * sc
    return [r(C).abs() + 0.5, r(C, sc=0.1), r(3 * C, C, sc=C ** -0.5), r(C, C, sc=C ** -0.5), r(C, sc=0.1),
            r(C).abs() + 0.5]


@needs_ext
# N = 1, 91, 231 (two key blocks of 128), 400 (four): the online-softmax rescaling across blocks runs
@pytest.mark.parametrize("B,H,W,C,hd", [(1, 1, 1, 64, 32), (3, 7, 13, 40, 8), (1, 33, 7, 64, 32),
                                        (2, 20, 20, 96, 32), (0, 4, 4, 32, 32), (1, 3, 5, 24, 12), (2, 5, 6, 21, 7)])
# term_bound: the attention term alone (y - x); fp32 measured 2-7e-7, and 1.6-2.1e-5 with one of
# vexp2_neg's polynomial coefficients 2% off
@pytest.mark.parametrize("dtype,bound,term_bound", [(torch.float32, 1e-5, 5e-6), (torch.bfloat16, 1e-2, 1e-1)])
def test_attention_mixer_nhwc_every_isa(monkeypatch, B, H, W, C, hd, dtype, bound, term_bound):
    from fastvlm_kernels import reference
    a = _attn_args(C, seed=C + hd)
    x = torch.randn(B, H, W, C, dtype=torch.float64) * 2
    ref = reference.attention_mixer(x, *a, hd)
    outs = {}
    for isa in _isas(dp=True):
        monkeypatch.setenv("FASTVLM_CPU_ISA", isa)
        y = _attn_c(x.to(dtype), [t.to(dtype) for t in a], hd)
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
        _attn_c(torch.randn(1, 2, 2, C), [t.float() for t in a], C + 1)
    with pytest.raises(RuntimeError, match="qkv_wp must be pack_linear"):
        bad = [t.float() for t in a]
        bad[2] = bad[2][:, :-1]
        _attn_c(torch.randn(1, 2, 2, C), bad, hd)
    with pytest.raises(RuntimeError, match="proj_wp must be pack_linear"):  # unpacked weights
        f = [t.float() for t in a]
        torch.ops.fastvlm_C.attention_mixer_nhwc(torch.randn(1, 2, 2, C), f[0], f[1],
                                                 torch.ops.fastvlm_C.pack_linear(f[2]), f[3], f[4], f[5], hd)



def _attention_bf16_rounded(x, a, hd, BK=128):
    """The bf16 attention mixer as the AVX512_BF16 kernels compute it, in float64: bf16 weights; the
    LayerNorm output, q (pre-scaled by head_dim^-0.5 log2(e): the kernels' scores are in base 2), k, v,
    the softmax numerators p = 2^(s - max) and the attention output rounded to bf16; per query the
    flash recurrence over key blocks of BK (p rounded against the running max of its block, the running
    sum adding the rounded p); the result rounded to bf16."""
    r = lambda t: t.to(torch.bfloat16).to(torch.float64)  # noqa: E731
    ln_w, ln_b, qkv_w, proj_w, proj_b, gamma = [r(t) for t in a]
    B, H, W, C = x.shape
    N, heads = H * W, C // hd
    t = x.to(torch.float64).reshape(B, N, C)
    u = t.mean(-1, keepdim=True)
    n = r((t - u) / torch.sqrt((t - u).pow(2).mean(-1, keepdim=True) + 1e-5) * ln_w + ln_b)
    qkv = (n @ qkv_w.T).reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, hd)
    q, k, v = r(qkv[0] * (hd ** -0.5 * math.log2(math.e))), r(qkv[1]), r(qkv[2])
    m = torch.full((B, heads, N, 1), -torch.inf, dtype=torch.float64)
    l, o = torch.zeros_like(m), torch.zeros_like(q)
    for k0 in range(0, N, BK):
        s = q @ k[:, :, k0:k0 + BK].transpose(-2, -1)
        mn = torch.maximum(m, s.amax(-1, keepdim=True))
        alpha, p = torch.exp2(m - mn), r(torch.exp2(s - mn))
        l, o, m = l * alpha + p.sum(-1, keepdim=True), o * alpha + p @ v[:, :, k0:k0 + BK], mn
    o = r((o / l).transpose(1, 2).reshape(B, N, C))
    return (t + gamma * (o @ proj_w.T + proj_b)).reshape(B, H, W, C).to(torch.bfloat16)


@needs_ext
# N = 143 (two key blocks, an odd last one), 256 (two full), 35; head_dim 32, 16, and 9 (odd: a zero partner)
@pytest.mark.parametrize("pair_isa", PAIR_ISAS)
@pytest.mark.parametrize("B,H,W,C,hd", [(2, 11, 13, 64, 32), (1, 16, 16, 96, 16), (1, 5, 7, 27, 9)])
def test_attention_bf16_pair_kernels(monkeypatch, pair_isa, B, H, W, C, hd):
    """The bf16-pair attention mixer (qkv, S = K Q^T, P V and proj on bf16 pairs: AVX512_BF16, or
    AMX tiles where K is a multiple of 32) computes what it says: it matches a float64 model of
    exactly its roundings far more closely than the fp32-compute bf16 path (avx512) does, which
    shows that it, not a fallback, ran."""
    _use_pair_isa(monkeypatch, pair_isa)
    a = _attn_args(C, seed=hd)
    x = (torch.randn(B, H, W, C, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2).bfloat16()
    ab = [t.to(torch.bfloat16) for t in a]
    want = _attention_bf16_rounded(x, a, hd)
    y = _attn_c(x, ab, hd)
    monkeypatch.setenv("FASTVLM_CPU_ISA", "avx512")
    y32 = _attn_c(x, ab, hd)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    # the attention term itself (the residual x is exact in both)
    e, e32 = rel_l2(y.double() - x.double(), want.double() - x.double()), rel_l2(y32.double() - x.double(),
                                                                                  want.double() - x.double())
    assert e <= 1e-3 and e < e32 / 4, (e, e32)  # measured: e 0 .. 1.1e-4, e32 6-7e-3; fp32 phase 2: 6e-3
    from fastvlm_kernels import reference
    assert rel_l2(y, reference.attention_mixer(x.to(torch.float64), *a, hd)) <= 1e-2

_POISON_CHECK = r"""
import torch, fastvlm_kernels
from fastvlm_kernels import reference
from fastvlm.testing import cpu_flags, rel_l2
fastvlm_kernels.load_extension()
probe = torch.empty(4096)
assert (probe == probe.new_full((1,), 3.3961514e38)).all(), "MALLOC_PERTURB_ did not poison torch.empty"
g = torch.Generator().manual_seed(7)
r = lambda *s, sc=1.0: torch.randn(*s, generator=g) * sc
ffn = [r(7, 7, 12, sc=0.2), r(12, sc=0.1), r(48, 12, sc=0.3), r(48, sc=0.1), r(12, 48, sc=0.15), r(12, sc=0.1),
       r(12).abs() + 0.5]
x, px = r(2, 9, 11, 12), torch.rand(1, 21, 19, 3, generator=g)
st = [r(16, 3, 3, 3, sc=0.5), r(16, sc=0.1), r(3, 3, 16, sc=0.4), r(16, sc=0.1), r(16, 16, sc=0.25), r(16, sc=0.1)]
pe = [r(7, 7, 24, sc=0.2), r(24, sc=0.1), r(24, 24, sc=0.2), r(24, sc=0.1)]
pe2, x2 = [r(7, 7, 50, sc=0.2), r(50, sc=0.1), r(50, 50, sc=0.15), r(50, sc=0.1)], r(1, 13, 17, 25)  # AVX-512: pairs, a vector, a tail
at = [r(12).abs() + 0.5, r(12, sc=0.1), r(36, 12, sc=0.3), r(12, 12, sc=0.3), r(12, sc=0.1), r(12).abs() + 0.5]
xa = r(2, 15, 11, 12)  # 165 tokens: two key blocks
ce = [r(3, 3, 24, sc=0.3), r(24, sc=0.1), r(6, 24, sc=0.4), r(6, sc=0.1), r(24, 6, sc=0.4), r(24, sc=0.1)]
d = lambda ts: [t.double() for t in ts]
pk = torch.ops.fastvlm_C.pack_linear
cases = [
    (torch.ops.fastvlm_C.dwconv_nhwc(x, ffn[0], ffn[1], 2, 3, True), reference.dwconv(x.double(), *d(ffn[:2]), 2, 3, True)),
    (torch.ops.fastvlm_C.dwconv_nhwc(x, ffn[0], ffn[1], 1, 3, True), reference.dwconv(x.double(), *d(ffn[:2]), 1, 3, True)),
    (torch.ops.fastvlm_C.convffn_nhwc(x, ffn[0], ffn[1], pk(ffn[2]), ffn[3], pk(ffn[4]), *ffn[5:]), reference.convffn(x.double(), *d(ffn))),
    (torch.ops.fastvlm_C.stem_nhwc(px, *st[:4], pk(st[4]), st[5]), reference.stem(px.double(), *d(st))),
    (torch.ops.fastvlm_C.patch_embed_nhwc(x, pe[0], pe[1], pk(pe[2]), pe[3], 2), reference.patch_embed(x.double(), *d(pe))),
    (torch.ops.fastvlm_C.patch_embed_nhwc(x2, pe2[0], pe2[1], pk(pe2[2]), pe2[3], 2), reference.patch_embed(x2.double(), *d(pe2))),
    (torch.ops.fastvlm_C.attention_mixer_nhwc(xa, *at[:2], pk(at[2]), pk(at[3]), *at[4:], 4), reference.attention_mixer(xa.double(), *d(at), 4)),
    (torch.ops.fastvlm_C.conv_exp_nhwc(x, *ce), reference.conv_exp(x.double(), *d(ce))),
    (torch.ops.fastvlm_C.conv_exp_nhwc(x.bfloat16(), *ce).float(), reference.conv_exp(x.bfloat16().double(), *d(ce))),
]
import fastvlm_kernels.cpu as cpu
if cpu.uses_bf16_pairs(torch.bfloat16):  # the AVX512_BF16 ConvFFN, odd C and Hd
    fb = [t.bfloat16() for t in (r(7, 7, 13, sc=0.2), r(13, sc=0.1), r(51, 13, sc=0.3), r(51, sc=0.1),
                                 r(13, 51, sc=0.15), r(13, sc=0.1), r(13).abs() + 0.5)]
    xb, pb = r(2, 9, 11, 13).bfloat16(), torch.ops.fastvlm_C.pack_linear_bf16
    cases.append((torch.ops.fastvlm_C.convffn_nhwc(xb, fb[0], fb[1], pb(fb[2]), fb[3], pb(fb[4]), *fb[5:]).float(),
                  reference.convffn(xb.double(), *d(fb))))
    ab, xab = [t.bfloat16() for t in at], xa.bfloat16()  # and the attention's qkv / proj
    cases.append((torch.ops.fastvlm_C.attention_mixer_nhwc(xab, *ab[:2], pb(ab[2]), pb(ab[3]), *ab[4:], 4).float(),
                  reference.attention_mixer(xab.double(), *d(ab), 4)))
    peb, xpb = [t.bfloat16() for t in pe], x.bfloat16()  # and patch_embed's 1x1
    cases.append((torch.ops.fastvlm_C.patch_embed_nhwc(xpb, peb[0], peb[1], pb(peb[2]), peb[3], 2).float(),
                  reference.patch_embed(xpb.double(), *d(peb))))
for i, (y, ref) in enumerate(cases):
    assert torch.isfinite(y).all() and rel_l2(y, ref) <= (1e-5 if i < 8 else 1e-2), (i, rel_l2(y, ref))
print("ok", len(cases))
"""


@needs_ext
def test_every_output_element_is_written():
    """The C++ ops allocate their own outputs, so the allocator is poisoned instead: with glibc's
    MALLOC_PERTURB_=128 every new heap block reads 0x7F7F7F7F (3.4e38) per float, and an element a
    kernel forgot to write wrecks the parity check. The kernels' per-thread scratch is a plain heap
    block too, so a kernel that read scratch it had not written fails here as well. The subprocess
    first checks the poisoning works."""
    env = dict(os.environ, MALLOC_PERTURB_="128")
    out = subprocess.run([sys.executable, "-c", _POISON_CHECK], capture_output=True, text=True, timeout=300, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    import fastvlm_kernels.cpu as cpu
    assert out.stdout.split() == ["ok", "12" if cpu.uses_bf16_pairs(torch.bfloat16) else "9"]


@needs_ext
@pytest.mark.parametrize("op", ["convffn", "stem", "patch_embed", "attention_mixer"])
def test_tiling_does_not_change_results(monkeypatch, op):
    """The 1x1-GEMM ops cut images into tiles (FASTVLM_FFN_TILE pixels, whole 6-pixel groups spread
    evenly; blocks of RB x SW output pixels for the stem): results must be bitwise the same for any
    tiling, and right."""
    from fastvlm_kernels import reference
    g = torch.Generator().manual_seed(11)

    def r(*s, sc=1.0):
        return torch.randn(*s, generator=g, dtype=torch.float64) * sc
    if op == "convffn":
        a, x = _ffn_args(24, 72, seed=4), r(2, 13, 11, 24)
        ref, fn = reference.convffn(x, *a), lambda: _convffn_c(x.float(), [t.float() for t in a])
    elif op == "stem":
        a = [r(20, 3, 3, 3, sc=0.5), r(20, sc=0.1), r(3, 3, 20, sc=0.4), r(20, sc=0.1), r(20, 20, sc=0.2), r(20, sc=0.1)]
        x = torch.rand(2, 37, 29, 3, dtype=torch.float64, generator=g)
        ref, fn = reference.stem(x, *a), lambda: _stem_c(x.float(), [t.float() for t in a])
    elif op == "patch_embed":
        a, x = [r(7, 7, 24, sc=0.2), r(24, sc=0.1), r(24, 24, sc=0.2), r(24, sc=0.1)], r(2, 19, 15, 12)
        ref, fn = reference.patch_embed(x, *a), lambda: _patch_embed_c(x.float(), [t.float() for t in a])
    else:
        a, x = _attn_args(40, seed=6), r(2, 9, 11, 40)
        ref, fn = reference.attention_mixer(x, *a, 8), lambda: _attn_c(x.float(), [t.float() for t in a], 8)
    outs = []
    # the stem cuts its output grid into blocks of RB x SW pixels instead (FASTVLM_STEM_BLOCK)
    var, tiles = ("FASTVLM_STEM_BLOCK", ("1x1", "2x5", "3x16", "4x32", "32x32")) if op == "stem" else \
        ("FASTVLM_FFN_TILE", ("6", "12", "30", "96"))
    for tile in tiles:
        monkeypatch.setenv(var, tile)
        outs.append(fn())
    assert rel_l2(outs[-1], ref) <= 1e-5
    for y in outs[:-1]:
        assert torch.equal(y, outs[-1])


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
    for isa in _isas():
        monkeypatch.setenv("FASTVLM_CPU_ISA", isa)
        y = torch.ops.fastvlm_C.conv_exp_nhwc(x.to(dtype), *[t.float() for t in ce])
        assert y.dtype == dtype and y.shape == (B, H, W, Co)
        assert rel_l2(y, ref) <= bound, (isa, rel_l2(y, ref))


@needs_ext
def test_peak_gflops_every_isa(monkeypatch):
    """fastvlm_C::peak_gflops (bench/'s compute roofline) runs on every ISA path and thread count,
    measures the bf16 pair dots only where the bf16 kernels use them, and rejects bad arguments."""
    import math
    import fastvlm_kernels.cpu as cpu
    threads = torch.get_num_threads()
    try:
        for isa in _isas(dp=True):
            monkeypatch.setenv("FASTVLM_CPU_ISA", isa)
            for n in (1, 3):
                torch.set_num_threads(n)
                p = cpu.peak_gflops(torch.float32, 0.005, 1)
                assert math.isfinite(p) and p > 0, (isa, n, p)
            if isa in PAIR_ISAS:
                assert cpu.uses_bf16_pairs(torch.bfloat16) and cpu.peak_gflops(torch.bfloat16, 0.005, 1) > 0
            else:  # bf16 runs on the fp32 FMA there; the pair-dot peak is refused, not faked
                assert not cpu.uses_bf16_pairs(torch.bfloat16)
                with pytest.raises(RuntimeError, match="needs the avx512_bf16 ISA"):
                    torch.ops.fastvlm_C.peak_gflops(True, 0.005, 1)
    finally:
        torch.set_num_threads(threads)
    for bad in [(False, 0.0, 1), (False, 11.0, 1), (False, 0.005, 0)]:
        with pytest.raises(RuntimeError, match="peak_gflops: (seconds|reps)"):
            torch.ops.fastvlm_C.peak_gflops(*bad)


@needs_ext
@pytest.mark.skipif(__import__("platform").machine().lower() not in ("x86_64", "amd64", "i686", "x86"),
                    reason="MXCSR flush-to-zero is x86 only; elsewhere the kernels do not flush")
def test_denormals_flushed_inside_ops_and_restored_after(monkeypatch):
    """The kernels run with FTZ / DAZ (common.h's DenormalsFlushed): results that would be float32
    denormals come out as zeros, on every ISA and in the fused conv_exp whose saturated SE gate makes
    them; the callers' threads get their own MXCSR back, so torch's arithmetic afterwards still
    produces denormals on the calling thread and on the pool's threads."""
    tiny = torch.finfo(torch.float32).tiny  # FLT_MIN, the smallest normal float32

    def denormal(t):
        return (t != 0) & (t.abs() < tiny)
    # dwconv: every output about 1e-40 (bias 0): denormal in exact arithmetic
    x = torch.full((1, 9, 11, 40), 1e-20)
    w, b = torch.full((7, 7, 40), 2e-22), torch.zeros(40)
    exact = F.conv2d(x.double().permute(0, 3, 1, 2), w.double().permute(2, 0, 1).unsqueeze(1), padding=3, groups=40)
    assert denormal(exact.float()).all()  # the case does what it says
    for isa in _isas():
        monkeypatch.setenv("FASTVLM_CPU_ISA", isa)
        y = torch.ops.fastvlm_C.dwconv_nhwc(x, w, b, 1, 3, False)
        assert not denormal(y).any() and (y == 0).all(), isa
    monkeypatch.delenv("FASTVLM_CPU_ISA")
    # conv_exp with its SE gate driven to sigmoid(-100) ~ 4e-44: gate * activation is denormal
    g = torch.Generator().manual_seed(8)
    Cin, Co, rd = 24, 48, 12
    ce = [torch.randn(3, 3, Co, generator=g) * 0.3, torch.randn(Co, generator=g) * 0.1,
          torch.randn(rd, Co, generator=g) * 0.1, torch.zeros(rd), torch.zeros(Co, rd), torch.full((Co,), -100.0)]
    x = torch.randn(1, 5, 7, Cin, generator=g)
    from fastvlm_kernels import reference
    ref = reference.conv_exp(x.double(), *[t.double() for t in ce])
    assert denormal(ref.float()).sum() > 100  # most outputs: GELU(z * 4e-44) is denormal
    y = torch.ops.fastvlm_C.conv_exp_nhwc(x, *ce)
    assert not denormal(y).any()
    assert (y - ref).abs().max().item() < tiny  # the flushed values are all the difference
    # the caller's and the pool's threads are back to unflushed arithmetic
    big = torch.full((1 << 21,), 1e-39)  # several of torch's parallel chunks
    assert denormal(big).all() and denormal(big * 1.0).all()
    assert denormal(torch.tensor([1e-39]) * 1.0).all()
