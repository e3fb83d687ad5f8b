"""The seven fused ops of FastViTHD (docs/architecture.md) as ``torch.library`` custom ops.

Each op is ``torch.ops.fastvlm.<name>`` (defined with the low-level ``torch.library`` API, see
``_Op``), with a schema, a fake (meta) implementation so that
``torch.compile`` and ``torch.export`` trace through it, input validation, and one
implementation per backend. The last argument, ``backend``, names the implementation to run; the
registry below is the one place that maps (op, backend) to code.

Activations are NHWC ``(B, H, W, C)``. Weights are packed once (``fastvlm_kernels.modules``), in the
activation dtype:

=================  ===========================================================================
dw weight          ``(K, K, Cout)``: a depthwise / grouped conv with groups = C, Cout = C·M;
                   output channel ``co`` reads input channel ``co // M``
pointwise / linear ``(Cout, Cin)`` (the nn.Linear layout); for the ``cpu`` backend also packed
                   (``fastvlm_kernels.cpu.packed``: 3-D panels, what ``accelerate()`` stores)
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

from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["OPS", "register_kernel", "register_fallback", "register_weight_format", "kernel_for", "backend_ops",
           "fallback_ops", "registered_backends", "set_backend_loader", "stem", "repmixer_block", "convffn",
           "patch_embed", "dwconv", "attention_mixer", "conv_exp"]

OPS = ("stem", "repmixer_block", "convffn", "patch_embed", "dwconv", "attention_mixer", "conv_exp")

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


def _own_layouts_only(op: str, backend: str, *weights) -> None:
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


# --------------------------------------------------------------------------------------------------
# validation (runs on real and fake tensors alike)
# --------------------------------------------------------------------------------------------------


def _check_x(op: str, x, channels: Optional[int] = None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"fastvlm::{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"fastvlm::{op}: x must be 4-D NHWC (B, H, W, C), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"fastvlm::{op}: x must be floating point, got dtype {x.dtype}")
    if x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(f"fastvlm::{op}: x must have H, W >= 1, got shape {tuple(x.shape)}")
    if channels is not None and x.shape[3] != channels:
        raise ValueError(f"fastvlm::{op}: x has {x.shape[3]} channels (dim 3), the weights expect {channels}")


def _check_w(op: str, name: str, t, shape: Sequence[int], x: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"fastvlm::{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if len(shape) == 2 and t.dim() != 2 and _WEIGHT_FORMATS:  # a 1x1 weight in a backend's own layout
        owner = _format_owner(t, shape)
        if owner is None:
            formats = " or ".join(f.description for f in _WEIGHT_FORMATS.values())
            raise ValueError(f"fastvlm::{op}: {name} must have shape {tuple(shape)}, or be that weight {formats}, "
                             f"got {t.dtype} {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"fastvlm::{op}: {name} is on {t.device} but x is on {x.device}")
        return
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"fastvlm::{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"fastvlm::{op}: {name} has dtype {t.dtype} but x has {x.dtype}; weights are packed in "
                        "the activation dtype (accelerate(model, dtype=...))")
    if t.device != x.device:
        raise ValueError(f"fastvlm::{op}: {name} is on {t.device} but x is on {x.device}")


def _check_dw(op: str, prefix: str, w, b, x: Tensor) -> int:
    """Checks a packed (K, K, Cout) depthwise weight against x; returns Cout."""
    wn, bn = (f"{prefix}_w", f"{prefix}_b") if prefix else ("w", "b")
    if not isinstance(w, Tensor) or w.dim() != 3 or w.shape[0] != w.shape[1]:
        raise ValueError(f"fastvlm::{op}: {wn} must be a packed (K, K, Cout) depthwise weight, got "
                         f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
    cout = w.shape[2]
    if cout % x.shape[3]:
        raise ValueError(f"fastvlm::{op}: {wn} has Cout={cout}, not a multiple of x's {x.shape[3]} channels")
    _check_w(op, wn, w, tuple(w.shape), x)
    if b is not None:
        _check_w(op, bn, b, (cout,), x)
    return cout


def _conv_out(n: int, k: int, stride: int, pad: int) -> int:
    return (n + 2 * pad - k) // stride + 1


def _check_ffn(op, x, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma):
    C = x.shape[3]
    if _check_dw(op, "ffn", ffn_w, ffn_b, x) != C:
        raise ValueError(f"fastvlm::{op}: ffn_w must be depthwise with Cout = C = {C}, got {tuple(ffn_w.shape)}")
    hidden = fc1_b.shape[0] if isinstance(fc1_b, Tensor) and fc1_b.dim() == 1 else -1
    _check_w(op, "fc1_w", fc1_w, (hidden, C), x)
    _check_w(op, "fc1_b", fc1_b, (hidden,), x)
    _check_w(op, "fc2_w", fc2_w, (C, hidden), x)
    _check_w(op, "fc2_b", fc2_b, (C,), x)
    _check_w(op, "gamma", gamma, (C,), x)


# --------------------------------------------------------------------------------------------------
# the ops
# --------------------------------------------------------------------------------------------------


def _check_stem(x, w0, b0, w1, b1, w2, b2):
    C = w0.shape[0] if isinstance(w0, Tensor) and w0.dim() == 4 else -1
    _check_x("stem", x, w0.shape[1] if isinstance(w0, Tensor) and w0.dim() == 4 else None)
    _check_w("stem", "w0", w0, (C, x.shape[3], 3, 3), x)
    _check_w("stem", "b0", b0, (C,), x)
    _check_w("stem", "w1", w1, (3, 3, C), x)
    _check_w("stem", "b1", b1, (C,), x)
    _check_w("stem", "w2", w2, (C, C), x)
    _check_w("stem", "b2", b2, (C,), x)
    B, H, W, _ = x.shape
    h = _conv_out(_conv_out(H, 3, 2, 1), 3, 2, 1)
    w = _conv_out(_conv_out(W, 3, 2, 1), 3, 2, 1)
    return (B, h, w, C)


@_Op
def stem(x: Tensor, w0: Tensor, b0: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, backend: str) -> Tensor:
    _check_stem(x, w0, b0, w1, b1, w2, b2)
    _own_layouts_only("stem", backend, w2)
    return kernel_for("stem", backend)(x, w0, b0, w1, b1, w2, b2)


@stem.register_fake
def _(x, w0, b0, w1, b1, w2, b2, backend):
    return x.new_empty(_check_stem(x, w0, b0, w1, b1, w2, b2))


def _check_repmixer(x, mix_w, mix_b, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma):
    _check_x("repmixer_block", x)
    if _check_dw("repmixer_block", "mix", mix_w, mix_b, x) != x.shape[3]:
        raise ValueError(f"fastvlm::repmixer_block: mix_w must be depthwise with Cout = C, got {tuple(mix_w.shape)}")
    _check_ffn("repmixer_block", x, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma)
    return tuple(x.shape)


@_Op
def repmixer_block(x: Tensor, mix_w: Tensor, mix_b: Tensor, ffn_w: Tensor, ffn_b: Tensor, fc1_w: Tensor,
                   fc1_b: Tensor, fc2_w: Tensor, fc2_b: Tensor, gamma: Tensor, backend: str) -> Tensor:
    _check_repmixer(x, mix_w, mix_b, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma)
    _own_layouts_only("repmixer_block", backend, fc1_w, fc2_w)
    return kernel_for("repmixer_block", backend)(x, mix_w, mix_b, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma)


@repmixer_block.register_fake
def _(x, mix_w, mix_b, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma, backend):
    return x.new_empty(_check_repmixer(x, mix_w, mix_b, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma))


def _check_convffn(x, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma):
    _check_x("convffn", x)
    _check_ffn("convffn", x, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma)
    return tuple(x.shape)


@_Op
def convffn(x: Tensor, ffn_w: Tensor, ffn_b: Tensor, fc1_w: Tensor, fc1_b: Tensor, fc2_w: Tensor, fc2_b: Tensor,
            gamma: Tensor, backend: str) -> Tensor:
    _check_convffn(x, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma)
    _own_layouts_only("convffn", backend, fc1_w, fc2_w)
    return kernel_for("convffn", backend)(x, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma)


@convffn.register_fake
def _(x, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma, backend):
    return x.new_empty(_check_convffn(x, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma))


def _check_patch_embed(x, dw_w, dw_b, pw_w, pw_b):
    _check_x("patch_embed", x)
    cout = _check_dw("patch_embed", "dw", dw_w, dw_b, x)
    _check_w("patch_embed", "pw_w", pw_w, (cout, cout), x)
    _check_w("patch_embed", "pw_b", pw_b, (cout,), x)
    k = dw_w.shape[0]
    B, H, W, _ = x.shape
    return (B, _conv_out(H, k, 2, k // 2), _conv_out(W, k, 2, k // 2), cout)


@_Op
def patch_embed(x: Tensor, dw_w: Tensor, dw_b: Tensor, pw_w: Tensor, pw_b: Tensor, backend: str) -> Tensor:
    _check_patch_embed(x, dw_w, dw_b, pw_w, pw_b)
    _own_layouts_only("patch_embed", backend, pw_w)
    return kernel_for("patch_embed", backend)(x, dw_w, dw_b, pw_w, pw_b)


@patch_embed.register_fake
def _(x, dw_w, dw_b, pw_w, pw_b, backend):
    return x.new_empty(_check_patch_embed(x, dw_w, dw_b, pw_w, pw_b))


def _check_dwconv(x, w, b, stride, padding):
    _check_x("dwconv", x)
    cout = _check_dw("dwconv", "", w, b, x)
    if stride < 1 or padding < 0:
        raise ValueError(f"fastvlm::dwconv: need stride >= 1 and padding >= 0, got stride={stride}, padding={padding}")
    B, H, W, _ = x.shape
    k = w.shape[0]
    ho, wo = _conv_out(H, k, stride, padding), _conv_out(W, k, stride, padding)
    if ho < 1 or wo < 1:
        raise ValueError(f"fastvlm::dwconv: input {H}x{W} with padding {padding} is smaller than the {k}x{k} kernel")
    return (B, ho, wo, cout)


@_Op
def dwconv(x: Tensor, w: Tensor, b: Optional[Tensor], stride: int, padding: int, gelu: bool, backend: str) -> Tensor:
    _check_dwconv(x, w, b, stride, padding)
    return kernel_for("dwconv", backend)(x, w, b, stride, padding, gelu)


@dwconv.register_fake
def _(x, w, b, stride, padding, gelu, backend):
    return x.new_empty(_check_dwconv(x, w, b, stride, padding))


def _check_attention(x, ln_w, ln_b, qkv_w, proj_w, proj_b, gamma, head_dim):
    _check_x("attention_mixer", x)
    C = x.shape[3]
    if head_dim < 1 or C % head_dim:
        raise ValueError(f"fastvlm::attention_mixer: channels {C} must be a multiple of head_dim {head_dim}")
    _check_w("attention_mixer", "ln_w", ln_w, (C,), x)
    _check_w("attention_mixer", "ln_b", ln_b, (C,), x)
    _check_w("attention_mixer", "qkv_w", qkv_w, (3 * C, C), x)
    _check_w("attention_mixer", "proj_w", proj_w, (C, C), x)
    _check_w("attention_mixer", "proj_b", proj_b, (C,), x)
    _check_w("attention_mixer", "gamma", gamma, (C,), x)
    return tuple(x.shape)


@_Op
def attention_mixer(x: Tensor, ln_w: Tensor, ln_b: Tensor, qkv_w: Tensor, proj_w: Tensor, proj_b: Tensor,
                    gamma: Tensor, head_dim: int, backend: str) -> Tensor:
    _check_attention(x, ln_w, ln_b, qkv_w, proj_w, proj_b, gamma, head_dim)
    _own_layouts_only("attention_mixer", backend, qkv_w, proj_w)
    return kernel_for("attention_mixer", backend)(x, ln_w, ln_b, qkv_w, proj_w, proj_b, gamma, head_dim)


@attention_mixer.register_fake
def _(x, ln_w, ln_b, qkv_w, proj_w, proj_b, gamma, head_dim, backend):
    return x.new_empty(_check_attention(x, ln_w, ln_b, qkv_w, proj_w, proj_b, gamma, head_dim))


def _check_conv_exp(x, w, b, se_r_w, se_r_b, se_e_w, se_e_b):
    _check_x("conv_exp", x)
    cout = _check_dw("conv_exp", "", w, b, x)
    rd = se_r_w.shape[0] if isinstance(se_r_w, Tensor) and se_r_w.dim() == 2 else -1
    _check_w("conv_exp", "se_r_w", se_r_w, (rd, cout), x)
    _check_w("conv_exp", "se_r_b", se_r_b, (rd,), x)
    _check_w("conv_exp", "se_e_w", se_e_w, (cout, rd), x)
    _check_w("conv_exp", "se_e_b", se_e_b, (cout,), x)
    return (*x.shape[:3], cout)


@_Op
def conv_exp(x: Tensor, w: Tensor, b: Tensor, se_r_w: Tensor, se_r_b: Tensor, se_e_w: Tensor, se_e_b: Tensor,
             backend: str) -> Tensor:
    _check_conv_exp(x, w, b, se_r_w, se_r_b, se_e_w, se_e_b)
    return kernel_for("conv_exp", backend)(x, w, b, se_r_w, se_r_b, se_e_w, se_e_b)


@conv_exp.register_fake
def _(x, w, b, se_r_w, se_r_b, se_e_w, se_e_b, backend):
    return x.new_empty(_check_conv_exp(x, w, b, se_r_w, se_r_b, se_e_w, se_e_b))
