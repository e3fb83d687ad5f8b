"""Fused ``nn.Module``s: each holds its weights packed once (``ops.py`` layouts, one dtype) and calls
one fused op per forward. They take and return NHWC activations, except :class:`FusedStem` (NCHW
pixels in, converted once) and :class:`FusedConvExp` (returns an NCHW *view* of its NHWC output, so
the encoder's ``forward_features`` keeps its NCHW contract and ``forward``'s tokens need no copy).

Each is built from the corresponding inference-form ``fastvlm`` module (``from_module``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fastvlm import fastvithd as fv
from fastvlm.reparam import fold_convffn_bn

from . import ops  # noqa: F401  (registers torch.ops.fastvlm.*)

__all__ = ["FusedStem", "FusedRepMixerBlock", "FusedConvFFN", "FusedAttentionBlock", "FusedPatchEmbed",
           "FusedDWConv", "FusedConvExp", "FUSED_TYPES"]


def pack_dw(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, 1, K, K) depthwise / grouped conv weight (one input channel per group, Cout = M·Cin)
    -> (K, K, Cout)."""
    if weight.dim() != 4 or weight.shape[1] != 1:
        raise ValueError(f"pack_dw: expected a depthwise (Cout, 1, K, K) weight, got {tuple(weight.shape)}")
    return weight[:, 0].permute(1, 2, 0)


def pack_pw(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 1, 1) pointwise conv weight or (Cout, Cin) linear weight -> (Cout, Cin)."""
    return weight.reshape(weight.shape[0], -1)


class _Fused(nn.Module):
    """Packed buffers (not parameters: inference only) and the backend that runs the op."""

    def __init__(self, backend: str, dtype: torch.dtype):
        super().__init__()
        self.backend = backend
        self.dtype = dtype
        self.train(False)  # inference-only

    def _pack(self, name: str, t: torch.Tensor) -> None:
        self.register_buffer(name, t.detach().to(self.dtype).contiguous(), persistent=True)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, dtype={self.dtype}"


class FusedStem(_Fused):
    """``fastvlm`` stem (3 MobileOneBlocks) -> ``fastvlm::stem``; NCHW pixels in, NHWC out."""

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


def _pack_ffn(mod: _Fused, ffn: fv.ConvFFN, gamma: torch.Tensor) -> None:
    w, b = fold_convffn_bn(ffn)
    mod._pack("ffn_w", pack_dw(w))
    mod._pack("ffn_b", b)
    mod._pack("fc1_w", pack_pw(ffn.fc1.weight))
    mod._pack("fc1_b", ffn.fc1.bias)
    mod._pack("fc2_w", pack_pw(ffn.fc2.weight))
    mod._pack("fc2_b", ffn.fc2.bias)
    mod._pack("gamma", gamma.reshape(-1))


class FusedRepMixerBlock(_Fused):
    def __init__(self, block: fv.RepMixerBlock, backend: str, dtype: torch.dtype):
        super().__init__(backend, dtype)
        mix = block.token_mixer.reparam_conv
        self._pack("mix_w", pack_dw(mix.weight))
        self._pack("mix_b", mix.bias)
        _pack_ffn(self, block.convffn, block.layer_scale)

    def forward(self, x):
        return torch.ops.fastvlm.repmixer_block(x, self.mix_w, self.mix_b, self.ffn_w, self.ffn_b, self.fc1_w,
                                                self.fc1_b, self.fc2_w, self.fc2_b, self.gamma, self.backend)


class FusedConvFFN(_Fused):
    def __init__(self, ffn: fv.ConvFFN, gamma: torch.Tensor, backend: str, dtype: torch.dtype):
        super().__init__(backend, dtype)
        _pack_ffn(self, ffn, gamma)

    def forward(self, x):
        return torch.ops.fastvlm.convffn(x, self.ffn_w, self.ffn_b, self.fc1_w, self.fc1_b, self.fc2_w,
                                         self.fc2_b, self.gamma, self.backend)


class FusedAttentionBlock(_Fused):
    """AttentionBlock -> ``fastvlm::attention_mixer`` then ``fastvlm::convffn``."""

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


class FusedPatchEmbed(_Fused):
    def __init__(self, pe: fv.PatchEmbed, backend: str, dtype: torch.dtype):
        super().__init__(backend, dtype)
        lk, pw = pe.proj[0].lkb_reparam, pe.proj[1].reparam_conv
        if lk.stride != (2, 2) or lk.padding != (lk.kernel_size[0] // 2,) * 2:
            raise ValueError(f"FusedPatchEmbed: expected a stride-2 'same'-padded conv, got {lk}")
        self._pack("dw_w", pack_dw(lk.weight))  # groups = Cin: one input channel per group
        self._pack("dw_b", lk.bias)
        self._pack("pw_w", pack_pw(pw.weight))
        self._pack("pw_b", pw.bias)

    def forward(self, x):
        return torch.ops.fastvlm.patch_embed(x, self.dw_w, self.dw_b, self.pw_w, self.pw_b, self.backend)


class FusedDWConv(_Fused):
    """A depthwise conv (RepCPE's 7x7 with its residual folded in) -> ``fastvlm::dwconv``."""

    def __init__(self, conv: nn.Conv2d, backend: str, dtype: torch.dtype, gelu: bool = False):
        super().__init__(backend, dtype)
        if conv.stride[0] != conv.stride[1] or conv.padding[0] != conv.padding[1] or conv.groups != conv.in_channels:
            raise ValueError(f"FusedDWConv: expected a square-strided depthwise conv, got {conv}")
        self.stride, self.padding, self.gelu = conv.stride[0], conv.padding[0], gelu
        self._pack("w", pack_dw(conv.weight))
        self._pack("b", conv.bias)

    def forward(self, x):
        return torch.ops.fastvlm.dwconv(x, self.w, self.b, self.stride, self.padding, self.gelu, self.backend)


class FusedConvExp(_Fused):
    """conv_exp (dw3x3 x2 + SE + GELU) -> ``fastvlm::conv_exp``; returns an NCHW view."""

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


FUSED_TYPES = (FusedStem, FusedRepMixerBlock, FusedConvFFN, FusedAttentionBlock, FusedPatchEmbed, FusedDWConv,
               FusedConvExp)
