"""``fastvlm::repmixer_block``: m = dw3x3(x) (the RepMixer, its residual folded in);
y = m + gamma·fc2(GELU(fc1(dw7x7_bnfolded(m)))), a whole RepMixer block.

Weights: mix_w ``(K, K, C)`` + mix_b ``(C,)``, then the ConvFFN's (``ops/convffn.py``). NHWC in, the
same shape out.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastvlm import fastvithd as fv

from . import define, kernel_for, own_layouts_only
from ._checks import check_dw, check_ffn, check_x
from ._eager import compute_dtype, dw, ffn, nchw, nhwc
from ._fused import _Fused, pack_dw
from .convffn import FFN_NAMES, ffn_reference_state, pack_ffn

LINEAR_WEIGHTS = ("fc1_w", "fc2_w")


def _check(x, mix_w, mix_b, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma):
    check_x("repmixer_block", x)
    if check_dw("repmixer_block", "mix", mix_w, mix_b, x) != x.shape[3]:
        raise ValueError(f"fastvlm::repmixer_block: mix_w must be depthwise with Cout = C, got {tuple(mix_w.shape)}")
    check_ffn("repmixer_block", x, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma)
    return tuple(x.shape)


@define
def repmixer_block(x: Tensor, mix_w: Tensor, mix_b: Tensor, ffn_w: Tensor, ffn_b: Tensor, fc1_w: Tensor,
                   fc1_b: Tensor, fc2_w: Tensor, fc2_b: Tensor, gamma: Tensor, backend: str) -> Tensor:
    _check(x, mix_w, mix_b, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma)
    own_layouts_only("repmixer_block", backend, fc1_w, fc2_w)
    return kernel_for("repmixer_block", backend)(x, mix_w, mix_b, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma)


@repmixer_block.register_fake
def _(x, mix_w, mix_b, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma, backend):
    return x.new_empty(_check(x, mix_w, mix_b, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma))


def reference(x, mix_w, mix_b, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma):
    ct = compute_dtype(x.dtype)
    k = mix_w.shape[0]
    m = dw(nchw(x, ct), mix_w, mix_b, 1, k // 2)
    y = m + gamma.to(ct)[None, :, None, None] * ffn(m, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b)
    return nhwc(y, x.dtype)


class FusedRepMixerBlock(_Fused):
    OP = "repmixer_block"
    _REFERENCE_NAMES = {"mix_w": ("token_mixer.reparam_conv.weight", True),
                        "mix_b": ("token_mixer.reparam_conv.bias", False), **FFN_NAMES,
                        "gamma": ("layer_scale", False)}

    @classmethod
    def reference_state(cls, state):
        return {**super().reference_state(state), **ffn_reference_state(state)}

    def __init__(self, block: fv.RepMixerBlock, backend: str, dtype: torch.dtype):
        super().__init__(backend, dtype)
        mix = block.token_mixer.reparam_conv
        self._pack("mix_w", pack_dw(mix.weight))
        self._pack("mix_b", mix.bias)
        pack_ffn(self, block.convffn, block.layer_scale)

    def forward(self, x):
        return torch.ops.fastvlm.repmixer_block(x, self.mix_w, self.mix_b, self.ffn_w, self.ffn_b, self.fc1_w,
                                                self.fc1_b, self.fc2_w, self.fc2_b, self.gamma, self.backend)
