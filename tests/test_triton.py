"""The triton backend without a GPU: every op through Triton's interpreter (TRITON_INTERPRET=1) in
fp32 and fp16 against the float64 composition (odd shapes, and FastViTHD's real channel widths), a
whole tiny encoder through accelerate(backend="triton"), every configuration of every kernel giving
the same bits, the configuration table covering every FastViTHD shape, and ahead-of-time compilation
of what runs (every specialisation FastViTHD launches x the table's configurations x fp32 / fp16 /
bf16) for sm_90 and sm_80.

On a CUDA machine the same parity cases run on the GPU instead (bf16 included)."""
import copy
import os

import pytest
import torch

triton = pytest.importorskip("triton")  # TRITON_INTERPRET=1 is set by conftest.py when there is no GPU

import fastvlm  # noqa: E402
import fastvlm_kernels as fk  # noqa: E402
from fastvlm.testing import random_tower, rel_l2  # noqa: E402
import test_ops as T  # noqa: E402  (the op cases: float64 fastvlm compositions + fused-module factories)

if fk.unavailable_reason("triton") is not None:
    pytest.skip(f"triton backend unavailable: {fk.unavailable_reason('triton')}", allow_module_level=True)

from fastvlm_kernels import triton as ft  # noqa: E402
from fastvlm_kernels import modules as fm  # noqa: E402
import fastvlm.fastvithd as fv  # noqa: E402

ON_GPU = torch.cuda.is_available() and not ft.INTERPRET


def _version(v):
    return tuple(int(p) for p in v.split("+")[0].split(".")[:2] if p.isdigit())


import numpy  # noqa: E402
# triton 3.6's interpreter turns runtime loop bounds into Python ints with int() of a 1-element
# array, which numpy >= 2.3 refuses; compiled kernels are unaffected (checked: with numpy 2.2 all
# of this file passes on triton 3.6).
INTERPRETER_BROKEN = (ft.INTERPRET and _version(triton.__version__) < (3, 7)
                      and _version(numpy.__version__) >= (2, 3))
needs_interpreter = pytest.mark.skipif(
    INTERPRETER_BROKEN, reason=f"triton {triton.__version__}'s interpreter does not work with numpy "
    f"{numpy.__version__} (int() of 1-element arrays); use numpy < 2.3 or triton >= 3.7")
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
BOUND = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# cut every tile edge: W=13 vs BLOCK_W 8, C=19/21/... vs BLOCK_C 64, M=273 vs BLOCK_M 64; batch 0; 1x1
SHAPES = [(0, 5, 6), (1, 1, 1), (3, 7, 13)]


def _wide_convffn_case():
    """C = 200 > FFN_FUSED_MAX_C: the split path (fc1+GELU -> hidden -> fc2 + epilogue)."""
    ffn = T._rand_module(fv.ConvFFN(200, 800), 9)
    gamma = torch.empty(200, 1, 1, dtype=torch.float64).uniform_(0.5, 1.5)
    return T.Case("convffn", 200, lambda x: x + gamma * ffn(x), lambda b, d: fm.FusedConvFFN(ffn, gamma, b, d))


CASES = dict(T.CASES, convffn_wide=_wide_convffn_case)


def _run(case, fused, x64, dtype):
    fused = fused.to(DEVICE)
    return case.run(fused, x64.to(DEVICE), dtype).cpu()


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case_name", list(CASES))
def test_triton_op_matches_float64(case_name, shape, dtype):
    if case_name == "convffn_wide" and shape[1] * shape[2] > 1 and not ON_GPU:
        shape = (min(shape[0], 2), 3, 5)  # keep the interpreter quick: 200 channels x 49 taps
    case = CASES[case_name]()
    fused = case.factory("triton", dtype)
    x = T._input(case, *shape)
    if case.name == "stem":
        x = x.clamp(0, 1)
    with torch.no_grad():
        ref = case.ref(x)
    out = _run(case, fused, x, dtype)
    assert out.dtype == dtype and out.shape == ref.shape
    if shape[0]:
        assert torch.isfinite(out).all()
        assert rel_l2(out, ref) <= BOUND[dtype], rel_l2(out, ref)


