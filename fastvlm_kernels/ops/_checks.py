"""Input validation shared by the op contracts (``ops/<op>.py``). It runs on real and fake tensors
alike, so ``torch.compile`` traces see the same errors as eager calls."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from . import _WEIGHT_FORMATS, _format_owner


def conv_out(n: int, k: int, stride: int, pad: int) -> int:
    return (n + 2 * pad - k) // stride + 1


def check_x(op: str, x, channels: Optional[int] = None) -> None:
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


def check_w(op: str, name: str, t, shape: Sequence[int], x: Tensor) -> None:
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


def check_dw(op: str, prefix: str, w, b, x: Tensor) -> int:
    """Checks a packed (K, K, Cout) depthwise weight against x; returns Cout."""
    wn, bn = (f"{prefix}_w", f"{prefix}_b") if prefix else ("w", "b")
    if not isinstance(w, Tensor) or w.dim() != 3 or w.shape[0] != w.shape[1]:
        raise ValueError(f"fastvlm::{op}: {wn} must be a packed (K, K, Cout) depthwise weight, got "
                         f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
    cout = w.shape[2]
    if cout % x.shape[3]:
        raise ValueError(f"fastvlm::{op}: {wn} has Cout={cout}, not a multiple of x's {x.shape[3]} channels")
    check_w(op, wn, w, tuple(w.shape), x)
    if b is not None:
        check_w(op, bn, b, (cout,), x)
    return cout


def check_ffn(op, x, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma) -> None:
    """The ConvFFN weights (dw7x7 folded with its BatchNorm, fc1, fc2, layer scale) against x."""
    C = x.shape[3]
    if check_dw(op, "ffn", ffn_w, ffn_b, x) != C:
        raise ValueError(f"fastvlm::{op}: ffn_w must be depthwise with Cout = C = {C}, got {tuple(ffn_w.shape)}")
    hidden = fc1_b.shape[0] if isinstance(fc1_b, Tensor) and fc1_b.dim() == 1 else -1
    check_w(op, "fc1_w", fc1_w, (hidden, C), x)
    check_w(op, "fc1_b", fc1_b, (hidden,), x)
    check_w(op, "fc2_w", fc2_w, (C, hidden), x)
    check_w(op, "fc2_b", fc2_b, (C,), x)
    check_w(op, "gamma", gamma, (C,), x)
