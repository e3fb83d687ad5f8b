"""The seven fused ops of FastViTHD (docs/architecture.md) as ``torch.library`` custom ops.

Each op is ``torch.ops.fastvlm.<name>``, defined in its own module ``ops/<name>.py``: the contract
(schema, input validation, a fake implementation so that ``torch.compile`` and ``torch.export``
trace through it), the reference implementation (the contract written plainly in eager torch) and
the fused ``nn.Module`` that calls it. The last argument, ``backend``, names the implementation to
run; this package holds the registry that maps (op, backend) to code, filled by the backends when
they load (``fastvlm_kernels.backends``). It names no backend.

Adding an op: ``ops/<name>.py`` (its contract, reference and fused module), its entry in :data:`OPS`,
one kernel module per backend that implements it (e.g. ``cpu/<name>.py`` and ``csrc/ops/<name>.cpp``,
``triton/<name>.py``) with one line in that backend's list of ops, and the line in ``accelerate.py``
that says where FastViTHD uses it.

Activations are NHWC ``(B, H, W, C)``. Weights are packed once (the fused modules), in the
activation dtype:

=================  ===========================================================================
dw weight          ``(K, K, Cout)``: a depthwise / grouped conv with groups = C, Cout = C·M;
                   output channel ``co`` reads input channel ``co // M``
pointwise / linear ``(Cout, Cin)`` (the nn.Linear layout), or that weight in a backend's own
                   layout (:func:`register_weight_format`; e.g. ``fastvlm_kernels.cpu.PackedFormat``,
                   what ``accelerate()`` stores for the cpu backend): an op's ``LINEAR_WEIGHTS``
bias, gamma, norm  ``(C,)``
stem conv3x3       ``(C, Cin, 3, 3)`` (the nn.Conv2d layout)
=================  ===========================================================================

| op              | computes                                                                     |
|-----------------|------------------------------------------------------------------------------|
| stem            | GELU(conv3x3 s2) -> GELU(dw3x3 s2) -> GELU(1x1)                              |
| repmixer_block  | m = dw3x3(x); y = m + gamma·fc2(GELU(fc1(dw7x7_bnfolded(m))))                |
| convffn         | y = x + gamma·fc2(GELU(fc1(dw7x7_bnfolded(x))))                              |
| patch_embed     | GELU(dw7x7 s2, multiplier 2) -> GELU(1x1)                                    |
| dwconv          | depthwise kxk, stride, multiplier, bias, optional GELU                       |
| attention_mixer | y = x + gamma·proj(MHSA(LayerNormChannel(x)))                                |
| conv_exp        | GELU(SE(dw3x3, multiplier 2))                                                |
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["OPS", "contract", "linear_weights", "register_kernel", "register_fallback", "register_weight_format",
           "kernel_for", "backend_ops", "fallback_ops", "registered_backends", "set_backend_loader"]

#: The ops, one module each (``ops/<name>.py``), defined in this order when the package is imported.
OPS = (
    "stem",
    "repmixer_block",
    "convffn",
    "patch_embed",
    "dwconv",
    "attention_mixer",
    "conv_exp",
)

# (op, backend) -> implementation with the op's signature minus ``backend``. Backends fill it when they
# load (fastvlm_kernels.backends); this module names none of them.
_KERNELS: Dict[str, Dict[str, Callable]] = {op: {} for op in OPS}
# backends.py's hook: loads a backend's kernels the first time an op is called with it.
_LOAD_BACKEND: Optional[Callable[[str], None]] = None


def set_backend_loader(fn: Callable[[str], None]) -> None:
    global _LOAD_BACKEND
    _LOAD_BACKEND = fn


def register_kernel(op: str, backend: str, fn: Callable) -> None:
    if op not in _KERNELS:
        raise ValueError(f"register_kernel: unknown op {op!r}; ops are {OPS}")
    _KERNELS[op][backend] = fn


def registered_backends() -> List[str]:
    """The backends that have registered kernels so far, in registration order."""
    seen: Dict[str, None] = {}
    for op in OPS:
        seen.update(dict.fromkeys(_KERNELS[op]))
    return list(seen)


# backend -> the format of the weights it prepares in a layout of its own (e.g. the cpu backend's
# packed panels): an object with .description (e.g. "packed for the cpu backend (where it is
# described)"), .owns(t) -> bool (t is in this layout)
# and .matches(t, (n, k)) -> bool (t is an (n, k) nn.Linear weight in this layout; n < 0: any n). The contracts below accept such a weight in
# place of the nn.Linear one, and only for the backend that owns its format.
_WEIGHT_FORMATS: Dict[str, object] = {}


def register_weight_format(backend: str, fmt: object) -> None:
    _WEIGHT_FORMATS[backend] = fmt


def _format_owner(t: Tensor, shape: Sequence[int]) -> Optional[str]:
    for backend, fmt in _WEIGHT_FORMATS.items():
        if fmt.matches(t, tuple(shape)):
            return backend
    return None


# (op, backend) -> the backend that runs in its place, for ops a backend does not implement yet.
# Declared, never silent: backends.fallback_ops() lists them and accelerate() warns once.
_FALLBACKS: Dict[str, Dict[str, str]] = {op: {} for op in OPS}


def register_fallback(op: str, backend: str, instead: str) -> None:
    if backend in _KERNELS[op]:
        raise ValueError(f"register_fallback: {backend} implements {op}")
    _FALLBACKS[op][backend] = instead


def backend_ops(backend: str) -> List[str]:
    """The ops that ``backend`` implements itself (fallbacks excluded)."""
    return [op for op in OPS if backend in _KERNELS[op]]


def fallback_ops(backend: str) -> Dict[str, str]:
    """{op: backend that runs instead} for the ops ``backend`` does not implement yet."""
    return {op: _FALLBACKS[op][backend] for op in OPS if backend in _FALLBACKS[op]}


def own_layouts_only(op: str, backend: str, *weights) -> None:
    """Weights in a backend's own layout (a 1x1 weight that is not 2-D) are read by that backend's
    kernels only."""
    for w in weights:
        if isinstance(w, Tensor) and w.dim() != 2:
            owner = next((b for b, fmt in _WEIGHT_FORMATS.items() if fmt.owns(w)), None)
            if owner != backend:
                where = _WEIGHT_FORMATS[owner].description if owner else "in no known layout"
                raise ValueError(f"fastvlm::{op}: its 1x1 weights are {where}, which the {backend!r} backend "
                                 f"cannot read; switch with fastvlm_kernels.accelerate(model, backend={backend!r}), "
                                 "which restores the nn.Linear layout")


def kernel_for(op: str, backend: str) -> Callable:
    if backend not in _KERNELS.get(op, {}) and _LOAD_BACKEND is not None:
        _LOAD_BACKEND(backend)
    try:
        return _KERNELS[op][backend]
    except KeyError:
        if backend in _FALLBACKS.get(op, {}):
            return _KERNELS[op][_FALLBACKS[op][backend]]
        have = [b for b in registered_backends() if b in _KERNELS.get(op, {})]
        raise RuntimeError(f"fastvlm::{op}: backend {backend!r} has no implementation of this op "
                           f"(available: {have})") from None


# --------------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------------
# The ops are defined through the low-level torch.library API (define + impl + register_fake +
# register_autograd) rather than @torch.library.custom_op: custom_op wraps every kernel in
# torch._disable_dynamo, which imports torch._dynamo on the op's first call -- 1.6 s on the 2-core
# CI machine, paid inside the first forward of every process, i.e. in the time to first token.
# What custom_op provides is kept: a schema inferred from the annotations, one implementation for
# every device (CompositeExplicitAutograd), a fake implementation for torch.compile / export, and
# an autograd registration whose backward raises (the ops are inference-only).
_LIB = torch.library.Library("fastvlm", "DEF")


class _Op:
    """One ``fastvlm::<name>`` op; ``fn`` is its implementation (validation + backend dispatch)."""

    def __init__(self, fn: Callable):
        self.name = fn.__name__
        self.qualname = f"fastvlm::{self.name}"
        _LIB.define(self.name + torch.library.infer_schema(fn, mutates_args=()))
        _LIB.impl(self.name, fn, "CompositeExplicitAutograd")
        torch.library.register_autograd(self.qualname, self._no_backward, lib=_LIB)

    def _no_backward(self, ctx, *grads):
        raise RuntimeError(f"{self.qualname} is inference-only and has no backward")

    def register_fake(self, fake: Callable) -> Callable:
        torch.library.register_fake(self.qualname, fake, lib=_LIB)
        return fake

    def __call__(self, *args, **kwargs):
        return getattr(torch.ops.fastvlm, self.name)(*args, **kwargs)


def define(fn: Callable) -> _Op:
    """Define ``torch.ops.fastvlm.<fn.__name__>`` (an op module's contract: validation + dispatch)."""
    return _Op(fn)


def contract(op: str) -> ModuleType:
    """The module that defines ``op`` (``fastvlm_kernels.ops.<op>``)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops are {OPS}")
    return importlib.import_module(f"{__name__}.{op}")


def linear_weights(op: str) -> tuple:
    """The names of ``op``'s 1x1 (nn.Linear-layout) weights, which a backend may hold in its own layout."""
    return contract(op).LINEAR_WEIGHTS


for _op in OPS:
    contract(_op)
