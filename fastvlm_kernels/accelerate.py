"""``accelerate(model)``: swap fused modules into a FastViTHD (or anything holding one), in place.

Steps per encoder: check eval mode -> reparameterize if needed -> fold the ConvFFN BatchNorms
into their 7x7 depthwise weights -> pack every weight once for the chosen backend and dtype ->
replace the stem, blocks, PatchEmbeds, RepCPEs and conv_exp by fused modules. The accelerated
encoder keeps the ``fastvlm.FastViTHD`` API (``forward_features`` NCHW, ``forward`` tokens).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from fastvlm.checkpoint import convert_state_dict, load_vision_tower
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


def accelerate(model: nn.Module, backend: str = "auto", dtype: Optional[torch.dtype] = None,
               cuda_graphs: bool = False, max_graphs: int = 8) -> nn.Module:
    """Swap fused kernels into every FastViTHD inside ``model``, in place; returns ``model``.

    ``backend``: 'auto' (CUDA -> 'triton', CPU -> 'cpu', falling back to 'reference' with one warning
    saying why), 'reference', 'cpu' or 'triton'. ``dtype``: the compute/storage dtype of the packed
    weights and activations (default: the model's dtype). Calling it again switches the backend of
    an accelerated model; changing its dtype needs a fresh model. In a ``fastvlm.FastVLM`` (and in
    transformers' FastVLM) the projector is cast to ``dtype`` too; the LLM is left to transformers.

    The fused modules hold their weights as parameters that do not require grad, packed for one
    backend, device and dtype: ``.to()``, ``.half()``, ``.cuda()`` and the like that would change
    either raise :class:`~fastvlm_kernels.modules.FrozenDeviceDtypeError`; move or cast the model first.

    ``cuda_graphs=True`` replays each encoder's forward from CUDA graphs, one per input shape (at most
    ``max_graphs``, captured on first use; :class:`fastvlm_kernels.graphs.CUDAGraphRunner` states the
    contract). CPU inputs run eagerly. ``cuda_graphs=False`` (the default) removes graphs installed
    by an earlier call.
    """
    if dtype is not None and dtype not in _DTYPES:
        raise TypeError(f"accelerate: dtype must be one of {_DTYPES} or None, got {dtype}")
    ours, foreign = _encoders(model)
    for tm in foreign:
        _accelerate_timm(tm, backend, dtype)
        _set_graphs(tm, cuda_graphs, max_graphs)
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
            backends.prepare_weights(enc, name)
            enc.accelerated_backend = name
            continue
        with torch.no_grad():
            enc.reparameterize()
            _swap(enc, name, want_dtype)
        backends.prepare_weights(enc, name)
        enc.accelerated_backend = name
        enc.accelerated_dtype = want_dtype
    for enc in ours:
        _set_graphs(enc, cuda_graphs, max_graphs)
    if dtype is not None:
        # The projector after the tower (fastvlm.FastVLM) follows the tower's dtype, so its features
        # are not cast back up. It stays torch's Linear -> GELU -> Linear: at 256 tokens it is ~1.8 GFLOP,
        # under 1% of the encoder (see the TTFT breakdown), not worth a kernel of its own.
        # transformers' FastVlmModel holds its projector as ``multi_modal_projector`` beside ``vision_tower``.
        from fastvlm.projector import Projector
        for m in model.modules():
            if isinstance(m, Projector):
                m.to(dtype)
            hf_proj = getattr(m, "multi_modal_projector", None)
            if isinstance(hf_proj, nn.Module) and isinstance(getattr(m, "vision_tower", None), nn.Module):
                hf_proj.to(dtype)
    return model


def _set_graphs(enc: nn.Module, on: bool, max_graphs: int) -> None:
    from . import graphs
    if on:
        prepare = None
        if getattr(enc, "accelerated_backend", None) == "triton":  # compile the kernels several at once
            from .triton.launch import precompile
            prepare = precompile
        graphs.install(enc, max_graphs=max_graphs, prepare=prepare)
    else:
        graphs.uninstall(enc)


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


# timm's FastVit after the swap: parts that hold fused modules, and the fastvlm names of what they replaced.
_TIMM_PARTS = {"stem": "patch_embed", "stages": "network", "final_conv": "conv_exp"}


def _accelerate_timm(tm: nn.Module, backend: str, dtype: Optional[torch.dtype]) -> None:
    """Accelerate a timm FastVit in place: its weights go through this package's loader (timm key
    layout), and its ``stem`` / ``stages`` / ``final_conv`` become the fused modules. timm's own
    ``forward_features`` (stem -> each stage -> final_conv) then runs them unchanged: the fused
    modules pass NHWC between each other and the last one returns an NCHW view.

    ``state_dict()`` of the accelerated model keeps timm's inference-form layout (the one
    transformers' FastVLM checkpoints hold), and ``load_state_dict()`` takes it: state-dict hooks on
    the FastVit convert between that layout and the fused modules' weights."""
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
        backends.prepare_weights(tm, name)
        tm.accelerated_backend = name
        return
    t = next(t for t in tm.parameters() if t.is_floating_point())
    sd = {k: v for k, v in tm.state_dict().items() if not k.startswith("head.")}
    enc = load_vision_tower(sd, layout="timm", dtype=t.dtype, device=t.device)
    accelerate(enc, backend=backend, dtype=dtype)
    tm.stem = enc.patch_embed
    tm.stages = nn.Sequential(*enc.network)
    tm.final_conv = enc.conv_exp
    tm.accelerated_backend = enc.accelerated_backend
    tm.__dict__["_fastvlm_config"] = enc.config
    tm.__dict__["_fastvlm_key_rank"] = {k: i for i, k in enumerate(sd)}
    tm.register_state_dict_post_hook(_timm_state_dict)
    tm.register_load_state_dict_pre_hook(_timm_load_state_dict)


