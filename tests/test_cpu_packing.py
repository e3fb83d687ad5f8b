"""The packed-weight format of the cpu backend: pack_linear / pack_linear_bf16 against csrc/packed.h's layout and
its Python mirror (fastvlm_kernels.cpu.PackedFormat), and repacking."""
import pytest
import torch

import fastvlm_kernels
from cpu_cases import needs_ext


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


@needs_ext
@pytest.mark.parametrize("n,k", [(1, 1), (16, 16), (17, 5), (31, 7), (32, 8), (33, 3), (96, 24), (100, 101)])
def test_python_packed_format_is_the_cpp_one(n, k):
    """fastvlm_kernels.cpu.PackedFormat (the Python owner) and csrc/packed.h (the C++ owner, through
    pack_linear / pack_linear_bf16) agree on shapes, and unpack inverts both exactly."""
    from fastvlm_kernels.cpu import PackedFormat as PF
    w = torch.randn(n, k)
    for pairs, pack, dtype in [(False, torch.ops.fastvlm_C.pack_linear, torch.float32),
                               (True, torch.ops.fastvlm_C.pack_linear_bf16, torch.bfloat16)]:
        p = pack(w)
        assert tuple(p.shape) == PF.shape(n, k, pairs) and p.dtype == dtype
        assert PF.owns(p) and PF.matches(p, (n, k)) and PF.matches(p, (-1, k))
        assert not PF.matches(p, (n + 32, k)) and not PF.matches(p, (n, k + 2))
        assert torch.equal(PF.unpack(p, n, k, torch.float32), w.to(dtype).float())
        assert not PF.owns(w) and not PF.owns(p.to(torch.float16))
    assert PF.panels(n) % 2 == 0 and n <= PF.panels(n) * PF.PANEL < n + 2 * PF.PANEL


@needs_ext
def test_cpu_module_works_on_import_alone():
    """fastvlm_kernels.cpu's functions work in a fresh process that imported nothing else first (the
    module loads the extension itself)."""
    import subprocess
    import sys
    code = ("import torch\nfrom fastvlm_kernels import cpu\n"
            "print(tuple(cpu.packed(torch.randn(40, 24)).shape), cpu.peak_gflops(torch.float32, 0.01, 1) > 0, cpu.cpu_isa())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[:4] == ["(4,", "24,", "16)", "True"], out.stdout  # 40 channels: 3 panels, rounded to 4
