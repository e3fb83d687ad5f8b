"""The cpu backend's view of the machine: the vector ISA its C++ kernels use, whether the bf16 GEMMs
multiply bf16 pairs, and the measured multiply-add peak."""
from __future__ import annotations

import torch

from .._ext import load_extension

# The extension's ops (torch.ops.fastvlm_C.*), loaded on import so that every function of this backend
# works in a process that imported nothing else first; without the extension this still imports.
load_extension()
C = torch.ops.fastvlm_C


def cpu_isa() -> str:
    """The vector ISA the C++ kernels use now ('amx_bf16', 'avx512_bf16', 'avx512', 'avx2' or 'sse';
    FASTVLM_CPU_ISA caps it). 'avx512_bf16' is 'avx512' plus the bf16-pair GEMMs (ConvFFN,
    attention, patch_embed's 1x1); 'amx_bf16' runs those GEMMs on AMX tiles."""
    return load_extension().cpu_isa()


def peak_gflops(dtype: torch.dtype = torch.float32, seconds: float = 0.2, reps: int = 3) -> float:
    """The measured multiply-add peak, in GFLOP/s, of the C++ kernels' GEMMs for ``dtype`` activations
    on ``torch.get_num_threads()`` threads: FMA chains of the ISA in use (:func:`cpu_isa`), or
    vdpbf16ps chains where :func:`uses_bf16_pairs` (bf16 on AVX512_BF16; TDPBF16PS tile chains on
    ``amx_bf16``). Register-only loops, no
    memory traffic: the compute roofline that ``bench/`` divides FLOPs by (the best of ``reps`` runs
    of about ``seconds``). Not the rate of any GEMM (``torch.mm``'s is usually well below it)."""
    return float(C.peak_gflops(uses_bf16_pairs(dtype), float(seconds), int(reps)))


def uses_bf16_pairs(dtype: torch.dtype) -> bool:
    """Whether the GEMMs of ``dtype`` activations (the ConvFFN's, attention's and patch_embed's)
    run the bf16-pair kernels now (bf16 pair products, fp32 accumulation; csrc/kernels/bf16_pairs.h, on AMX
    tiles where the ISA is ``amx_bf16``: csrc/kernels/amx.h): bfloat16 on a CPU with AVX512_BF16,
    unless FASTVLM_CPU_ISA caps the ISA below ``avx512_bf16``.
    Their fc1 / fc2, qkv / proj and pw weights are then packed by ``pack_linear_bf16``; the other
    bf16 kernels (the stem, the depthwise convs, the softmax) compute in fp32 on bf16 storage."""
    return dtype == torch.bfloat16 and cpu_isa() in ("avx512_bf16", "amx_bf16")
