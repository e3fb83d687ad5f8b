"""``fastvlm::convffn``: y = x + gamma·fc2(GELU(fc1(dw7x7_bnfolded(x)))), the ConvFFN and its layer
scale (the second half of an attention block; the RepMixer block's ConvFFN is inside
``fastvlm::repmixer_block``).

Weights: ffn_w ``(K, K, C)`` (the 7x7 depthwise with its BatchNorm folded in) and ffn_b ``(C,)``,
fc1 ``(4C, C)`` + ``(4C,)``, fc2 ``(C, 4C)`` + ``(C,)``, gamma ``(C,)``. NHWC in, the same shape out.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

from fastvlm import fastvithd as fv
from fastvlm.reparam import fold_convffn_bn

from . import define, kernel_for, own_layouts_only
from ._checks import check_ffn, check_x
from ._eager import compute_dtype, ffn, nchw, nhwc
from ._fused import _Fused, pack_dw, pack_pw, unpack_dw

LINEAR_WEIGHTS = ("fc1_w", "fc2_w")


def _check(x, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma):
    check_x("convffn", x)
    check_ffn("convffn", x, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma)
    return tuple(x.shape)


@define
def convffn(x: Tensor, ffn_w: Tensor, ffn_b: Tensor, fc1_w: Tensor, fc1_b: Tensor, fc2_w: Tensor, fc2_b: Tensor,
            gamma: Tensor, backend: str) -> Tensor:
    _check(x, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma)
    own_layouts_only("convffn", backend, fc1_w, fc2_w)
    return kernel_for("convffn", backend)(x, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma)


@convffn.register_fake
def _(x, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma, backend):
    return x.new_empty(_check(x, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma))


def reference(x, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma):
    ct = compute_dtype(x.dtype)
    h = nchw(x, ct)
    y = h + gamma.to(ct)[None, :, None, None] * ffn(h, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b)
    return nhwc(y, x.dtype)


# ---- the fused modules' ConvFFN weights (this module's and repmixer_block's) ----------------------
FFN_NAMES = {"fc1_w": ("convffn.fc1.weight", False), "fc1_b": ("convffn.fc1.bias", False),
             "fc2_w": ("convffn.fc2.weight", False), "fc2_b": ("convffn.fc2.bias", False)}


def ffn_reference_state(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The ConvFFN's dw7x7 + BatchNorm, whose fold the fused modules hold: the folded weight, and a
    BatchNorm that is the identity up to its bias (weight 1, mean 0, variance 1 - eps)."""
    b = state["ffn_b"]
    eps = 1e-5  # nn.BatchNorm2d's default, which both FastViTs' ConvFFN BatchNorms use
    return {"convffn.conv.conv.weight": unpack_dw(state["ffn_w"]), "convffn.conv.bn.weight": torch.ones_like(b),
            "convffn.conv.bn.bias": b, "convffn.conv.bn.running_mean": torch.zeros_like(b),
            "convffn.conv.bn.running_var": torch.full_like(b, 1.0 - eps),
            "convffn.conv.bn.num_batches_tracked": torch.tensor(0, dtype=torch.long)}


def pack_ffn(mod: _Fused, ffn_mod: fv.ConvFFN, gamma: torch.Tensor) -> None:
    w, b = fold_convffn_bn(ffn_mod)
    mod._pack("ffn_w", pack_dw(w))
    mod._pack("ffn_b", b)
    mod._pack("fc1_w", pack_pw(ffn_mod.fc1.weight))
    mod._pack("fc1_b", ffn_mod.fc1.bias)
    mod._pack("fc2_w", pack_pw(ffn_mod.fc2.weight))
    mod._pack("fc2_b", ffn_mod.fc2.bias)
    mod._pack("gamma", gamma.reshape(-1))


class FusedConvFFN(_Fused):
    """A ConvFFN and the layer scale after it (an attention block's second half). Its reference
    state is in the names the block uses (``convffn.*``, ``layer_scale_2``)."""

    OP = "convffn"
    _REFERENCE_NAMES = {**FFN_NAMES, "gamma": ("layer_scale_2", False)}

    @classmethod
    def reference_state(cls, state):
        return {**super().reference_state(state), **ffn_reference_state(state)}

    def __init__(self, ffn_mod: fv.ConvFFN, gamma: torch.Tensor, backend: str, dtype: torch.dtype):
        super().__init__(backend, dtype)
        pack_ffn(self, ffn_mod, gamma)

    def forward(self, x):
        return torch.ops.fastvlm.convffn(x, self.ffn_w, self.ffn_b, self.fc1_w, self.fc1_b, self.fc2_w,
                                         self.fc2_b, self.gamma, self.backend)
