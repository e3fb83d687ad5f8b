"""``fastvlm::stem``: GELU(conv3x3 s2) -> GELU(dw3x3 s2) -> GELU(1x1), FastViTHD's three-block stem.

Weights: w0 ``(C, Cin, 3, 3)`` (the nn.Conv2d layout), w1 ``(3, 3, C)`` (depthwise), w2 ``(C, C)``
(1x1), biases ``(C,)``. NHWC ``(B, H, W, Cin)`` in, ``(B, H/4, W/4, C)`` out (each conv pads by 1).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import define, kernel_for, own_layouts_only
from ._checks import check_w, check_x, conv_out
from ._eager import compute_dtype, dw, nchw, nhwc, pw
from ._fused import _Fused, pack_dw, pack_pw

LINEAR_WEIGHTS = ("w2",)


def _check(x, w0, b0, w1, b1, w2, b2):
    C = w0.shape[0] if isinstance(w0, Tensor) and w0.dim() == 4 else -1
    check_x("stem", x, w0.shape[1] if isinstance(w0, Tensor) and w0.dim() == 4 else None)
    check_w("stem", "w0", w0, (C, x.shape[3], 3, 3), x)
    check_w("stem", "b0", b0, (C,), x)
    check_w("stem", "w1", w1, (3, 3, C), x)
    check_w("stem", "b1", b1, (C,), x)
    check_w("stem", "w2", w2, (C, C), x)
    check_w("stem", "b2", b2, (C,), x)
    B, H, W, _ = x.shape
    return (B, conv_out(conv_out(H, 3, 2, 1), 3, 2, 1), conv_out(conv_out(W, 3, 2, 1), 3, 2, 1), C)


@define
def stem(x: Tensor, w0: Tensor, b0: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, backend: str) -> Tensor:
    _check(x, w0, b0, w1, b1, w2, b2)
    own_layouts_only("stem", backend, w2)
    return kernel_for("stem", backend)(x, w0, b0, w1, b1, w2, b2)


@stem.register_fake
def _(x, w0, b0, w1, b1, w2, b2, backend):
    return x.new_empty(_check(x, w0, b0, w1, b1, w2, b2))


def reference(x, w0, b0, w1, b1, w2, b2):
    ct = compute_dtype(x.dtype)
    h = F.gelu(F.conv2d(nchw(x, ct), w0.to(ct), b0.to(ct), 2, 1))
    h = F.gelu(dw(h, w1, b1, 2, 1))
    h = F.gelu(pw(h, w2, b2))
    return nhwc(h, x.dtype)


class FusedStem(_Fused):
    """``fastvlm`` stem (3 MobileOneBlocks) -> ``fastvlm::stem``; NCHW pixels in, NHWC out."""

    OP = "stem"
    _REFERENCE_NAMES = {"w0": ("0.reparam_conv.weight", False), "b0": ("0.reparam_conv.bias", False),
                        "w1": ("1.reparam_conv.weight", True), "b1": ("1.reparam_conv.bias", False),
                        "w2": ("2.reparam_conv.weight", False), "b2": ("2.reparam_conv.bias", False)}

    def __init__(self, stem: nn.Sequential, backend: str, dtype: torch.dtype):
        super().__init__(backend, dtype)
        c0, c1, c2 = (m.reparam_conv for m in stem)
        self._pack("w0", c0.weight)
        self._pack("b0", c0.bias)
        self._pack("w1", pack_dw(c1.weight))
        self._pack("b1", c1.bias)
        self._pack("w2", pack_pw(c2.weight))
        self._pack("b2", c2.bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("fastvlm_kernels: the accelerated encoder is inference-only; call model.eval()")
        if pixels.requires_grad:
            raise RuntimeError("fastvlm_kernels: the fused ops are inference-only and have no backward; the input "
                               "requires grad (use torch.inference_mode() or detach it)")
        x = pixels.permute(0, 2, 3, 1)
        return torch.ops.fastvlm.stem(x, self.w0, self.b0, self.w1, self.b1, self.w2, self.b2, self.backend)
