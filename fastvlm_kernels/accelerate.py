"""``accelerate(model)``: swap fused modules into a FastViTHD (or anything holding one), in place.

Steps per encoder: check eval mode -> reparameterize if needed -> fold the ConvFFN BatchNorms
into their 7x7 depthwise weights -> pack every weight once for the chosen backend and dtype ->
replace the stem, blocks, PatchEmbeds, RepCPEs and conv_exp by fused modules. The accelerated
encoder keeps the ``fastvlm.FastViTHD`` API (``forward_features`` NCHW, ``forward`` tokens).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from fastvlm.fastvithd import AttentionBlock, FastViTHD, PatchEmbed, RepCPE, RepMixerBlock

from . import backends
from .modules import (FusedAttentionBlock, FusedConvExp, FusedDWConv, FusedPatchEmbed, FusedRepMixerBlock,
                      FusedStem, _Fused)

__all__ = ["accelerate", "is_accelerated"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def is_accelerated(model: nn.Module) -> bool:
    return any(isinstance(m, _Fused) for m in model.modules())


def _is_timm_fastvit(m: nn.Module) -> bool:
    """timm's FastVit (fastvit_mci3 is FastViTHD), by structure: stem, stages, final_conv."""
    names = {n for n, _ in m.named_children()}
    return not isinstance(m, FastViTHD) and {"stem", "stages", "final_conv"} <= names


def _encoders(model: nn.Module) -> Tuple[List[FastViTHD], List[nn.Module]]:
    """This package's FastViTHDs and timm FastVits (also inside transformers' FastVLM) in ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate: expected an nn.Module, got {type(model).__name__}")
    ours = [m for m in model.modules() if isinstance(m, FastViTHD)]
    foreign = [m for m in model.modules() if _is_timm_fastvit(m)]
    if not ours and not foreign:
        raise TypeError(f"accelerate: no FastViTHD (fastvlm.FastViTHD, or timm's fastvit_mci3 / transformers' "
                        f"FastVLM vision tower) found in {type(model).__name__}")
    return ours, foreign


def _model_device_dtype(enc: FastViTHD) -> Tuple[torch.device, torch.dtype]:
    t = next(t for t in list(enc.parameters()) + list(enc.buffers()) if t.is_floating_point())
    return t.device, t.dtype


def accelerate(model: nn.Module, backend: str = "auto", dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Swap fused kernels into every FastViTHD inside ``model``, in place; returns ``model``.

    ``backend``: 'auto' (CUDA -> 'triton', CPU -> 'cpu', falling back to 'reference' with one warning
    saying why), 'reference', 'cpu' or 'triton'. ``dtype``: the compute/storage dtype of the packed
    weights and activations (default: the model's dtype). Calling it again switches the backend of
    an accelerated model; changing its dtype needs a fresh model. In a ``fastvlm.FastVLM`` the
    projector is cast to ``dtype`` too; the LLM is left to transformers.
    """
    if dtype is not None and dtype not in _DTYPES:
        raise TypeError(f"accelerate: dtype must be one of {_DTYPES} or None, got {dtype}")
    ours, foreign = _encoders(model)
    for tm in foreign:
        _accelerate_timm(tm, backend, dtype)
    for enc in ours:
        if enc.training:
            raise RuntimeError("accelerate: the model is in training mode; the fused kernels are inference-only. "
                               "Call model.eval() first.")
        device, model_dtype = _model_device_dtype(enc)
        want_dtype = dtype or model_dtype
        name = backends.resolve_backend(backend, device, want_dtype)
        if is_accelerated(enc):
            done = getattr(enc, "accelerated_dtype", model_dtype)
            if done != want_dtype:
                raise ValueError(f"accelerate: this encoder is already accelerated in {done}; build or load a fresh "
                                 f"model to accelerate it in {want_dtype}")
            for m in enc.modules():
                if isinstance(m, _Fused):
                    m.backend = name
            _prepack(enc, name)
            enc.accelerated_backend = name
            continue
        with torch.no_grad():
            enc.reparameterize()
            _swap(enc, name, want_dtype)
        _prepack(enc, name)
        enc.accelerated_backend = name
        enc.accelerated_dtype = want_dtype
    if dtype is not None:
        # The projector after the tower (fastvlm.FastVLM) follows the tower's dtype, so its features
        # are not cast back up. It stays torch's Linear -> GELU -> Linear: at 256 tokens it is ~1.8 GFLOP,
        # under 1% of the encoder (see the TTFT breakdown), not worth a kernel of its own.
        from fastvlm.projector import Projector
        for m in model.modules():
            if isinstance(m, Projector):
                m.to(dtype)
    return model


