"""The ``triton`` backend: the seven ops as Triton kernels (``kernels.py``), launched by one module
per op (``triton/<op>.py``'s ``run``, on the shared building blocks of ``launch.py``), registered from
:data:`OPS` when the backend loads.

CUDA tensors in fp32 / fp16 / bf16 (fp32 accumulation; fp32 GEMMs use IEEE fp32, not TF32, to keep
the fp32 parity bound). With ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors through
Triton's interpreter (fp32 / fp16 only: the interpreter has no bf16), which is how CI checks their
numerics without a GPU. Not yet run on a GPU (docs/gpu.md).

This module declares the backend and imports nothing heavy: triton and the kernels load when the
backend is first used (fastvlm_kernels.backends).
"""
from __future__ import annotations

import importlib
import os

import torch

from .. import backends, ops

__all__ = ["OPS", "INTERPRET", "FFN_FUSED_MAX_C", "launch_config", "precompile"]

#: The ops this backend implements: ``triton/<op>.py``'s ``run`` each.
OPS = (
    "stem",
    "repmixer_block",
    "convffn",
    "patch_embed",
    "dwconv",
    "attention_mixer",
    "conv_exp",
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _unavailable():
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if not (torch.cuda.is_available() or INTERPRET):
        return "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU, slowly)"
    return None


def _guarded(run):
    """An op module's ``run`` with its tensors made contiguous (the kernels index them densely; a
    no-op for the weights accelerate() packed) and its launches on their device, not the current one."""

    def call(x, *args):
        args = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args]
        x = x.contiguous()
        if x.is_cuda and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):
                return run(x, *args)
        return run(x, *args)

    call.__name__ = call.__qualname__ = f"{run.__module__}.run"
    return call


def _load() -> None:
    for op in OPS:
        ops.register_kernel(op, "triton", _guarded(importlib.import_module(f"{__name__}.{op}").run))


def __getattr__(name):  # launch_config, precompile and the tuning constants live with the launcher (PEP 562)
    if name in ("FFN_FUSED_MAX_C", "launch_config", "precompile"):
        from . import launch
        return getattr(launch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


backends.register(backends.Backend(
    name="triton", devices=("cuda", "cpu") if INTERPRET else ("cuda",),
    dtypes=(torch.float32, torch.float16, torch.bfloat16), unavailable=_unavailable, load=_load))
