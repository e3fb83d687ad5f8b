"""Per-op microbenchmarks at the real FastViTHD shapes (1024x1024 input, batch 1, fp32 unless
FASTVLM_BENCH_DTYPE=bf16): the eager composition of the fastvlm modules (NCHW) vs each fused backend
vs torch.compile of the composition, with the op's roofline floor beside it.

    pytest bench/ --benchmark-columns=median,min,rounds            # all
    pytest bench/ -k "repmixer and stage1"                          # one case
    FASTVLM_BENCH_COMPILE=0 pytest bench/                           # without torch.compile (faster)
    FASTVLM_BENCH_DTYPE=bf16 pytest bench/                          # bf16 weights and activations

The floor is max(FLOPs / the measured multiply-add peak, bytes / the measured copy bandwidth): the
peak of register-only FMA chains of the C++ kernels' ISA on the benchmark's threads
(``fastvlm_kernels.cpu.peak_gflops``), not a GEMM's rate. In bf16 it uses the AMX TDPBF16PS peak where
the kernels run on AMX tiles, the vdpbf16ps peak where the CPU has AVX512_BF16 (else the fp32 FMA
peak: the kernels compute in fp32 there) and 2-byte elements;
eager and torch.compile are skipped on CPUs without AVX512_BF16 (PyTorch's bf16 GEMMs run a scalar
fallback there).

    FASTVLM_BENCH_DEVICE=cuda FASTVLM_BENCH_DTYPE=bf16 pytest bench/   # on a GPU: the triton backend

On CUDA the systems are eager, fused-triton and torch.compile (default mode), timed with CUDA events
over back-to-back calls (no CUDA graphs: the launches count), and the floor uses the GPU's measured
torch.mm rate and copy bandwidth (conftest.py).
"""
import os

import pytest
import torch

import fastvlm.fastvithd as fv
import fastvlm_kernels as fk
from fastvlm.testing import randomize_
from fastvlm_kernels import modules as fm
from bench.conftest import DEVICE, ROWS

COMPILE = os.environ.get("FASTVLM_BENCH_COMPILE", "1") != "0"
DTYPE = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
         "bfloat16": torch.bfloat16}[os.environ.get("FASTVLM_BENCH_DTYPE", "fp32")]
# the fused backends that run on DEVICE: on the CPU the C++ kernels (and the reference ops); on CUDA triton
BACKENDS = [b for b in fk.available_backends() if (b == "triton") == (DEVICE == "cuda")]
CUDA_CALLS, CUDA_ROUNDS = 20, 5


def _prep(mod, seed=0):
    randomize_(mod, seed)
    mod.eval()
    for m in mod.modules():
        if hasattr(m, "reparameterize"):
            m.reparameterize()
    return mod.to(DEVICE, DTYPE)


def _dw_flops(k, cout, ho, wo):
    return 2 * k * k * cout * ho * wo


def _pw_flops(cin, cout, n):
    return 2 * cin * cout * n


# name -> (builder returning (eager_fn, fused_factory(backend) -> fn, input NCHW), flops, bytes)
def case_stem():
    C = 96
    stem = _prep(torch.nn.Sequential(fv.MobileOneBlock(3, C, 3, 2, 1, use_scale_branch=False),
                                     fv.MobileOneBlock(C, C, 3, 2, 1, groups=C, use_scale_branch=False),
                                     fv.MobileOneBlock(C, C, 1, 1, 0, use_scale_branch=False)))
    x = torch.rand(1, 3, 1024, 1024)
    flops = 2 * 27 * C * 512 * 512 + _dw_flops(3, C, 256, 256) + _pw_flops(C, C, 256 * 256)
    nbytes = 4 * (x.numel() + C * 256 * 256)
    return stem, lambda b: fm.FusedStem(stem, b, DTYPE), x, x, flops, nbytes


def case_repmixer(d, hw):
    blk = _prep(fv.RepMixerBlock(d))
    x = torch.randn(1, d, hw, hw)
    n = hw * hw
    flops = _dw_flops(3, d, hw, hw) + _dw_flops(7, d, hw, hw) + 2 * _pw_flops(d, 4 * d, n)
    nbytes = 4 * (2 * d * n + 8 * d * d)
    return blk, lambda b: fm.FusedRepMixerBlock(blk, b, DTYPE), x, x.permute(0, 2, 3, 1).contiguous(), flops, nbytes


def case_attention(d, hw):
    blk = _prep(fv.AttentionBlock(d))
    x = torch.randn(1, d, hw, hw)
    n = hw * hw

    def eager(t):
        return t + blk.layer_scale_1 * blk.token_mixer(blk.norm(t))

    def fused(b):
        f = fm.FusedAttentionBlock(blk, b, DTYPE)
        return lambda t: torch.ops.fastvlm.attention_mixer(t, f.ln_w, f.ln_b, f.qkv_w, f.proj_w, f.proj_b, f.gamma,
                                                           f.head_dim, f.backend)
    flops = _pw_flops(d, 3 * d, n) + 4 * n * n * d + _pw_flops(d, d, n)
    nbytes = 4 * (2 * d * n + 4 * d * d)
    return eager, fused, x, x.permute(0, 2, 3, 1).contiguous(), flops, nbytes


def case_convffn(d, hw):
    blk = _prep(fv.AttentionBlock(d))
    x = torch.randn(1, d, hw, hw)
    n = hw * hw

    def eager(t):
        return t + blk.layer_scale_2 * blk.convffn(t)
    flops = _dw_flops(7, d, hw, hw) + 2 * _pw_flops(d, 4 * d, n)
    nbytes = 4 * (2 * d * n + 8 * d * d)
    return eager, lambda b: fm.FusedConvFFN(blk.convffn, blk.layer_scale_2, b, DTYPE), x, \
        x.permute(0, 2, 3, 1).contiguous(), flops, nbytes


