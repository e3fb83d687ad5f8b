"""ISA-level properties of the C++ kernels: clamps of GELU / exp, the AVX512_BF16 code generation, the peak, denormals."""
import math
import re
import subprocess

import pytest
import torch
import torch.nn.functional as F

import fastvlm_kernels
from fastvlm.testing import cpu_flags, rel_l2
from cpu_cases import PAIR_ISAS, attn_args, attn_c, isas, needs_ext


@needs_ext
@pytest.mark.parametrize("C", [37, 48])
def test_gelu_clamp_edges_nan_and_inf_every_isa(monkeypatch, C):
    """The vector GELU (kernels/vec.h's vgelu, its clamp on the ISA's min / max instructions) and the
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
    for isa in isas():
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
    """kernels/vec.h's vexp clamps its argument to [-87, 88] and vexp2_neg (attention's softmax, in base
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
    a = attn_args(32, seed=3)
    a[2] = a[2] * 12  # qkv: scores of several hundred
    xa = torch.randn(1, 6, 7, 32, dtype=torch.float64, generator=g)
    ref_at = reference.attention_mixer(xa, *a, 8)
    for isa in isas():
        monkeypatch.setenv("FASTVLM_CPU_ISA", isa)
        y = torch.ops.fastvlm_C.conv_exp_nhwc(x.float(), *[t.float() for t in ce]).double()
        assert torch.isfinite(y).all(), isa
        assert (y - ref_ce).abs().max() <= 1e-5 * ref_ce.abs().max(), (isa, (y - ref_ce).abs().max().item())
        ya = attn_c(xa.float(), [t.float() for t in a], 8).double()
        assert torch.isfinite(ya).all(), isa
        assert rel_l2(ya - xa, ref_at - xa) <= 1e-4, (isa, rel_l2(ya - xa, ref_at - xa))


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
        hits = [line.split() for line in syms if "isa_avx512_bf16" in line and pat.search(line) and len(line.split()) > 3]
        if hits:
            break
    assert hits, f"no isa_avx512_bf16::{want[0]}> or {want[1]}> in {so}"
    start, size = int(hits[0][0], 16), int(hits[0][1], 16)
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--start-address={start}",
                          f"--stop-address={start + size}", so], capture_output=True, text=True, check=True)
    lines = [line for line in dis.stdout.splitlines() if "\t" in line]
    dp = [i for i, line in enumerate(lines) if "vdpbf16ps" in line]
    assert dp, f"no vdpbf16ps in isa_avx512_bf16::{name}"
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
def test_peak_gflops_every_isa(monkeypatch):
    """fastvlm_C::peak_gflops (bench/'s compute roofline) runs on every ISA path and thread count,
    measures the bf16 pair dots only where the bf16 kernels use them, and rejects bad arguments."""
    import math
    import fastvlm_kernels.cpu as cpu
    threads = torch.get_num_threads()
    try:
        for isa in isas(dp=True):
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
    for isa in isas():
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
