"""Fused ``nn.Module``s: each holds its weights packed once (``ops.py`` layouts, one dtype) and calls
one fused op per forward. They take and return NHWC activations, except :class:`FusedStem` (NCHW
pixels in, converted once) and :class:`FusedConvExp` (returns an NCHW *view* of its NHWC output, so
the encoder's ``forward_features`` keeps its NCHW contract and ``forward``'s tokens need no copy).

Each is built from the corresponding inference-form ``fastvlm`` module. The packed weights are
parameters that never require grad (``requires_grad=False``), so code that asks a model for its
device or dtype through ``parameters()`` (transformers' ``PreTrainedModel.device`` / ``.dtype``)
sees them. :meth:`_Fused.reference_state` gives them back in the names and layout of the modules
they replaced (``accelerate()`` uses it for the original-layout ``state_dict()`` of timm's FastVit).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

from fastvlm import fastvithd as fv
from fastvlm.reparam import fold_convffn_bn

from . import ops  # noqa: F401  (registers torch.ops.fastvlm.*)

__all__ = ["FrozenDeviceDtypeError", "FusedStem", "FusedRepMixerBlock", "FusedConvFFN", "FusedAttentionBlock",
           "FusedPatchEmbed", "FusedDWConv", "FusedConvExp", "FUSED_TYPES"]


def pack_dw(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, 1, K, K) depthwise / grouped conv weight (one input channel per group, Cout = M·Cin)
    -> (K, K, Cout)."""
    if weight.dim() != 4 or weight.shape[1] != 1:
        raise ValueError(f"pack_dw: expected a depthwise (Cout, 1, K, K) weight, got {tuple(weight.shape)}")
    return weight[:, 0].permute(1, 2, 0)


def unpack_dw(w: torch.Tensor) -> torch.Tensor:
    """:func:`pack_dw`'s inverse: (K, K, Cout) -> (Cout, 1, K, K)."""
    return w.permute(2, 0, 1).unsqueeze(1).contiguous()