def _prepack(enc: nn.Module, backend: str) -> None:
    """Weights in the layout the backend's kernels read, once: the cpu backend's 1x1 weights packed in
    place of their nn.Linear-layout buffers; for any other backend, that layout (back) again."""
    with torch.no_grad():
        if backend == "cpu":
            from . import cpu
            cpu.prepack(enc)
        elif any("_fastvlm_linear_shapes" in m.__dict__ for m in enc.modules()):
            from . import cpu
            cpu.unprepack(enc)


def _swap(enc: FastViTHD, backend: str, dtype: torch.dtype) -> None:
    enc.patch_embed = FusedStem(enc.patch_embed, backend, dtype)
    for i, entry in enumerate(enc.network):
        if isinstance(entry, PatchEmbed):
            enc.network[i] = FusedPatchEmbed(entry, backend, dtype)
        elif isinstance(entry, RepCPE):
            enc.network[i] = FusedDWConv(entry.reparam_conv, backend, dtype)
        elif isinstance(entry, nn.Sequential):
            for j, blk in enumerate(entry):
                if isinstance(blk, RepMixerBlock):
                    entry[j] = FusedRepMixerBlock(blk, backend, dtype)
                elif isinstance(blk, AttentionBlock):
                    entry[j] = FusedAttentionBlock(blk, backend, dtype)
                else:
                    raise TypeError(f"accelerate: unexpected block {type(blk).__name__} in network[{i}]")
        else:
            raise TypeError(f"accelerate: unexpected module {type(entry).__name__} at network[{i}]")
    enc.conv_exp = FusedConvExp(enc.conv_exp, backend, dtype)


def _accelerate_timm(tm: nn.Module, backend: str, dtype: Optional[torch.dtype]) -> None:
    """Accelerate a timm FastVit in place: its weights go through this package's loader (timm key
    layout), and its ``stem`` / ``stages`` / ``final_conv`` become the fused modules. timm's own
    ``forward_features`` (stem -> each stage -> final_conv) then runs them unchanged: the fused
    modules pass NHWC between each other and the last one returns an NCHW view."""
    if tm.training:
        raise RuntimeError("accelerate: the model is in training mode; the fused kernels are inference-only. "
                           "Call model.eval() first.")
    if isinstance(tm.stem, FusedStem):  # already accelerated: switch the backend only
        enc_dtype = tm.stem.dtype
        name = backends.resolve_backend(backend, tm.stem.w0.device, dtype or enc_dtype)
        if dtype is not None and dtype != enc_dtype:
            raise ValueError(f"accelerate: this encoder is already accelerated in {enc_dtype}; build or load a fresh "
                             f"model to accelerate it in {dtype}")
        for m in tm.modules():
            if isinstance(m, _Fused):
                m.backend = name
        _prepack(tm, name)
        return
    from fastvlm.checkpoint import load_vision_tower
    t = next(t for t in tm.parameters() if t.is_floating_point())
    sd = {k: v for k, v in tm.state_dict().items() if not k.startswith("head.")}
    enc = load_vision_tower(sd, layout="timm", dtype=t.dtype, device=t.device)
    accelerate(enc, backend=backend, dtype=dtype)
    tm.stem = enc.patch_embed
    tm.stages = nn.Sequential(*enc.network)
    tm.final_conv = enc.conv_exp
    tm.accelerated_backend = enc.accelerated_backend
