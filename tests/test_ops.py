"""The fused-op layer: each op against a float64 composition of the fastvlm modules, weight
sensitivity, opcheck, validation, backend selection.

The fused modules are built from randomised fastvlm modules (train form, then reparameterized), so
these tests also cover the packing and the ConvFFN BatchNorm fold. Backends other than 'reference'
are covered by the same cases when they are available (``BACKENDS`` below).
"""
import copy
import zlib

import pytest
import torch
import torch.nn.functional as F

import fastvlm.fastvithd as fv
import fastvlm_kernels as fk
from fastvlm.testing import randomize_, rel_l2
from fastvlm_kernels import modules as fm

BACKENDS = [b for b in fk.available_backends() if b != "triton"]
BOUND = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
SHAPES = [(0, 7, 13), (1, 1, 1), (3, 7, 13), (1, 33, 7)]  # (B, H, W): batch 0, a 1x1 map, odd sizes


def _rand_module(mod, seed):
    randomize_(mod, seed)
    mod.eval()
    for m in mod.modules():
        if hasattr(m, "reparameterize") and m is not mod:
            m.reparameterize()
    if hasattr(mod, "reparameterize"):
        mod.reparameterize()
    return mod.double()


class Case:
    """One op: a float64 NCHW composition of fastvlm modules and the fused module built from it."""

    def __init__(self, name, cin, ref, fused_factory, nchw_in=False, nchw_out=False):
        self.name, self.cin, self.ref, self.factory = name, cin, ref, fused_factory
        self.nchw_in, self.nchw_out = nchw_in, nchw_out

    def run(self, fused, x64, dtype):
        x = x64.to(dtype)
        xin = x if self.nchw_in else x.permute(0, 2, 3, 1)
        with torch.no_grad():
            y = fused(xin)
        return y if self.nchw_out else y.permute(0, 3, 1, 2)


def _stem_case():
    C = 13
    stem = torch.nn.Sequential(fv.MobileOneBlock(3, C, 3, 2, 1, use_scale_branch=False),
                               fv.MobileOneBlock(C, C, 3, 2, 1, groups=C, use_scale_branch=False),
                               fv.MobileOneBlock(C, C, 1, 1, 0, use_scale_branch=False))
    stem = _rand_module(stem, 1)
    return Case("stem", 3, stem, lambda b, d: fm.FusedStem(stem, b, d), nchw_in=True)


def _repmixer_case():
    blk = _rand_module(fv.RepMixerBlock(19), 2)
    return Case("repmixer_block", 19, blk, lambda b, d: fm.FusedRepMixerBlock(blk, b, d))


def _convffn_case():
    ffn = _rand_module(fv.ConvFFN(21, 84), 3)
    gamma = torch.empty(21, 1, 1, dtype=torch.float64).uniform_(0.5, 1.5)
    ref = lambda x: x + gamma * ffn(x)  # noqa: E731
    return Case("convffn", 21, ref, lambda b, d: fm.FusedConvFFN(ffn, gamma, b, d))


def _patch_embed_case():
    pe = _rand_module(fv.PatchEmbed(11, 22), 4)
    return Case("patch_embed", 11, pe, lambda b, d: fm.FusedPatchEmbed(pe, b, d))


def _dwconv_cpe_case():
    cpe = _rand_module(fv.RepCPE(17), 5)
    return Case("dwconv", 17, cpe, lambda b, d: fm.FusedDWConv(cpe.reparam_conv, b, d))


def _dwconv_s2_gelu_case():
    conv = torch.nn.Conv2d(9, 9, 3, 2, 1, groups=9).double()
    randomize_(conv, 6)
    ref = lambda x: F.gelu(conv(x))  # noqa: E731
    return Case("dwconv", 9, ref, lambda b, d: fm.FusedDWConv(conv, b, d, gelu=True))


def _attention_case(C, head_dim):
    blk = _rand_module(fv.AttentionBlock(C, head_dim=head_dim), 7)
    ref = lambda x: x + blk.layer_scale_1 * blk.token_mixer(blk.norm(x))  # noqa: E731

    class Mixer(torch.nn.Module):  # the attention half of FusedAttentionBlock
        def __init__(self, b, d):
            super().__init__()
            self.f = fm.FusedAttentionBlock(blk, b, d)

        def forward(self, x):
            f = self.f
            return torch.ops.fastvlm.attention_mixer(x, f.ln_w, f.ln_b, f.qkv_w, f.proj_w, f.proj_b, f.gamma,
                                                     f.head_dim, f.backend)

    return Case("attention_mixer", C, ref, Mixer)


