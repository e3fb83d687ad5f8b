"""``fastvlm::attention_mixer``: y = x + gamma·proj(MHSA(LayerNormChannel(x))), the first half of an
attention block (its second half is ``fastvlm::convffn``).

Weights: ln_w, ln_b ``(C,)``; qkv_w ``(3C, C)`` without bias, output features ordered [q | k | v]
with contiguous heads of ``head_dim``; proj_w ``(C, C)`` + proj_b ``(C,)``; gamma ``(C,)``. The
softmax scale is head_dim**-0.5, LayerNormChannel's eps 1e-5. NHWC in, the same shape out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastvlm import fastvithd as fv

from . import define, kernel_for, own_layouts_only
from ._checks import check_w, check_x
from ._eager import compute_dtype
from ._fused import _Fused
from .convffn import FusedConvFFN

LINEAR_WEIGHTS = ("qkv_w", "proj_w")


def _check(x, ln_w, ln_b, qkv_w, proj_w, proj_b, gamma, head_dim):
    check_x("attention_mixer", x)
    C = x.shape[3]
    if head_dim < 1 or C % head_dim:
        raise ValueError(f"fastvlm::attention_mixer: channels {C} must be a multiple of head_dim {head_dim}")
    check_w("attention_mixer", "ln_w", ln_w, (C,), x)
    check_w("attention_mixer", "ln_b", ln_b, (C,), x)
    check_w("attention_mixer", "qkv_w", qkv_w, (3 * C, C), x)
    check_w("attention_mixer", "proj_w", proj_w, (C, C), x)
    check_w("attention_mixer", "proj_b", proj_b, (C,), x)
    check_w("attention_mixer", "gamma", gamma, (C,), x)
    return tuple(x.shape)


@define
def attention_mixer(x: Tensor, ln_w: Tensor, ln_b: Tensor, qkv_w: Tensor, proj_w: Tensor, proj_b: Tensor,
                    gamma: Tensor, head_dim: int, backend: str) -> Tensor:
    _check(x, ln_w, ln_b, qkv_w, proj_w, proj_b, gamma, head_dim)
    own_layouts_only("attention_mixer", backend, qkv_w, proj_w)
    return kernel_for("attention_mixer", backend)(x, ln_w, ln_b, qkv_w, proj_w, proj_b, gamma, head_dim)


@attention_mixer.register_fake
def _(x, ln_w, ln_b, qkv_w, proj_w, proj_b, gamma, head_dim, backend):
    return x.new_empty(_check(x, ln_w, ln_b, qkv_w, proj_w, proj_b, gamma, head_dim))


def reference(x, ln_w, ln_b, qkv_w, proj_w, proj_b, gamma, head_dim: int):
    ct = compute_dtype(x.dtype)
    B, H, W, C = x.shape
    N, heads = H * W, C // head_dim
    t = x.to(ct).reshape(B, N, C)
    u = t.mean(-1, keepdim=True)
    s = (t - u).pow(2).mean(-1, keepdim=True)
    n = (t - u) / torch.sqrt(s + 1e-5) * ln_w.to(ct) + ln_b.to(ct)
    qkv = F.linear(n, qkv_w.to(ct)).reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = ((q * head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    o = (attn @ v).transpose(1, 2).reshape(B, N, C)
    y = t + gamma.to(ct) * F.linear(o, proj_w.to(ct), proj_b.to(ct))
    return y.reshape(B, H, W, C).to(x.dtype).contiguous()


class FusedAttentionBlock(_Fused):
    """AttentionBlock -> ``fastvlm::attention_mixer`` then ``fastvlm::convffn`` (its ``ffn``)."""

    OP = "attention_mixer"
    _REFERENCE_NAMES = {"ln_w": ("norm.weight", False), "ln_b": ("norm.bias", False),
                        "qkv_w": ("token_mixer.qkv.weight", False), "proj_w": ("token_mixer.proj.weight", False),
                        "proj_b": ("token_mixer.proj.bias", False), "gamma": ("layer_scale_1", False)}

    @classmethod
    def reference_state(cls, state):
        ffn = {k[4:]: v for k, v in state.items() if k.startswith("ffn.")}
        return {**super().reference_state(state), **FusedConvFFN.reference_state(ffn)}

    def __init__(self, block: fv.AttentionBlock, backend: str, dtype: torch.dtype):
        super().__init__(backend, dtype)
        self.head_dim = block.token_mixer.head_dim
        self._pack("ln_w", block.norm.weight)
        self._pack("ln_b", block.norm.bias)
        self._pack("qkv_w", block.token_mixer.qkv.weight)
        self._pack("proj_w", block.token_mixer.proj.weight)
        self._pack("proj_b", block.token_mixer.proj.bias)
        self._pack("gamma", block.layer_scale_1.reshape(-1))
        self.ffn = FusedConvFFN(block.convffn, block.layer_scale_2, backend, dtype)

    def forward(self, x):
        x = torch.ops.fastvlm.attention_mixer(x, self.ln_w, self.ln_b, self.qkv_w, self.proj_w, self.proj_b,
                                              self.gamma, self.head_dim, self.backend)
        return self.ffn(x)
