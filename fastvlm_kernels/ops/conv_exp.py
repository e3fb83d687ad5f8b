"""``fastvlm::conv_exp``: GELU(SE(dw3x3, channel multiplier Cout / C)), FastViTHD's last conv; SE =
spatial mean -> 1x1 -> ReLU -> 1x1 -> sigmoid -> per-channel scale.

Weights: w ``(K, K, Cout)`` + b ``(Cout,)`` (padding K // 2), se_r_w ``(rd, Cout)`` + se_r_b ``(rd,)``,
se_e_w ``(Cout, rd)`` + se_e_b ``(Cout,)``. NHWC in, ``(B, H, W, Cout)`` out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastvlm import fastvithd as fv

from . import define, kernel_for
from ._checks import check_dw, check_w, check_x
from ._eager import compute_dtype, dw, nchw, nhwc
from ._fused import _Fused, pack_dw, pack_pw

LINEAR_WEIGHTS = ()  # the SE's two 1x1s act on one vector per image: every backend reads them as they are


def _check(x, w, b, se_r_w, se_r_b, se_e_w, se_e_b):
    check_x("conv_exp", x)
    cout = check_dw("conv_exp", "", w, b, x)
    rd = se_r_w.shape[0] if isinstance(se_r_w, Tensor) and se_r_w.dim() == 2 else -1
    check_w("conv_exp", "se_r_w", se_r_w, (rd, cout), x)
    check_w("conv_exp", "se_r_b", se_r_b, (rd,), x)
    check_w("conv_exp", "se_e_w", se_e_w, (cout, rd), x)
    check_w("conv_exp", "se_e_b", se_e_b, (cout,), x)
    return (*x.shape[:3], cout)


@define
def conv_exp(x: Tensor, w: Tensor, b: Tensor, se_r_w: Tensor, se_r_b: Tensor, se_e_w: Tensor, se_e_b: Tensor,
             backend: str) -> Tensor:
    _check(x, w, b, se_r_w, se_r_b, se_e_w, se_e_b)
    return kernel_for("conv_exp", backend)(x, w, b, se_r_w, se_r_b, se_e_w, se_e_b)


@conv_exp.register_fake
def _(x, w, b, se_r_w, se_r_b, se_e_w, se_e_b, backend):
    return x.new_empty(_check(x, w, b, se_r_w, se_r_b, se_e_w, se_e_b))


def reference(x, w, b, se_r_w, se_r_b, se_e_w, se_e_b):
    ct = compute_dtype(x.dtype)
    k = w.shape[0]
    h = dw(nchw(x, ct), w, b, 1, k // 2)
    s = h.mean(dim=(2, 3))  # (B, Cout)
    s = torch.sigmoid(F.linear(F.relu(F.linear(s, se_r_w.to(ct), se_r_b.to(ct))), se_e_w.to(ct), se_e_b.to(ct)))
    return nhwc(F.gelu(h * s[:, :, None, None]), x.dtype)


class FusedConvExp(_Fused):
    """conv_exp (dw3x3 x2 + SE + GELU) -> ``fastvlm::conv_exp``; returns an NCHW view."""

    OP = "conv_exp"
    _REFERENCE_NAMES = {"w": ("reparam_conv.weight", True), "b": ("reparam_conv.bias", False),
                        "se_r_w": ("se.reduce.weight", False), "se_r_b": ("se.reduce.bias", False),
                        "se_e_w": ("se.expand.weight", False), "se_e_b": ("se.expand.bias", False)}

    def __init__(self, block: fv.MobileOneBlock, backend: str, dtype: torch.dtype):
        super().__init__(backend, dtype)
        c = block.reparam_conv
        self._pack("w", pack_dw(c.weight))
        self._pack("b", c.bias)
        se = block.se
        self._pack("se_r_w", pack_pw(se.reduce.weight))
        self._pack("se_r_b", se.reduce.bias)
        self._pack("se_e_w", pack_pw(se.expand.weight))
        self._pack("se_e_b", se.expand.bias)

    def forward(self, x):
        y = torch.ops.fastvlm.conv_exp(x, self.w, self.b, self.se_r_w, self.se_r_b, self.se_e_w, self.se_e_b,
                                       self.backend)
        return y.permute(0, 3, 1, 2)
