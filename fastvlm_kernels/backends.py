"""Which backends exist, which are usable, and what ``backend="auto"`` picks (docs/architecture.md).

A backend is available when it covers all seven ops (itself, or through a declared fallback that
``describe()`` names and ``accelerate()`` warns about once) and can run here: ``reference`` always;
``cpu`` when the C++ extension is built; ``triton`` when triton imports and CUDA is there (or
``TRITON_INTERPRET=1``). ``auto``: CUDA tensors -> triton, CPU tensors -> cpu, and reference, with
one warning saying why, when that choice is unavailable.
"""
from __future__ import annotations

import os
import warnings
from typing import List, Optional

import torch

from . import ops
from ._ext import extension_error, load_extension

__all__ = ["available_backends", "unavailable_reason", "resolve_backend", "describe"]

_warned: set = set()


def _register_cpu() -> None:
    """Register the C++ kernels that the extension provides as the ``cpu`` backend."""
    if load_extension() is None:
        return
    from . import cpu  # noqa: F401  (registers its kernels)


def unavailable_reason(backend: str) -> Optional[str]:
    """None when ``backend`` can run here, else a sentence saying why not."""
    if backend not in ops.BACKENDS:
        return f"unknown backend {backend!r}; backends are {ops.BACKENDS}"
    if backend == "cpu":
        _register_cpu()
        if load_extension() is None:
            return f"the C++ extension is not built ({extension_error()})"
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
        if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
            return "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU, slowly)"
        from . import triton as _t  # noqa: F401  (registers its kernels)
    missing = [op for op in ops.OPS if op not in ops.backend_ops(backend) and op not in ops.fallback_ops(backend)]
    if missing:
        return f"the {backend} backend does not implement {', '.join(missing)} yet"
    return None


def available_backends() -> List[str]:
    """Backends usable in this process, e.g. ['reference', 'cpu']."""
    return [b for b in ops.BACKENDS if unavailable_reason(b) is None]


def describe(backend: str) -> str:
    """e.g. 'cpu (C++: convffn, dwconv; reference: stem, ...)' -- what really runs each op."""
    fb = ops.fallback_ops(backend)
    if not fb:
        return backend
    return (f"{backend} ({backend} kernels: {', '.join(ops.backend_ops(backend))}; not written yet, running "
            f"{'/'.join(sorted(set(fb.values())))}: {', '.join(fb)})")


def _warn_fallbacks(backend: str) -> None:
    if ops.fallback_ops(backend):
        msg = f"fastvlm_kernels: backend {describe(backend)}"
        if msg not in _warned:
            _warned.add(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=4)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that will run for tensors on ``device``: 'auto' resolved, explicit ones checked.
    Warns once per backend that still runs some ops through another one."""
    name = _resolve(backend, device, dtype)
    _warn_fallbacks(name)
    return name


def _resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    if backend == "auto":
        want = "triton" if device.type == "cuda" else "cpu"
        why = unavailable_reason(want)
        if why is None and want == "cpu" and dtype not in (torch.float32, torch.bfloat16):
            why = f"the cpu backend supports float32 and bfloat16, not {dtype}"
        if why is None:
            return want
        if why not in _warned:
            _warned.add(why)
            warnings.warn(f"fastvlm_kernels: backend='auto' falls back to 'reference' on {device.type}: {why}",
                          RuntimeWarning, stacklevel=3)
        return "reference"
    why = unavailable_reason(backend)
    if why is not None:
        raise ValueError(f"fastvlm_kernels: backend {backend!r} is unavailable: {why}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"fastvlm_kernels: backend 'cpu' needs CPU tensors, the model is on {device}")
    return backend
