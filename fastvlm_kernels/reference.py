"""The ``reference`` backend: every op's ``reference`` implementation (``ops/<op>.py``), eager torch,
the same math as ``fastvlm``.

Each takes NHWC activations ``(B, H, W, C)`` and the packed weights of its op contract, computes in
float32 (float64 when given float64) and returns the input's dtype. They are the ground truth of the
CPU and Triton kernels, and the fallback when no other backend is available. They are not fast
(they go through NCHW convolutions). ``reference.<op>`` is ``ops.<op>.reference``.
"""
from __future__ import annotations

import torch

from . import backends, ops
from .ops._eager import compute_dtype

__all__ = list(ops.OPS) + ["compute_dtype"]


def __getattr__(name):  # reference.stem, ... (PEP 562)
    if name in ops.OPS:
        return ops.contract(name).reference
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_kernels() -> None:
    for op in ops.OPS:
        ops.register_kernel(op, "reference", ops.contract(op).reference)


backends.register(backends.Backend(
    name="reference", devices=None, dtypes=(torch.float32, torch.bfloat16, torch.float16),
    load=_register_kernels))