def _timm_part(key: str) -> bool:
    return key.split(".", 1)[0] in _TIMM_PARTS


def _timm_state_dict(tm, state_dict, prefix, local_metadata) -> None:
    """state_dict() of an accelerated timm FastVit: the fused modules' weights back in timm's
    inference-form names and shapes (the ConvFFN BatchNorms, folded into the 7x7 weights, come back
    as identity statistics with the fold's bias), in timm's key order."""
    mine = {k[len(prefix):]: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}
    cfg = tm.__dict__["_fastvlm_config"]
    shapes = _reference_shapes(cfg)
    apple: Dict[str, torch.Tensor] = {}
    for path, m in tm.named_modules():
        if not isinstance(m, _Fused) or not _timm_part(path) or _inside_fused(tm, path):
            continue
        local = {k[len(path) + 1:]: v for k, v in mine.items() if k.startswith(path + ".")}
        head, _, rest = path.partition(".")
        ref_path = _TIMM_PARTS[head] + ("." + rest if rest else "")
        for k, v in type(m).reference_state(local).items():
            key = f"{ref_path}.{k}"
            apple[key] = v.reshape(shapes[key]) if v.dim() else v
    apple = {k: apple[k] for k in shapes if k in apple}  # the model's own key order
    timm = convert_state_dict(apple, "apple", "timm", config=cfg)
    rank = tm.__dict__["_fastvlm_key_rank"]  # the timm model's own key order, where its keys were these
    for k in sorted(timm, key=lambda k: rank.get(k, len(rank))):
        state_dict[prefix + k] = timm[k]
    for k, v in mine.items():
        if not _timm_part(k):
            state_dict[prefix + k] = v


def _timm_load_state_dict(tm, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    """load_state_dict() into an accelerated timm FastVit: timm-layout weights (inference form) are
    loaded into a fresh fastvlm encoder (which names any missing, unexpected or mis-shaped key) and
    converted to the fused modules' weights; the fused modules' own load hooks pack them. A state
    dict already in the fused modules' names is left as it is."""
    mine = [k for k in state_dict if k.startswith(prefix) and _timm_part(k[len(prefix):])]
    fused = {k for k, _ in tm.named_parameters() if _timm_part(k)}
    if not mine or all(k[len(prefix):] in fused for k in mine):
        return
    cfg = tm.__dict__["_fastvlm_config"]
    timm_sd = {k[len(prefix):]: state_dict.pop(k) for k in mine}
    want = convert_state_dict(_reference_shapes(cfg), "apple", "timm", config=cfg)
    lost = [prefix + k for k in want if k not in timm_sd and not k.endswith("num_batches_tracked")]
    extra = [prefix + k for k in timm_sd if k not in want]
    bad = [f"size mismatch for {prefix}{k}: copying a param with shape {tuple(v.shape)} from checkpoint, the shape "
           f"in current model is {tuple(want[k])}." for k, v in timm_sd.items() if k in want
           and tuple(v.shape) != tuple(want[k])]
    # (torch hands every pre-hook strict=True and applies the caller's strict to these lists afterwards:
    # unexpected keys are then reported under strict=True only, as for any module)
    missing.extend(lost)
    unexpected.extend(extra)
    errors.extend(bad)
    if lost or bad:
        if lost:
            errors.append(f"{prefix or 'the model'}: an accelerated FastViT loads its stem, stages and final_conv "
                          "whole, not in part (with strict=False too)")
        return
    stem = tm.stem
    timm_sd = {k: v for k, v in timm_sd.items() if k in want}
    enc = load_vision_tower(timm_sd, layout="timm", config=cfg, dtype=stem.dtype, device=stem.w0.device)
    with torch.no_grad():
        _swap(enc, backends.FALLBACK, stem.dtype)
    parts = {"stem": enc.patch_embed, "stages": nn.Sequential(*enc.network), "final_conv": enc.conv_exp}
    for part, mod in parts.items():
        for k, v in mod.state_dict().items():
            state_dict[f"{prefix}{part}.{k}"] = v


def _inside_fused(root: nn.Module, path: str) -> bool:
    """Whether the module at ``path`` (dotted, below ``root``) sits inside another fused module."""
    parts = path.split(".")
    m = root
    for p in parts[:-1]:
        m = getattr(m, p)
        if isinstance(m, _Fused):
            return True
    return False


_SHAPES: Dict[str, Dict[str, torch.Size]] = {}


def _reference_shapes(cfg) -> Dict[str, torch.Size]:
    """Shapes of the inference-form fastvlm encoder's state, by key (built on the meta device, cached)."""
    key = repr(sorted(cfg.to_dict().items()))
    if key not in _SHAPES:
        with torch.device("meta"):
            ref = FastViTHD(cfg, inference_mode=True)
        _SHAPES[key] = {k: v.shape for k, v in ref.state_dict().items()}
    return _SHAPES[key]
