"""The backend registry: which backends exist, which can run here, and what ``backend="auto"`` picks.

A backend is one package of this project (``fastvlm_kernels.reference``, ``.cpu``, ``.triton``) that
declares itself when imported, with a :class:`Backend`: its name, the device types and dtypes its
kernels take, why it cannot run here (if it cannot), how it loads its kernels (``ops.register_kernel``
for every op it implements), and how it prepares an encoder's weights at ``accelerate()`` time. This
module names backends only in its two tables: :data:`PACKAGES` (where to find them) and :data:`AUTO`
(what ``"auto"`` tries per device type, the last entry being the fallback that runs anywhere).

A backend is available when it can run here and covers all seven ops, itself or through a declared
fallback that :func:`describe` names and ``accelerate()`` warns about once. See docs/architecture.md.
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from . import ops

__all__ = ["Backend", "register", "get", "declared", "available_backends", "unavailable_reason", "resolve_backend",
           "describe", "PACKAGES", "AUTO", "FALLBACK"]

#: The backend packages of this project, imported on first use; each registers its Backend.
PACKAGES = ("reference", "cpu", "triton")
#: backend="auto": per device type, the backends to try in order; other device types get FALLBACK.
AUTO: Dict[str, Tuple[str, ...]] = {"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")}
#: The backend that runs anywhere, in any dtype: the op contracts written plainly.
FALLBACK = "reference"


@dataclass(frozen=True)
class Backend:
    """What a backend package declares about itself (``backends.register(Backend(...))`` on import)."""
    name: str
    #: device types its kernels take (torch.device.type); None: any
    devices: Optional[Tuple[str, ...]]
    #: activation / weight dtypes it computes in
    dtypes: Tuple[torch.dtype, ...]
    #: None when it can run here, else a sentence saying why not; cheap, called before `load`
    unavailable: Callable[[], Optional[str]] = lambda: None
    #: registers its kernels with ops.register_kernel (and imports what they need); called once
    load: Callable[[], None] = lambda: None
    #: accelerate(): an encoder's fused modules' weights into this backend's layout, in place ...
    prepare: Optional[Callable[[nn.Module], None]] = None
    #: ... and back into the reference layout; is_prepared says whether an encoder holds its layout
    unprepare: Optional[Callable[[nn.Module], None]] = None
    is_prepared: Optional[Callable[[nn.Module], bool]] = None


_DECLARED: Dict[str, Backend] = {}
_LOADED: Dict[str, Optional[str]] = {}  # name -> None once loaded, or why loading failed
_discovered = False
_warned: set = set()


def register(backend: Backend) -> Backend:
    """Declare a backend (its package calls this when imported)."""
    _DECLARED[backend.name] = backend
    return backend


def _discover() -> None:
    global _discovered
    if not _discovered:
        _discovered = True
        for pkg in PACKAGES:
            importlib.import_module(f"{__package__}.{pkg}")


def declared() -> List[Backend]:
    """Every declared backend, usable here or not."""
    _discover()
    return list(_DECLARED.values())


def get(name: str) -> Backend:
    _discover()
    if name not in _DECLARED:
        raise ValueError(f"unknown backend {name!r}; backends are {sorted(_DECLARED)}")
    return _DECLARED[name]


def _load(name: str) -> Optional[str]:
    """Load a declared backend's kernels once; None, or why it cannot run here."""
    if name not in _LOADED:
        spec = _DECLARED[name]
        why = spec.unavailable()
        if why is None:
            spec.load()
        _LOADED[name] = why
    return _LOADED[name]


def unavailable_reason(backend: str) -> Optional[str]:
    """None when ``backend`` can run here, else a sentence saying why not."""
    _discover()
    if backend not in _DECLARED:
        return f"unknown backend {backend!r}; backends are {sorted(_DECLARED)}"
    why = _load(backend)
    if why is not None:
        return why
    missing = [op for op in ops.OPS if op not in ops.backend_ops(backend) and op not in ops.fallback_ops(backend)]
    if missing:
        return f"the {backend} backend does not implement {', '.join(missing)} yet"
    return None


def _ensure_loaded(backend: str) -> None:
    """ops.kernel_for's hook: load a backend's kernels on first use (ops called with backend=...)."""
    _discover()
    if backend in _DECLARED:
        _load(backend)


ops.set_backend_loader(_ensure_loaded)


def available_backends() -> List[str]:
    """Backends usable in this process, e.g. ['reference', 'cpu']."""
    return [b.name for b in declared() if unavailable_reason(b.name) is None]


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


def _why_not(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    why = unavailable_reason(name)
    if why is None:
        spec = _DECLARED[name]
        if spec.devices is not None and device.type not in spec.devices:
            why = f"the {name} backend runs on {', '.join(spec.devices)} tensors, not {device.type}"
        elif dtype not in spec.dtypes:
            names = " and ".join(str(d).replace("torch.", "") for d in spec.dtypes)
            why = f"the {name} backend supports {names}, not {dtype}"
    return why


def _resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    if backend == "auto":
        first_why = None
        for name in AUTO.get(device.type, (FALLBACK,)):
            why = _why_not(name, device, dtype)
            if why is None:
                if first_why is not None and first_why not in _warned:
                    _warned.add(first_why)
                    warnings.warn(f"fastvlm_kernels: backend='auto' falls back to {name!r} on {device.type}: "
                                  f"{first_why}", RuntimeWarning, stacklevel=3)
                return name
            first_why = first_why or why
        raise ValueError(f"fastvlm_kernels: no backend can run {dtype} on {device.type}: {first_why}")
    why = unavailable_reason(backend)
    if why is not None:
        raise ValueError(f"fastvlm_kernels: backend {backend!r} is unavailable: {why}")
    spec = _DECLARED[backend]
    if spec.devices is not None and device.type not in spec.devices:
        raise ValueError(f"fastvlm_kernels: backend {backend!r} needs {'/'.join(d.upper() for d in spec.devices)} "
                         f"tensors, the model is on {device}")
    return backend


def prepare_weights(enc: nn.Module, backend: str) -> None:
    """accelerate(): an encoder's weights in the layout ``backend`` reads, once: any other backend's
    layout undone first (back to the reference layout), then this backend's applied."""
    with torch.no_grad():
        for other in declared():
            if other.name != backend and other.is_prepared is not None and other.is_prepared(enc):
                other.unprepare(enc)
        spec = get(backend)
        if spec.prepare is not None:
            spec.prepare(enc)