@needs_interpreter
def test_triton_kernels_are_sensitive_to_their_weights():
    """The check above is not blind: one perturbed weight in the packed buffers breaks it."""
    case = T.CASES["convffn"]()
    x = T._input(case, 1, 5, 6)
    with torch.no_grad():
        ref = case.ref(x)
    fused = case.factory("triton", torch.float32)
    assert rel_l2(_run(case, fused, x, torch.float32), ref) <= 1e-5
    for name in ("ffn_w", "fc1_w", "fc2_w", "gamma"):
        bad = copy.deepcopy(fused)
        getattr(bad, name).view(-1)[3] += 1.0
        assert rel_l2(_run(case, bad, x, torch.float32), ref) > 1e-4, name


@needs_interpreter
def test_whole_tiny_encoder_through_triton_matches_eager():
    m64 = random_tower(fastvlm.FastViTHDConfig.tiny(), seed=3, weight_gain=0.85).double()
    x = torch.rand(2, 3, 96, 70, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m64(x)
        acc = fk.accelerate(copy.deepcopy(m64).float().to(DEVICE), backend="triton")
        assert acc.accelerated_backend == "triton"
        out = acc(x.float().to(DEVICE)).cpu()
        other = m64(torch.rand_like(x))
    assert rel_l2(other, ref) > 1e-2  # two images differ: the parity below can see a lost input
    assert rel_l2(out, ref) <= 1e-4, rel_l2(out, ref)


def test_backend_is_registered_for_all_ops():
    assert set(fk.ops.backend_ops("triton")) == set(fk.ops.OPS)
    assert not fk.ops.fallback_ops("triton")
    assert "triton" in fk.available_backends()


# --------------------------------------------------------------------------------------------------
# ahead-of-time compilation for Hopper and Ampere
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def aot_records(tmp_path_factory):
    """Compiled in a subprocess: under TRITON_INTERPRET=1 (set above) kernels are interpreted objects."""
    import json
    import subprocess
    import sys
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "fastvlm_kernels.triton.aot", "--json", str(out)], env=env,
                       capture_output=True, text=True, timeout=1800, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


