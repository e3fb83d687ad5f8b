"""``fastvlm::dwconv``: a depthwise k x k conv (channel multiplier Cout / C), bias, optional GELU;
in FastViTHD, the RepCPE positional encoding (7x7, its residual folded in).

Weights: w ``(K, K, Cout)``, b ``(Cout,)`` or None. NHWC in, ``(B, Ho, Wo, Cout)`` out.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import define, kernel_for
from ._checks import check_dw, check_x, conv_out
from ._eager import compute_dtype, dw, nchw, nhwc
from ._fused import _Fused, pack_dw

LINEAR_WEIGHTS = ()


def _check(x, w, b, stride, padding):
    check_x("dwconv", x)
    cout = check_dw("dwconv", "", w, b, x)
    if stride < 1 or padding < 0:
        raise ValueError(f"fastvlm::dwconv: need stride >= 1 and padding >= 0, got stride={stride}, padding={padding}")
    B, H, W, _ = x.shape
    k = w.shape[0]
    ho, wo = conv_out(H, k, stride, padding), conv_out(W, k, stride, padding)
    if ho < 1 or wo < 1:
        raise ValueError(f"fastvlm::dwconv: input {H}x{W} with padding {padding} is smaller than the {k}x{k} kernel")
    return (B, ho, wo, cout)


@define
def dwconv(x: Tensor, w: Tensor, b: Optional[Tensor], stride: int, padding: int, gelu: bool, backend: str) -> Tensor:
    _check(x, w, b, stride, padding)
    return kernel_for("dwconv", backend)(x, w, b, stride, padding, gelu)


@dwconv.register_fake
def _(x, w, b, stride, padding, gelu, backend):
    return x.new_empty(_check(x, w, b, stride, padding))


def reference(x, w, b, stride: int, padding: int, gelu: bool):
    ct = compute_dtype(x.dtype)
    h = dw(nchw(x, ct), w, b, stride, padding)
    return nhwc(F.gelu(h) if gelu else h, x.dtype)


class FusedDWConv(_Fused):
    """A depthwise conv (RepCPE's 7x7 with its residual folded in) -> ``fastvlm::dwconv``."""

    OP = "dwconv"
    _REFERENCE_NAMES = {"w": ("reparam_conv.weight", True), "b": ("reparam_conv.bias", False)}

    def __init__(self, conv: nn.Conv2d, backend: str, dtype: torch.dtype, gelu: bool = False):
        super().__init__(backend, dtype)
        if conv.stride[0] != conv.stride[1] or conv.padding[0] != conv.padding[1] or conv.groups != conv.in_channels:
            raise ValueError(f"FusedDWConv: expected a square-strided depthwise conv, got {conv}")
        self.stride, self.padding, self.gelu = conv.stride[0], conv.padding[0], gelu
        self._pack("w", pack_dw(conv.weight))
        self._pack("b", conv.bias)

    def forward(self, x):
        return torch.ops.fastvlm.dwconv(x, self.w, self.b, self.stride, self.padding, self.gelu, self.backend)