def case_patch_embed(c, hw):
    pe = _prep(fv.PatchEmbed(c, 2 * c))
    x = torch.randn(1, c, hw, hw)
    ho = (hw + 1) // 2
    flops = _dw_flops(7, 2 * c, ho, ho) + _pw_flops(2 * c, 2 * c, ho * ho)
    nbytes = 4 * (c * hw * hw + 2 * c * ho * ho + 4 * c * c)
    return pe, lambda b: fm.FusedPatchEmbed(pe, b, DTYPE), x, x.permute(0, 2, 3, 1).contiguous(), flops, nbytes


def case_cpe(d, hw):
    cpe = _prep(fv.RepCPE(d))
    x = torch.randn(1, d, hw, hw)
    return cpe, lambda b: fm.FusedDWConv(cpe.reparam_conv, b, DTYPE), x, x.permute(0, 2, 3, 1).contiguous(), \
        _dw_flops(7, d, hw, hw), 4 * 2 * d * hw * hw


def case_conv_exp():
    blk = _prep(fv.MobileOneBlock(1536, 3072, 3, 1, 1, groups=1536, use_se=True))
    x = torch.randn(1, 1536, 16, 16)
    return blk, lambda b: fm.FusedConvExp(blk, b, DTYPE), x, x.permute(0, 2, 3, 1).contiguous(), \
        _dw_flops(3, 3072, 16, 16), 4 * ((1536 + 3072) * 256 + 9 * 3072 + 2 * 192 * 3072)  # + dw and SE weights


CASES = {
    "stem 1024->256x256x96": case_stem,
    "repmixer_block stage0 256x256x96": lambda: case_repmixer(96, 256),
    "repmixer_block stage1 128x128x192": lambda: case_repmixer(192, 128),
    "repmixer_block stage2 64x64x384": lambda: case_repmixer(384, 64),
    "patch_embed 1 256x256x96": lambda: case_patch_embed(96, 256),
    "patch_embed 2 128x128x192": lambda: case_patch_embed(192, 128),
    "patch_embed 3 64x64x384": lambda: case_patch_embed(384, 64),
    "patch_embed 4 32x32x768": lambda: case_patch_embed(768, 32),
    "dwconv cpe3 32x32x768": lambda: case_cpe(768, 32),
    "dwconv cpe4 16x16x1536": lambda: case_cpe(1536, 16),
    "attention_mixer stage3 32x32x768": lambda: case_attention(768, 32),
    "attention_mixer stage4 16x16x1536": lambda: case_attention(1536, 16),
    "convffn stage3 32x32x768": lambda: case_convffn(768, 32),
    "convffn stage4 16x16x1536": lambda: case_convffn(1536, 16),
    "conv_exp 16x16x1536": case_conv_exp,
}
SYSTEMS = ["eager"] + [f"fused-{b}" for b in BACKENDS] + (["compile"] if COMPILE else [])


@pytest.mark.parametrize("system", SYSTEMS)
@pytest.mark.parametrize("case", list(CASES))
def test_op(benchmark, machine, case, system):
    eager, fused_factory, x_nchw, x_nhwc, flops, nbytes = CASES[case]()
    x_nchw, x_nhwc, nbytes = x_nchw.to(DEVICE, DTYPE), x_nhwc.to(DEVICE, DTYPE), nbytes * DTYPE.itemsize // 4
    if DTYPE == torch.bfloat16 and system in ("eager", "compile") and not machine["fast_bf16"]:
        pytest.skip("no AVX512_BF16 / AMX: PyTorch's bf16 GEMMs would run a scalar fallback here")
    if system == "eager":
        fn, x = eager, x_nchw
    elif system == "compile":
        torch._dynamo.reset()
        fn, x = torch.compile(eager, dynamic=False), x_nchw
    else:
        backend = system.split("-", 1)[1]
        op = case.split()[0]
        if op not in fk.ops.backend_ops(backend):
            pytest.skip(f"{backend} does not implement {op}")
        fn = fused_factory(backend)
        x = x_nchw if case.startswith("stem") else x_nhwc

    def call():
        with torch.inference_mode():
            return fn(x)

    call()  # warm-up (and compilation)
    if DEVICE == "cuda":
        from bench.report_cuda import cuda_time

        def synced():
            call()
            torch.cuda.synchronize()
        benchmark.pedantic(synced, rounds=CUDA_ROUNDS, warmup_rounds=1, iterations=1)
        rounds = sorted(cuda_time(call, CUDA_CALLS) for _ in range(CUDA_ROUNDS))
        median_s, min_s = rounds[len(rounds) // 2], rounds[0]
    else:
        benchmark.pedantic(call, rounds=5, warmup_rounds=1, iterations=1)
        median_s, min_s = benchmark.stats.stats.median, benchmark.stats.stats.min
    rate = machine["peak_gflops_bf16"] if DTYPE == torch.bfloat16 else machine["peak_gflops"]
    floor_s = max(flops / (rate * 1e9), nbytes / (machine["copy_gbs"] * 1e9))
    benchmark.extra_info.update({"gflop": flops / 1e9, "mbytes": nbytes / 1e6, "floor_ms": floor_s * 1e3,
                                 "peak_gflops": rate, "copy_gbs": machine["copy_gbs"], "threads": machine["threads"]})
    ROWS.append({"case": case, "system": system, "ms": median_s * 1e3, "min_ms": min_s * 1e3,
                 "floor_ms": floor_s * 1e3, "gflop": flops / 1e9, "mbytes": nbytes / 1e6})