def pack_pw(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 1, 1) pointwise conv weight or (Cout, Cin) linear weight -> (Cout, Cin)."""
    return weight.reshape(weight.shape[0], -1)


class FrozenDeviceDtypeError(TypeError):
    """``.to()`` / ``.half()`` / ``.cuda()`` ... on an accelerated module: its weights are packed for one
    backend, device and dtype at ``accelerate()`` time and cannot be converted in place."""


class _Fused(nn.Module):
    """Packed weights (parameters that never require grad: inference only) and the backend that runs the op."""

    def __init__(self, backend: str, dtype: torch.dtype):
        super().__init__()
        self.backend = backend
        self.dtype = dtype
        self.train(False)  # inference-only

    #: packed name -> (name in the replaced module, whether it is a depthwise weight in pack_dw's layout)
    _REFERENCE_NAMES: Dict[str, tuple] = {}

    def _pack(self, name: str, t: torch.Tensor) -> None:
        self.set_weight(name, t.detach().to(self.dtype).contiguous())

    def set_weight(self, name: str, t: torch.Tensor) -> None:
        """Hold ``t`` as the weight ``name`` (a parameter that does not require grad)."""
        self._parameters[name] = nn.Parameter(t, requires_grad=False)

    @classmethod
    def reference_state(cls, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """This module's ``state_dict()`` (keys relative to it, 1x1 weights in the nn.Linear layout)
        -> the state of the inference-form ``fastvlm`` module it replaced, in that module's names.
        1x1 weights come out 2-D and layer scales 1-D (the caller reshapes them to the model's
        shapes); depthwise weights in the conv layout (Cout, 1, K, K)."""
        out = {}
        for name, (ref, dw) in cls._REFERENCE_NAMES.items():
            out[ref] = unpack_dw(state[name]) if dw else state[name]
        if "ffn_w" in state:  # a ConvFFN's folded 7x7 + BatchNorm
            out.update(_ffn_reference(state))
        return out

    def _apply(self, fn, recurse=True):
        # The weights are packed for one backend on one device in one dtype: refuse conversions that
        # would change either, before anything is converted, and let the others (a no-op .to(), a
        # .share_memory()) through. What fn would do is read from a 0-element probe of each tensor.
        for name, t in self._parameters.items():
            if t is None:
                continue
            probe = fn(torch.empty(0, dtype=t.dtype, device=t.device))
            if probe.dtype != t.dtype or probe.device != t.device:
                raise FrozenDeviceDtypeError(
                    f"fastvlm_kernels: the accelerated modules hold weights packed for the {self.backend!r} backend "
                    f"in {t.dtype} on {t.device}; they cannot be converted to {probe.dtype} on {probe.device} in "
                    "place. Move or cast the model before fastvlm_kernels.accelerate(), or accelerate a fresh copy "
                    "(accelerate(model, dtype=...) picks the dtype).")
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, dtype={self.dtype}"


class FusedStem(_Fused):
    """``fastvlm`` stem (3 MobileOneBlocks) -> ``fastvlm::stem``; NCHW pixels in, NHWC out."""

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


_FFN_NAMES = {"fc1_w": ("convffn.fc1.weight", False), "fc1_b": ("convffn.fc1.bias", False),
              "fc2_w": ("convffn.fc2.weight", False), "fc2_b": ("convffn.fc2.bias", False)}


def _ffn_reference(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The ConvFFN's dw7x7 + BatchNorm, whose fold the fused modules hold: the folded weight, and a
    BatchNorm that is the identity up to its bias (weight 1, mean 0, variance 1 - eps)."""
    b = state["ffn_b"]
    eps = 1e-5  # nn.BatchNorm2d's default, which both FastViTs' ConvFFN BatchNorms use
    return {"convffn.conv.conv.weight": unpack_dw(state["ffn_w"]), "convffn.conv.bn.weight": torch.ones_like(b),
            "convffn.conv.bn.bias": b, "convffn.conv.bn.running_mean": torch.zeros_like(b),
            "convffn.conv.bn.running_var": torch.full_like(b, 1.0 - eps),
            "convffn.conv.bn.num_batches_tracked": torch.tensor(0, dtype=torch.long)}


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
    _REFERENCE_NAMES = {"mix_w": ("token_mixer.reparam_conv.weight", True),
                        "mix_b": ("token_mixer.reparam_conv.bias", False), **_FFN_NAMES,
                        "gamma": ("layer_scale", False)}

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
    """A ConvFFN and the layer scale after it (an attention block's second half). Its reference
    state is in the names the block uses (``convffn.*``, ``layer_scale_2``)."""

    _REFERENCE_NAMES = {**_FFN_NAMES, "gamma": ("layer_scale_2", False)}

    def __init__(self, ffn: fv.ConvFFN, gamma: torch.Tensor, backend: str, dtype: torch.dtype):
        super().__init__(backend, dtype)
        _pack_ffn(self, ffn, gamma)

    def forward(self, x):
        return torch.ops.fastvlm.convffn(x, self.ffn_w, self.ffn_b, self.fc1_w, self.fc1_b, self.fc2_w,
                                         self.fc2_b, self.gamma, self.backend)


class FusedAttentionBlock(_Fused):
    """AttentionBlock -> ``fastvlm::attention_mixer`` then ``fastvlm::convffn``."""

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


class FusedPatchEmbed(_Fused):
    _REFERENCE_NAMES = {"dw_w": ("proj.0.lkb_reparam.weight", True), "dw_b": ("proj.0.lkb_reparam.bias", False),
                        "pw_w": ("proj.1.reparam_conv.weight", False), "pw_b": ("proj.1.reparam_conv.bias", False)}

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


class FusedConvExp(_Fused):
    """conv_exp (dw3x3 x2 + SE + GELU) -> ``fastvlm::conv_exp``; returns an NCHW view."""

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


FUSED_TYPES = (FusedStem, FusedRepMixerBlock, FusedConvFFN, FusedAttentionBlock, FusedPatchEmbed, FusedDWConv,
               FusedConvExp)