def _conv_exp_case():
    blk = _rand_module(fv.MobileOneBlock(12, 24, 3, 1, 1, groups=12, use_se=True, se_rd_ratio=0.25), 8)
    return Case("conv_exp", 12, blk, lambda b, d: fm.FusedConvExp(blk, b, d), nchw_out=True)


CASES = {
    "stem": _stem_case, "repmixer_block": _repmixer_case, "convffn": _convffn_case,
    "patch_embed": _patch_embed_case, "dwconv_cpe7": _dwconv_cpe_case, "dwconv_s2_gelu": _dwconv_s2_gelu_case,
    "attention_mixer_c64": lambda: _attention_case(64, 32), "attention_mixer_c40_hd8": lambda: _attention_case(40, 8),
    "conv_exp": _conv_exp_case,
}


def _input(case, B, H, W, seed=0):
    return torch.randn(B, case.cin, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case_name", list(CASES))
def test_op_matches_float64_composition(case_name, shape, dtype, backend):
    case = CASES[case_name]()
    if case.name not in fk.ops.backend_ops(backend):
        pytest.skip(f"{backend} does not implement {case.name}")
    fused = case.factory(backend, dtype)
    x = _input(case, *shape)
    if case.name == "stem":
        x = x.clamp(0, 1)
    with torch.no_grad():
        ref = case.ref(x)
    out = case.run(fused, x, dtype)
    assert out.dtype == dtype and out.shape == ref.shape
    if shape[0]:
        assert rel_l2(out, ref) <= BOUND[dtype], rel_l2(out, ref)


@pytest.mark.parametrize("case_name", list(CASES))
def test_perturbing_any_weight_fails_the_check(case_name):
    """Each packed weight matters: nudge one element of one buffer at a time, the parity check breaks."""
    case = CASES[case_name]()
    x = _input(case, 2, 9, 11, seed=1)
    with torch.no_grad():
        ref = case.ref(x)
    fused = case.factory("reference", torch.float64)
    assert rel_l2(case.run(fused, x, torch.float64), ref) <= 1e-12
    for name, buf in list(fused.named_parameters()):
        if name.startswith("f.ffn."):  # the attention case runs only the mixer half of the block
            continue
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        idx = int(torch.randint(buf.numel(), (1,), generator=g))
        errs = []
        for sign in (1, -1):  # both directions: a ReLU'd SE unit may only wake up one way
            mutated = copy.deepcopy(fused)
            t = dict(mutated.named_parameters())[name]
            t.view(-1)[idx] += sign * (2 + 4 * t.view(-1)[idx].abs())
            errs.append(rel_l2(case.run(mutated, x, torch.float64), ref))
        assert max(errs) > 1e-5, f"{name}[{idx}] changed and the output did not notice ({errs})"


def _op_args(case_name):
    """(op overload, args) of one real call, for opcheck."""
    case = CASES[case_name]()
    fused = case.factory("reference", torch.float32)
    x = _input(case, 2, 9, 7).float()
    captured = {}

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if isinstance(func, torch._ops.OpOverloadPacket) or "fastvlm." in str(func):
                captured.setdefault("call", (func, args))
            return func(*args, **(kwargs or {}))

    with Spy():
        case.run(fused, x, torch.float32)
    func, args = captured["call"]
    return getattr(func, "default", func), args


@pytest.mark.parametrize("case_name", ["stem", "repmixer_block", "convffn", "patch_embed", "dwconv_cpe7",
                                       "attention_mixer_c64", "conv_exp"])
def test_opcheck(case_name):
    op, args = _op_args(case_name)
    assert "fastvlm" in str(op)
    torch.library.opcheck(op, args)


def test_opcheck_with_grad_inputs():
    """opcheck's autograd-registration check only runs when an input requires grad (the ops have no
    backward, so the aot_dispatch check, which differentiates, is left out here)."""
    op, args = _op_args("convffn")
    args = [a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_backward_through_an_op_is_refused():
    x = torch.randn(1, 5, 5, 8, requires_grad=True)
    y = torch.ops.fastvlm.convffn(x, *_ffn_args(), "reference")
    assert y.requires_grad  # autograd is registered: the output is tracked, not silently detached
    with pytest.raises(RuntimeError, match="inference-only"):
        y.sum().backward()


def test_first_op_call_does_not_import_dynamo():
    """@torch.library.custom_op imports torch._dynamo on an op's first call (1.6 s here): it would
    land in the first forward of every process, the time to first token. The ops avoid it."""
    import subprocess
    import sys
    code = ("import sys, torch, fastvlm_kernels\n"
            "C, Hd = 8, 32\n"
            "a = [torch.randn(7, 7, C), torch.randn(C), torch.randn(Hd, C), torch.randn(Hd), torch.randn(C, Hd),\n"
            "     torch.randn(C), torch.randn(C)]\n"
            "assert 'torch._dynamo' not in sys.modules, 'imported by fastvlm_kernels itself'\n"
            "for b in ['reference'] + (['cpu'] if 'cpu' in fastvlm_kernels.available_backends() else []):\n"
            "    torch.ops.fastvlm.convffn(torch.randn(1, 5, 5, C), *a, b)\n"
            "print('dynamo' if 'torch._dynamo' in sys.modules else 'clean')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "clean"


def test_all_seven_ops_are_registered():
    for name in fk.ops.OPS:
        assert hasattr(torch.ops.fastvlm, name)
        assert "reference" in [b for b in fk.ops.registered_backends() if name in fk.ops.backend_ops(b)]


# ---- validation ----------------------------------------------------------------------------------

def _ffn_args(C=8, hidden=32, dtype=torch.float32):
    return [torch.randn(7, 7, C, dtype=dtype), torch.randn(C, dtype=dtype), torch.randn(hidden, C, dtype=dtype),
            torch.randn(hidden, dtype=dtype), torch.randn(C, hidden, dtype=dtype), torch.randn(C, dtype=dtype),
            torch.randn(C, dtype=dtype)]


@pytest.mark.parametrize("x,exc,msg", [
    (torch.randn(2, 5, 8), ValueError, "4-D NHWC"),
    (torch.randn(1, 5, 5, 9), ValueError, "9 channels"),
    (torch.randint(0, 5, (1, 5, 5, 8)), TypeError, "floating point"),
    (torch.randn(1, 0, 5, 8), ValueError, "H, W >= 1"),
    (torch.randn(1, 5, 5, 8, dtype=torch.bfloat16), TypeError, "dtype"),
    ("x", RuntimeError, "Expected a value of type 'Tensor' for argument 'x'"),  # the dispatcher's own check
])
def test_convffn_rejects_bad_input(x, exc, msg):
    with pytest.raises(exc, match=msg):
        torch.ops.fastvlm.convffn(x, *_ffn_args(), "reference")


def test_bad_weights_are_named(monkeypatch):
    x = torch.randn(1, 5, 5, 8)
    args = _ffn_args()
    args[2] = torch.randn(32, 9)
    with pytest.raises(ValueError, match="fc1_w"):
        torch.ops.fastvlm.convffn(x, *args, "reference")
    with pytest.raises(ValueError, match="multiple of head_dim"):
        torch.ops.fastvlm.attention_mixer(torch.randn(1, 2, 2, 40), *[torch.randn(40)] * 2, torch.randn(120, 40),
                                          torch.randn(40, 40), torch.randn(40), torch.randn(40), 32, "reference")
    monkeypatch.delitem(fk.ops._KERNELS["convffn"], "triton", raising=False)  # registered when triton runs here
    with pytest.raises(RuntimeError, match="no implementation"):
        torch.ops.fastvlm.convffn(x, *_ffn_args(), "triton")


def test_explicit_unavailable_backend_is_refused():
    import fastvlm
    m = fastvlm.FastViTHD(fastvlm.FastViTHDConfig.tiny()).eval()
    for b in ("triton", "nope"):
        if b in fk.available_backends():
            continue
        with pytest.raises(ValueError, match="unavailable"):
            fk.accelerate(m, backend=b)