def test_what_runs_compiles_for_sm90_and_sm80(aot_records):
    """Every specialisation FastViTHD launches x every configuration the table gives it x {fp32 (IEEE
    dots), fp32 (tf32x3 dots), fp16, bf16} x {sm_90, sm_80} compiles, without spills, within shared
    memory; the tiles ``kernels.SPILLS`` excludes spill exactly where it says, under this Triton (the
    list is neither stale nor short). ``scripts/aot_triton.sh 3.6`` runs this test under Triton 3.6."""
    from fastvlm_kernels.triton import aot
    from fastvlm_kernels.triton import kernels as K
    excluded = [r for r in aot_records if r["excluded"]]
    aot_records = [r for r in aot_records if not r["excluded"]]
    failed = [aot._line(r) for r in aot_records if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert {(r["arch"], r["dtype"]) for r in aot_records} == {(a, d) for a in ("sm_90", "sm_80")
                                                             for d in ("fp32", "tf32x3", "fp16", "bf16")}
    here = ".".join(map(str, _version(triton.__version__)))
    listed = {(col, arch, k, i) for (col, arch), ks in K.SPILLS.items() for k, cfgs in ks.items() for i in cfgs}
    tagged_here = {(col, arch, k, i) for (col, arch), ks in K.SPILLS.items() for k, cfgs in ks.items()
                   for i, tritons in cfgs.items() if here in tritons}

    def index(r):
        return K.CONFIGS[r["kernel"]].index(dict(r["config"], num_warps=r["num_warps"], num_stages=r["num_stages"]))
    assert {(r["dtype"], r["arch"], r["kernel"], index(r)) for r in excluded} == listed  # all compiled
    spilled = {(r["dtype"], r["arch"], r["kernel"], index(r)) for r in excluded if not r["ok"] or r["spills"]}
    if here in K.AOT_TRITONS:
        assert spilled == tagged_here, (f"kernels.SPILLS is out of date for Triton {here}: listed for it but "
                                        f"no longer spilling {tagged_here - spilled}; spilling but not tagged "
                                        f"with it {spilled - tagged_here}")
    assert {r["kernel"] for r in aot_records} == set(K.KERNELS)
    # specialised like the runtime: the real shapes' multiples of 16 and aligned pointers are marked
    assert all(r["divisible"] for r in aot_records)
    assert any("MULT" in r["ones"] or "STRIDE" in r["ones"] for r in aot_records if r["kernel"] == "dw_kernel")
    too_big = [aot._line(r) for r in aot_records if not r["fits_smem"]]
    assert not too_big, "\n".join(too_big)
    spills = [aot._line(r) for r in aot_records if r["spills"] and r["kernel"] not in aot.KNOWN_SPILLS]
    assert not spills, "register spills:\n" + "\n".join(spills)
    # The known ones are listed (not hidden): they must still spill, or the list is stale.
    assert {r["kernel"] for r in aot_records if r["spills"]} == set(aot.KNOWN_SPILLS)
    # Report which configurations get Hopper's wgmma (the tensor-core GEMMs should)
    print("\n" + "\n".join(aot._line(r) for r in aot_records))
    hopper_gemms = [r for r in aot_records if r["arch"] == "sm_90" and r["dtype"] in ("fp16", "bf16") and r["kernel"] in
                    ("linear_kernel", "ffn_fused_kernel", "attention_kernel")]
    assert hopper_gemms and all(r["wgmma"] for r in hopper_gemms)
    # tf32x3 runs its dots on tensor cores; wgmma where the tile has 64 rows or more (ffn_fused's
    # spill-free tf32x3 tile has 32: mma.sync)
    hopper_tf32x3 = [r for r in aot_records if r["arch"] == "sm_90" and r["dtype"] == "tf32x3" and r["kernel"] in
                     ("linear_kernel", "attention_kernel")]
    assert hopper_tf32x3 and all(r["wgmma"] for r in hopper_tf32x3)
    gemm = ("linear_kernel", "ffn_fused_kernel", "attention_kernel")
    assert all(r["tensor_cores"] for r in aot_records if r["dtype"] != "fp32" and r["kernel"] in gemm)
    assert not any(r["tensor_cores"] for r in aot_records if r["dtype"] == "fp32")  # IEEE dots: FMAs
    assert not any(r["wgmma"] for r in aot_records if r["arch"] == "sm_80" or r["dtype"] == "fp32")


# --------------------------------------------------------------------------------------------------
# the configuration table (fastvlm_kernels/triton/tuning.py)
# --------------------------------------------------------------------------------------------------
def test_the_table_covers_every_shape_of_256_to_2048_at_batch_1_to_64():
    from fastvlm_kernels.triton import kernels as K
    from fastvlm_kernels.triton import tune, tuning
    table = tuning.load_table()
    assert tune.uncovered(table) == []
    # every entry is a configuration of its kernel (so the AOT check compiled it)
    for arch, dts in table.items():
        for dt, kernels in dts.items():
            for kernel, entries in kernels.items():
                assert all(c in K.CONFIGS[kernel] for c in entries.values()), (arch, dt, kernel)
    # the check is not blind: a table without one class is caught
    arch, dt, kernel = "sm_90", "bf16", "linear_kernel"
    cls = next(iter(table[arch][dt][kernel]))
    holed = copy.deepcopy(table)
    del holed[arch][dt][kernel][cls]
    assert tune.uncovered(holed) == [(arch, dt, kernel, cls)]


def test_shape_classes_tell_batch_sizes_and_kernel_sizes_apart():
    from fastvlm_kernels.triton import tuning
    lin = dict(M=1024, N=3072, K=768)
    assert tuning.shape_class("linear_kernel", lin) != tuning.shape_class("linear_kernel", dict(lin, M=32 * 1024))
    dw = dict(K=3, STRIDE=1, Cout=96, Wo=256, SUMS=False)
    assert tuning.shape_class("dw_kernel", dw) != tuning.shape_class("dw_kernel", dict(dw, K=7))


def test_the_default_path_never_benchmarks(monkeypatch):
    from fastvlm_kernels.triton import tuning

    def boom(cfg):
        raise AssertionError("benchmarked")
    monkeypatch.setattr(tuning, "AUTOTUNE", False)
    cfg = tuning.choose("linear_kernel", torch.device("cpu"), torch.float16, dict(M=4096, N=3072, K=768), run=boom)
    assert cfg == tuning.load_table()["sm_90"]["fp16"]["linear_kernel"]["M<=4096 N3072 K768"]


@needs_interpreter
def test_precompile_warms_each_distinct_variant_once_without_computing():
    """launch.precompile records a forward's launches (nothing runs), keeps one per compilation
    (kernel, runtime specialisation, configuration) and warms each up, several at once through
    Triton's AsyncCompileMode where it exists. Checked with a stand-in kernel table (compiling needs
    a GPU); accelerate(cuda_graphs=True) hands it to the graph runner for the triton backend."""
    from fastvlm_kernels.triton import kernels as K
    from fastvlm_kernels.triton import launch
    m = random_tower(fastvlm.FastViTHDConfig.tiny(), seed=3, weight_gain=0.85).float().eval()
    fk.accelerate(m, backend="triton")
    x = torch.rand(2, 3, 96, 70)
    with launch.recording() as rec, torch.no_grad():
        m(x)
    n_launches = len(rec)
    calls = []

    class Stub:
        def __init__(self, name):
            self.name = name

        def warmup(self, *args, grid, **kw):
            calls.append((self.name, grid, kw))

    stubs = {k: Stub(k) for k in K.KERNELS}
    assert launch.precompile(m, x, kernels=stubs) is not None
    out = launch.precompile(m, x, threads=2, kernels=stubs)
    uniq = {(n, repr(sorted(kw.items()))) for n, _, kw in calls}
    assert out["variants"] * 2 == len(calls) and 0 < out["variants"] < n_launches
    assert len(uniq) <= out["variants"]  # same kwargs may still differ in their tensors' specialisation
    assert {n for n, _, _ in calls} == {r["kernel"] for r in rec}
    assert all("num_warps" in kw and "num_stages" in kw and isinstance(g, tuple) for _, g, kw in calls)
    # a failing compile is an optimisation lost, not an error
    class Broken(Stub):
        def warmup(self, *args, grid, **kw):
            raise RuntimeError("no compiler")
    with pytest.warns(RuntimeWarning, match="precompile: RuntimeError: no compiler"):
        launch.precompile(m, x, kernels={k: Broken(k) for k in K.KERNELS})
    # without a stand-in, a CPU input (the interpreter) is left alone
    assert launch.precompile(m, x) == {"variants": 0, "seconds": 0.0, "parallel": False}
    fk.accelerate(m, backend="triton", cuda_graphs=True)
    assert m.__dict__["_fastvlm_graphs"].prepare is launch.precompile


def test_int32_offset_guard_is_exact():
    from fastvlm_kernels.triton.launch import check_i32
    check_i32("op", a=2 ** 31)  # largest offset 2**31 - 1: addressable
    with pytest.raises(ValueError, match="int32"):
        check_i32("op", a=2 ** 31 + 1)


# --------------------------------------------------------------------------------------------------
# every configuration gives the same bits; real channel widths; weight strides
# --------------------------------------------------------------------------------------------------
# (op case, kernel): a case whose launches include that kernel, at a size with partial tiles
_KERNEL_CASES = {"dw_kernel": "dwconv_cpe7", "ffn_fused_kernel": "convffn", "linear_kernel": "convffn_wide",
                 "attention_kernel": "attention_mixer_c64", "stem_kernel": "stem", "patch_embed_kernel": "patch_embed"}


@pytest.fixture
def fixed_order_dots(monkeypatch):
    """The interpreter computes tl.dot with numpy's matmul, whose summation order (OpenBLAS's kernel
    choice) can change with the number of rows: a (32, 32) @ (32, 32)^T product is not bitwise the
    first half of the (64, 32) one. Here each dot sums its K products in index order and then adds
    the accumulator (as a tensor-core dot adds its block's sum), the same for any number of rows
    or columns, so what the test compares is the kernels' own loops and tiles (a different K step
    still changes the bits)."""
    import numpy as np
    from triton.runtime import interpreter as I

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        A, B = a.data.astype(d.data.dtype), b.data.astype(d.data.dtype)
        part = np.zeros_like(d.data)
        for k in range(A.shape[-1]):
            part += A[..., :, k:k + 1] * B[..., k:k + 1, :]
        return I.TensorHandle(part + d.data, d.dtype.scalar)
    monkeypatch.setattr(I.InterpreterBuilder, "create_dot", create_dot)


@needs_interpreter
@pytest.mark.parametrize("kernel", list(_KERNEL_CASES))
def test_every_configuration_gives_the_same_bits(kernel, fixed_order_dots):
    from fastvlm_kernels.triton import kernels as K
    from fastvlm_kernels.triton import tuning
    case = CASES[_KERNEL_CASES[kernel]]()
    shape = (2, 3, 5) if case.name == "convffn" and kernel == "linear_kernel" else (2, 9, 13)
    if case.name == "attention_mixer":
        shape = (2, 9, 9)  # 81 tokens: three key blocks, a partial query tile
    x = T._input(case, *shape)
    if case.name == "stem":
        x = x.clamp(0, 1)
    fused = case.factory("triton", torch.float32)
    outs = []
    for cfg in K.CONFIGS[kernel]:
        with tuning.forced(kernel, cfg):
            outs.append(_run(case, fused, x, torch.float32))
    assert len(outs) > 1
    for cfg, out in zip(K.CONFIGS[kernel][1:], outs[1:]):
        assert torch.equal(out, outs[0]), (kernel, cfg)


def _real_width_cases():
    """FastViTHD's real channel widths (96 ... 1536, conv_exp's 3072) at small spatial sizes."""
    cases = []
    stem = torch.nn.Sequential(fv.MobileOneBlock(3, 96, 3, 2, 1, use_scale_branch=False),
                               fv.MobileOneBlock(96, 96, 3, 2, 1, groups=96, use_scale_branch=False),
                               fv.MobileOneBlock(96, 96, 1, 1, 0, use_scale_branch=False))
    stem = T._rand_module(stem, 96)
    cases.append(("stem_96", 3, stem, lambda b, d: fm.FusedStem(stem, b, d), (1, 3, 17, 21)))
    for c in (96, 192, 384):
        blk = T._rand_module(fv.RepMixerBlock(c), c)
        cases.append((f"repmixer_{c}", c, blk, lambda b, d, blk=blk: fm.FusedRepMixerBlock(blk, b, d), None))
    for c in (96, 192, 384, 768):
        pe = T._rand_module(fv.PatchEmbed(c, 2 * c), c + 1)
        cases.append((f"patch_embed_{c}", c, pe, lambda b, d, pe=pe: fm.FusedPatchEmbed(pe, b, d), None))
    for c in (768, 1536):
        cpe = T._rand_module(fv.RepCPE(c), c + 2)
        cases.append((f"repcpe_{c}", c, cpe, lambda b, d, cpe=cpe: fm.FusedDWConv(cpe.reparam_conv, b, d), None))
        blk = T._rand_module(fv.AttentionBlock(c), c + 3)
        cases.append((f"attention_block_{c}", c, blk, lambda b, d, blk=blk: fm.FusedAttentionBlock(blk, b, d), None))
    ce = T._rand_module(fv.MobileOneBlock(1536, 3072, 3, 1, 1, groups=1536, use_se=True), 1536)
    cases.append(("conv_exp_1536", 1536, ce, lambda b, d: ConvExpNHWC(fm.FusedConvExp(ce, b, d)), None))
    return cases


class ConvExpNHWC(torch.nn.Module):
    """FusedConvExp returns an NCHW view; back to NHWC like the other fused modules."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(x).permute(0, 2, 3, 1)


REAL = {name: rest for name, *rest in _real_width_cases()}


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("name", list(REAL))
def test_real_channel_widths_match_float64(name, dtype):
    if not ON_GPU and (name in ("patch_embed_384", "patch_embed_768")
                       or (name == "attention_block_1536" and dtype == torch.float16)):
        pytest.skip("30-135 s in the interpreter; scripts/gpu_check.sh runs it on the GPU")
    c, mod, make, shape = REAL[name]
    g = torch.Generator().manual_seed(len(name))
    x = torch.randn(*(shape or (1, c, 3, 5)), dtype=torch.float64, generator=g)
    if name.startswith("stem"):
        x = x.clamp(0, 1)
    with torch.no_grad():
        ref = mod(x).permute(0, 2, 3, 1)
        fused = make("triton", dtype).to(DEVICE)
        xin = x if name.startswith("stem") else x.permute(0, 2, 3, 1)
        out = fused(xin.to(DEVICE, dtype)).float().cpu()
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert rel_l2(out, ref) <= BOUND[dtype], rel_l2(out, ref)


def _tf32(x):
    """fp32 -> TF32 as cvt.rna.tf32.f32 rounds (nearest, ties away from zero; 10 mantissa bits)."""
    import numpy as np
    bits = np.asarray(x, dtype=np.float32).view(np.uint32)
    special = (bits & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
    return np.where(special, bits, (bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def _tf32_operand(x):
    """An fp32 value as a TF32 tensor-core operand reads it: the low 13 mantissa bits ignored."""
    import numpy as np
    return (np.asarray(x, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


@pytest.fixture
def emulated_tf32(monkeypatch):
    """The interpreter ignores tl.dot's input_precision (every dot in fp32). This emulates what
    Triton's tf32x3 rewrite (its F32DotTC pass) has a tensor core compute for fp32 operands: hi =
    cvt.rna.tf32(a), lo = a - hi read as a TF32 operand (low 13 bits ignored); then the accumulator
    plus lo·hi, plus hi·lo, plus hi·hi, each a TF32 dot summed in fp32 (lo·lo dropped). Set
    ``state["passes"] = 1`` to emulate plain one-pass TF32 instead (the negative control).
    ``state["seen"]`` counts the tf32x3 dots emulated."""
    import numpy as np
    from triton.runtime import interpreter as I
    orig = I.InterpreterBuilder.create_dot
    state = {"passes": 3, "seen": 0}

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.data.dtype != np.float32 or not str(input_precision).endswith("TF32x3"):
            return orig(self, a, b, d, input_precision, max_num_imprecise_acc)
        state["seen"] += 1
        ah, bh = _tf32(a.data), _tf32(b.data)
        acc = d.data.astype(np.float32)
        if state["passes"] == 3:
            al, bl = _tf32_operand(a.data - ah), _tf32_operand(b.data - bh)
            acc = acc + np.matmul(al, bh, dtype=np.float32)
            acc = acc + np.matmul(ah, bl, dtype=np.float32)
        return I.TensorHandle((acc + np.matmul(ah, bh, dtype=np.float32)).astype(np.float32), d.dtype.scalar)
    monkeypatch.setattr(I.InterpreterBuilder, "create_dot", create_dot)
    return state


@needs_interpreter
@pytest.mark.skipif(ON_GPU, reason="emulates tf32x3 in the interpreter's dot; on a GPU the real tensor cores "
                    "run it (scripts/gpu_check.py measures the encoder with tf32x3 and with IEEE dots)")
def test_tf32x3_keeps_fp32_accuracy(emulated_tf32):
    """fp32 with tf32x3 dots (tensor cores), emulated as the hardware computes them: the whole tiny
    encoder and FastViTHD's real channel widths stay within issue 33's 1e-4 of the float64 model (as
    close as IEEE fp32 in practice), while one-pass TF32 through the same emulation does not."""
    from fastvlm_kernels.triton.launch import fp32_precision
    m64 = random_tower(fastvlm.FastViTHDConfig.tiny(), seed=3, weight_gain=0.85).double()
    x = torch.rand(1, 3, 64, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    acc = fk.accelerate(copy.deepcopy(m64).float(), backend="triton")
    with torch.no_grad():
        ref = m64(x)
        with fp32_precision("tf32x3"):
            err3 = rel_l2(acc(x.float()), ref)
            assert emulated_tf32["seen"] > 0  # the precision reached the kernels' dots
            emulated_tf32["passes"] = 1
            err1 = rel_l2(acc(x.float()), ref)
            emulated_tf32["passes"] = 3
        with fp32_precision("ieee"):
            err_ieee = rel_l2(acc(x.float()), ref)
    assert err3 <= 1e-4 and err3 <= 4 * err_ieee, (err3, err_ieee)
    assert err1 > 1e-4, err1
    for name in ("stem_96", "repmixer_384", "attention_block_768"):  # (~20 s of interpreter each)
        c, mod, make, shape = REAL[name]
        g = torch.Generator().manual_seed(len(name))
        x = torch.randn(*(shape or (1, c, 3, 5)), dtype=torch.float64, generator=g)
        if name.startswith("stem"):
            x = x.clamp(0, 1)
        with torch.no_grad(), fp32_precision("tf32x3"):
            ref = mod(x).permute(0, 2, 3, 1)
            xin = x if name.startswith("stem") else x.permute(0, 2, 3, 1)
            out = make("triton", torch.float32)(xin.float())
        assert rel_l2(out, ref) <= BOUND[torch.float32], (name, rel_l2(out, ref))


def test_a_weight_on_another_device_is_refused_by_name():
    """A weight that is not on the input's device is refused (ops/_checks.py), naming the op and the
    weight, before any triton launch (on a GPU a kernel would read another device's addresses). The
    meta device stands in for a second GPU."""
    case = T.CASES["convffn"]()
    fused = case.factory("triton", torch.float32)
    fused.fc1_w = torch.nn.Parameter(fused.fc1_w.detach().to("meta"), requires_grad=False)
    x = T._input(case, 1, 3, 5).float().permute(0, 2, 3, 1).contiguous().to(DEVICE)
    with pytest.raises(ValueError, match=r"fastvlm::convffn: fc1_w is on meta but x is on"):
        with torch.no_grad():
            fused(x)


@needs_interpreter
def test_non_contiguous_weights_are_read_as_their_values():
    """A permuted view (pack_dw's layout before .contiguous()) as a weight of a direct op call."""
    case = T.CASES["dwconv_cpe7"]()
    fused = case.factory("triton", torch.float32)
    x = T._input(case, 1, 6, 7).permute(0, 2, 3, 1).float().contiguous()
    w = fused.w.detach()
    w_view = w.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # the same values, other strides
    assert not w_view.is_contiguous() and torch.equal(w_view, w)
    args = (fused.b, fused.stride, fused.padding, fused.gelu)
    want = torch.ops.fastvlm.dwconv(x, w, *args, "reference")
    got = torch.ops.fastvlm.dwconv(x, w_view, *args, "triton")
    assert rel_l2(got, want) <= 1e-6


# --------------------------------------------------------------------------------------------------
# torch.library and torch.compile with backend="triton"
# --------------------------------------------------------------------------------------------------
@needs_interpreter
@pytest.mark.parametrize("case_name", ["stem", "repmixer_block", "convffn", "patch_embed", "dwconv_cpe7",
                                       "attention_mixer_c64", "conv_exp"])
def test_opcheck_with_the_triton_backend(case_name):
    op, args = T._op_args(case_name)
    args = [("triton" if a == "reference" else a) for a in args]
    assert "triton" in args
    args = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(op, args)


@needs_interpreter
def test_accelerated_encoder_compiles_without_graph_breaks():
    m = random_tower(fastvlm.FastViTHDConfig.tiny(), seed=3).eval().to(DEVICE)
    fk.accelerate(m, backend="triton")
    x = torch.rand(1, 3, 64, 64, device=DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="eager")  # a graph break would raise
    with torch.no_grad():
        assert torch.equal(compiled(x), m(x))
