"""The ``cpu`` backend: C++ kernels from ``fastvlm_kernels._C`` (csrc/), one module per op
(``cpu/<op>.py``: the call into ``csrc/ops/<op>.cpp``), registered from :data:`OPS` when the backend
loads.

- ``stem``: conv3x3 s2 -> dw3x3 s2 -> 1x1, each + GELU, in one pass over the image;
- ``convffn`` / ``repmixer_block``: dw7x7 -> fc1 -> GELU -> fc2 -> layer scale + residual, one tile of
  pixels at a time, the 4C hidden kept in cache (the RepMixer's dw3x3 output in per-thread scratch);
- ``patch_embed`` (dw7x7 s2 x2 + GELU -> 1x1 + GELU per tile) and ``dwconv``;
- ``attention_mixer``: LayerNormChannel in the qkv GEMM's prologue, flash attention with online
  softmax, proj with a bias + layer scale + residual epilogue;
- ``conv_exp``: the dw conv with per-row channel sums, SE, then GELU(z·s).

In bf16 on a CPU with AVX512_BF16 the GEMMs of convffn, repmixer_block, attention_mixer and
patch_embed multiply bf16 pairs with vdpbf16ps (csrc/kernels/bf16_pairs.h; on AMX tiles where the ISA
is ``amx_bf16``): :func:`uses_bf16_pairs`. The 1x1 weights are handed to the kernels in the panel
layout their GEMMs read (:class:`PackedFormat`, ``cpu/packing.py``): ``accelerate()`` packs them once
(:func:`prepack`).

The kernels run with float32 denormals flushed (FTZ + DAZ on their threads, restored afterwards):
values below 1.18e-38 in magnitude are read, and produced, as signed zeros (docs/numerics.md).
"""
from __future__ import annotations

import importlib

import torch

from .. import backends, ops
from .._ext import extension_error, load_extension
from .isa import cpu_isa, peak_gflops, uses_bf16_pairs
from .packing import PackedFormat, is_prepacked, packed, prepack, unpack, unprepack

__all__ = ["OPS", "PackedFormat", "cpu_isa", "peak_gflops", "uses_bf16_pairs", "packed", "unpack", "prepack",
           "unprepack", "is_prepacked"]

#: The ops this backend implements: ``cpu/<op>.py``'s ``run`` each.
OPS = (
    "stem",
    "repmixer_block",
    "convffn",
    "patch_embed",
    "dwconv",
    "attention_mixer",
    "conv_exp",
)


def _unavailable():
    return None if load_extension() is not None else f"the C++ extension is not built ({extension_error()})"


def _register_kernels() -> None:
    for op in OPS:
        ops.register_kernel(op, "cpu", importlib.import_module(f"{__name__}.{op}").run)


ops.register_weight_format("cpu", PackedFormat)
backends.register(backends.Backend(
    name="cpu", devices=("cpu",), dtypes=(torch.float32, torch.bfloat16), unavailable=_unavailable,
    load=_register_kernels, prepare=prepack, unprepare=unprepack, is_prepared=is_prepacked))
