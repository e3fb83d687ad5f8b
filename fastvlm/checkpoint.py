"""Loading FastViTHD and projector weights from the released checkpoints (docs/model.md).

Sources: a state dict, a file (safetensors, or a torch file read with ``weights_only=True``), a
directory (single file or sharded with an ``*.index.json``), or a Hugging Face hub id (needs
``huggingface_hub`` and a network).

Key layouts, auto-detected (or forced with ``layout=``):

- ``"apple"``: ml-fastvlm names (``patch_embed``, ``network.N``, ``conv_exp``), bare or under
  ``model.vision_tower.vision_tower.model.`` (the full llava_qwen2 checkpoint);
- ``"hf"``: transformers ``fast_vlm``: timm names under ``model.vision_tower.timm_model.``;
- ``"timm"``: timm ``fastvit_mci3`` names (``stem``, ``stages.i.{downsample,pos_emb,blocks}``,
  ``final_conv``), bare.

``head.*`` (the CLIP projection / classifier head) and BatchNorm ``num_batches_tracked`` are ignored
on purpose; every other missing, unexpected or mis-shaped key is reported by name, in one error.
Both the inference form and the train-time (un-folded) form load; the model comes back in the form
the checkpoint holds (call ``reparameterize()`` to fold).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .fastvithd import FastViTHD, FastViTHDConfig
from .projector import Projector

__all__ = [
    "CheckpointError", "CorruptCheckpointError", "UnknownLayoutError", "CheckpointMismatchError",
    "LAYOUTS", "read_state_dict", "detect_layout", "convert_state_dict", "load_vision_tower",
    "load_projector", "vision_tower_state_dict",
]

LAYOUTS = ("apple", "hf", "timm")

#: Where the vision tower lives inside bigger checkpoints, per layout (longest first).
_PREFIXES = {
    "apple": ("model.vision_tower.vision_tower.model.", "vision_tower.vision_tower.model.", "image_encoder.model."),
    "hf": ("model.vision_tower.timm_model.", "vision_tower.timm_model."),
    "timm": ("timm_model.",),
}
_APPLE_ROOTS = ("patch_embed.", "network.", "conv_exp.")
_TIMM_ROOTS = ("stem.", "stages.", "final_conv.")
_PROJECTOR_PREFIXES = {
    "apple": ("model.mm_projector.", "mm_projector."),
    "hf": ("model.multi_modal_projector.", "multi_modal_projector."),
}


class CheckpointError(ValueError):
    """Base class of checkpoint loading errors."""


class CorruptCheckpointError(CheckpointError):
    """The file exists but cannot be read as a checkpoint."""


class UnknownLayoutError(CheckpointError):
    """The keys match none of the known layouts."""


class CheckpointMismatchError(CheckpointError):
    """Keys missing, unexpected or of the wrong shape; all of them are listed."""

    def __init__(self, missing: Sequence[str], unexpected: Sequence[str],
                 mismatched: Sequence[Tuple[str, tuple, tuple]], layout: str = "?"):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        lines = [f"checkpoint ({layout} layout) does not fit the model:"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        for k, got, want in self.mismatched:
            lines.append(f"  wrong shape: {k}: checkpoint {tuple(got)}, model {tuple(want)}")
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------------------------------
# reading files
# --------------------------------------------------------------------------------------------------

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _resolve_source(src) -> str:
    """A local file or directory for ``src``; downloads a hub id when huggingface_hub is there."""
    path = os.fspath(src)
    if os.path.exists(path):
        return path
    looks_like_hub_id = re.fullmatch(r"[\w.\-]+/[\w.\-]+", path) is not None and not path.startswith((".", "/"))
    if not looks_like_hub_id:
        raise FileNotFoundError(f"checkpoint not found: {path!r} is neither a file nor a directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise CheckpointError(
            f"{path!r} is not a local path and looks like a hub id, but huggingface_hub is not installed "
            "(pip install huggingface_hub), or pass a local file or directory") from e
    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
    except Exception as e:  # offline, unknown repo, gated, ...
        raise CheckpointError(
            f"could not fetch {path!r} from the Hugging Face hub ({type(e).__name__}: {e}). Offline? "
            "Download the checkpoint elsewhere and pass its local directory.") from e


def _weight_files(path: str) -> List[str]:
    if os.path.isfile(path):
        if path.endswith(".index.json"):
            return _shards_from_index(path)
        return [path]
    for name in _WEIGHT_FILES:
        p = os.path.join(path, name)
        if os.path.isfile(p):
            return _shards_from_index(p) if name.endswith(".index.json") else [p]
    cands = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin", ".pt", ".pth")))
    if len(cands) == 1:
        return [os.path.join(path, cands[0])]
    if not cands:
        raise FileNotFoundError(f"no weights in directory {path!r} (looked for {', '.join(_WEIGHT_FILES)}, "
                                "*.safetensors, *.bin, *.pt, *.pth)")
    raise CheckpointError(f"directory {path!r} holds several weight files and no index json: {cands}")


def _shards_from_index(index_path: str) -> List[str]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"cannot read shard index {index_path!r}: {type(e).__name__}: {e}") from e
    root = os.path.dirname(index_path)
    files = []
    for shard in weight_map.values():
        p = os.path.join(root, shard)
        if p not in files:
            files.append(p)
    for p in files:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"shard {p!r} named in {index_path!r} does not exist")
    return files


class _LazyStateDict:
    """Key names of one or more weight files, with tensors read only when asked for."""

    def __init__(self, files: Sequence[str]):
        self._where: Dict[str, Tuple[str, object]] = {}
        self._loaded: Dict[str, Dict[str, torch.Tensor]] = {}
        for path in files:
            if path.endswith(".safetensors"):
                try:
                    from safetensors import safe_open
                    with safe_open(path, framework="pt") as f:
                        keys = list(f.keys())
                except ImportError as e:
                    raise CheckpointError("reading .safetensors needs the safetensors package") from e
                except Exception as e:
                    raise CorruptCheckpointError(f"cannot read safetensors file {path!r}: {type(e).__name__}: {e}") from e
                for k in keys:
                    self._where[k] = (path, "st")
            else:
                sd = _torch_load(path)
                self._loaded[path] = sd
                for k in sd:
                    self._where[k] = (path, "pt")

    def keys(self) -> List[str]:
        return list(self._where)

    def get(self, keys: Sequence[str]) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        by_file: Dict[str, List[str]] = {}
        for k in keys:
            by_file.setdefault(self._where[k][0], []).append(k)
        for path, ks in by_file.items():
            if path in self._loaded:
                out.update({k: self._loaded[path][k] for k in ks})
                continue
            from safetensors import safe_open
            try:
                with safe_open(path, framework="pt") as f:
                    for k in ks:
                        out[k] = f.get_tensor(k)
            except Exception as e:
                raise CorruptCheckpointError(f"cannot read tensors from {path!r}: {type(e).__name__}: {e}") from e
        return out


def _torch_load(path: str) -> Dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CorruptCheckpointError(
            f"cannot read torch checkpoint {path!r} with weights_only=True: {type(e).__name__}: {e}") from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CorruptCheckpointError(f"{path!r} does not hold a flat state dict of tensors")
    return dict(obj)


def read_state_dict(src) -> Dict[str, torch.Tensor]:
    """The whole state dict of a file, a directory (sharded or not) or a hub id, on the CPU."""
    keys, get = _source_keys(src)
    return get(keys)


# --------------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------------


def _strip(keys: Sequence[str], prefixes: Sequence[str]) -> Optional[str]:
    for p in prefixes:
        if any(k.startswith(p) for k in keys):
            return p
    return None


def detect_layout(keys) -> Tuple[str, str]:
    """(layout, prefix) of a checkpoint's vision tower, from its key names alone."""
    keys = list(keys.keys() if isinstance(keys, Mapping) else keys)
    for layout in ("hf", "apple", "timm"):
        p = _strip(keys, _PREFIXES[layout])
        if p is not None:
            return layout, p
    if any(k.startswith(_APPLE_ROOTS) for k in keys):
        return "apple", ""
    if any(k.startswith(_TIMM_ROOTS) for k in keys):
        return "timm", ""
    sample = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
    raise UnknownLayoutError(
        f"cannot tell the checkpoint layout: no key looks like a FastViTHD vision tower in the apple "
        f"(patch_embed./network./conv_exp.), hf (model.vision_tower.timm_model.) or timm (stem./stages./"
        f"final_conv.) layouts; {len(keys)} keys, e.g. {sample or '(none)'}")


def _network_map(layout_entries: Sequence[Tuple[str, int]]) -> List[Tuple[str, str]]:
    """(apple prefix, timm prefix) for each entry of FastViTHD.network."""
    pairs = []
    for n, (kind, stage) in enumerate(layout_entries):
        timm = {"blocks": f"stages.{stage}.blocks.", "downsample": f"stages.{stage}.downsample.",
                "pos_emb": f"stages.{stage}.pos_emb."}[kind]
        pairs.append((f"network.{n}.", timm))
    return pairs


# Renames inside a module path, apple <-> timm, applied after the prefix is mapped.
_RENAMES = [  # (apple regex, apple repl, timm regex, timm repl)
    (r"\.proj\.0\.lkb_reparam\.", ".proj.0.lkb_reparam.", r"\.proj\.0\.reparam_conv\.", ".proj.0.reparam_conv."),
    (r"\.lkb_origin\.", ".lkb_origin.", r"\.large_conv\.", ".large_conv."),
    (r"\.rbr_conv\.", ".rbr_conv.", r"\.conv_kxk\.", ".conv_kxk."),
    (r"\.rbr_scale\.", ".rbr_scale.", r"\.conv_scale\.", ".conv_scale."),
    (r"\.rbr_skip\.", ".rbr_skip.", r"\.identity\.", ".identity."),
    (r"\.convffn\.", ".convffn.", r"\.mlp\.", ".mlp."),
    (r"\.se\.reduce\.", ".se.reduce.", r"\.se\.fc1\.", ".se.fc1."),
    (r"\.se\.expand\.", ".se.expand.", r"\.se\.fc2\.", ".se.fc2."),
    (r"\.layer_scale$", ".layer_scale", r"\.layer_scale\.gamma$", ".layer_scale.gamma"),
    (r"\.layer_scale_1$", ".layer_scale_1", r"\.layer_scale_1\.gamma$", ".layer_scale_1.gamma"),
    (r"\.layer_scale_2$", ".layer_scale_2", r"\.layer_scale_2\.gamma$", ".layer_scale_2.gamma"),
]


def _apple_to_timm_key(k: str, net: List[Tuple[str, str]]) -> str:
    if k.startswith("patch_embed."):
        k = "stem." + k[len("patch_embed."):]
    elif k.startswith("conv_exp."):
        k = "final_conv." + k[len("conv_exp."):]
    else:
        for a, t in net:
            if k.startswith(a):
                k = t + k[len(a):]
                # RepCPE: reparam_conv / pe -> pos_enc
                if t.endswith("pos_emb."):
                    k = re.sub(r"pos_emb\.pe\.", "pos_emb.pos_enc.", k)
                break
    k = "." + k
    for are, _, _, trep in _RENAMES:
        k = re.sub(are, trep, k)
    return k[1:]


def _timm_to_apple_key(k: str, net: List[Tuple[str, str]]) -> str:
    k = "." + k
    for _, arep, tre, _ in _RENAMES:
        k = re.sub(tre, arep, k)
    k = k[1:]
    if k.startswith("stem."):
        return "patch_embed." + k[len("stem."):]
    if k.startswith("final_conv."):
        return "conv_exp." + k[len("final_conv."):]
    for a, t in net:
        if k.startswith(t):
            k = a + k[len(t):]
            if t.endswith("pos_emb."):
                k = re.sub(r"^(network\.\d+\.)pos_enc\.", r"\1pe.", k)
            return k
    return k


def _network_layout_for(config: FastViTHDConfig) -> List[Tuple[str, int]]:
    entries = []
    for i in range(len(config.layers)):
        if i > 0:
            entries.append(("downsample", i))
        if config.pos_embs[i]:
            entries.append(("pos_emb", i))
        entries.append(("blocks", i))
    return entries


def convert_state_dict(sd: Mapping, src_layout: str, dst_layout: str,
                       config: Optional[FastViTHDConfig] = None, prefix: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Rename a *bare* vision-tower state dict from one layout to another.

    ``prefix``: put in front of every output key; default none for apple/timm and
    ``model.vision_tower.timm_model.`` for hf. ``config``: the architecture (default: released)."""
    for name in (src_layout, dst_layout):
        if name not in LAYOUTS:
            raise ValueError(f"convert_state_dict: layout must be one of {LAYOUTS}, got {name!r}")
    net = _network_map(_network_layout_for(config or FastViTHDConfig()))
    src_timm = src_layout in ("hf", "timm")
    dst_timm = dst_layout in ("hf", "timm")
    out = {}
    for k, v in sd.items():
        if src_timm and not dst_timm:
            k = _timm_to_apple_key(k, net)
        elif dst_timm and not src_timm:
            k = _apple_to_timm_key(k, net)
        out[k] = v
    if prefix is None:
        prefix = _PREFIXES["hf"][0] if dst_layout == "hf" else ""
    return {prefix + k: v for k, v in out.items()}


def _ignored(k: str) -> bool:
    return k.startswith("head.") or k.endswith("num_batches_tracked")


# --------------------------------------------------------------------------------------------------
# architecture from the keys
# --------------------------------------------------------------------------------------------------


def _infer_config(sd: Mapping[str, torch.Tensor], layout: str = "apple") -> Tuple[FastViTHDConfig, bool]:
    """(config, inference_mode) of an apple-named bare vision-tower state dict."""
    def shape(k):
        return tuple(sd[k].shape)

    train = any(".rbr_conv." in k or ".lkb_origin." in k or re.match(r"network\.\d+\.pe\.", k) for k in sd)
    stem_w = "patch_embed.0.reparam_conv.weight" if not train else "patch_embed.0.rbr_conv.0.conv.weight"
    if stem_w not in sd:
        raise CheckpointMismatchError([stem_w], [], [], layout)
    d0, in_chans = shape(stem_w)[:2]
    entries: Dict[int, set] = {}
    for k in sd:
        m = re.match(r"network\.(\d+)\.(.*)", k)
        if m:
            entries.setdefault(int(m.group(1)), set()).add(m.group(2))
    layers, dims, mixers, pos, mlp_ratio, rm_k, cpe_k = [], [], [], [], 4.0, 3, 7
    pending_pos = False
    for n in sorted(entries):
        names = entries[n]
        if any(s.startswith("proj.") for s in names):
            continue
        if any(s.startswith(("reparam_conv.", "pe.")) for s in names):
            pending_pos = True
            w = sd.get(f"network.{n}.reparam_conv.weight", sd.get(f"network.{n}.pe.weight"))
            cpe_k = w.shape[-1]
            continue
        idx = {int(s.split(".")[0]) for s in names if s.split(".")[0].isdigit()}
        if not idx:
            continue
        # width and FFN ratio from any block of the stage that has them (a missing key is reported
        # later, with all the others, by the strict comparison)
        fc = [(w, shape(f"network.{n}.{i}.convffn.{w}.weight")) for i in sorted(idx) for w in ("fc1", "fc2")
              if f"{i}.convffn.{w}.weight" in names]
        if not fc:
            raise CheckpointMismatchError([f"network.{n}.0.convffn.fc1.weight"], [], [], layout)
        which, fshape = fc[0]
        hidden, dim = (fshape[0], fshape[1]) if which == "fc1" else (fshape[1], fshape[0])
        mlp_ratio = hidden / dim
        attention = any(s.endswith("token_mixer.qkv.weight") for s in names)
        if not attention:
            wk = f"network.{n}.0.token_mixer.reparam_conv.weight"
            if wk in sd:
                rm_k = sd[wk].shape[-1]
        layers.append(max(idx) + 1)
        dims.append(dim)
        mixers.append("attention" if attention else "repmixer")
        pos.append(pending_pos)
        pending_pos = False
    if not layers:
        raise CheckpointMismatchError(["network.0.0.*"], [], [], layout)
    exp_w = "conv_exp.reparam_conv.weight" if not train else "conv_exp.rbr_conv.0.conv.weight"
    cls_ratio = sd[exp_w].shape[0] / dims[-1] if exp_w in sd else 2.0
    se_k = "conv_exp.se.reduce.weight"
    se_ratio = sd[se_k].shape[0] / (dims[-1] * cls_ratio) if se_k in sd else 0.0625
    cfg = FastViTHDConfig(layers=tuple(layers), embed_dims=tuple(dims), token_mixers=tuple(mixers),
                          pos_embs=tuple(pos), mlp_ratio=mlp_ratio, repmixer_kernel_size=rm_k,
                          cpe_kernel_size=cpe_k, cls_ratio=cls_ratio, se_rd_ratio=se_ratio, in_chans=in_chans)
    if cfg.embed_dims[0] != d0:
        raise CheckpointMismatchError([], [], [(stem_w, shape(stem_w), (dims[0], in_chans, 3, 3))], layout)
    return cfg, not train


# --------------------------------------------------------------------------------------------------
# public loaders
# --------------------------------------------------------------------------------------------------


def _source_keys(src) -> Tuple[List[str], Callable[[Sequence[str]], Dict[str, torch.Tensor]]]:
    if isinstance(src, Mapping):
        sd = dict(src)
        return list(sd), lambda ks: {k: sd[k] for k in ks}
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"checkpoint source must be a path, a hub id or a state dict, got {type(src).__name__}")
    lazy = _LazyStateDict(_weight_files(_resolve_source(src)))
    return lazy.keys(), lazy.get


def vision_tower_state_dict(src, layout: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], str]:
    """The vision tower's tensors of ``src`` renamed to this package's (apple, bare) names, and the
    layout they came in. Keys outside the tower's prefix (LLM, projector) are left alone."""
    keys, get = _source_keys(src)
    detected, prefix = detect_layout(keys)
    if layout is not None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS} or None, got {layout!r}")
        prefix = _strip(keys, _PREFIXES[layout]) or ""
        detected = layout
    tower_keys = [k for k in keys if k.startswith(prefix)]
    raw = get(tower_keys)
    bare = {k[len(prefix):]: v for k, v in raw.items()}
    if detected == "apple":
        return bare, detected
    # timm names: the network index map depends on the architecture; infer it from the timm keys.
    stages = sorted({int(m.group(1)) for k in bare for m in [re.match(r"stages\.(\d+)\.", k)] if m})
    pos = tuple(any(k.startswith(f"stages.{s}.pos_emb.") for k in bare) for s in stages)
    fake = FastViTHDConfig(layers=(1,) * len(stages), embed_dims=(32,) * len(stages),
                           token_mixers=("repmixer",) * len(stages), pos_embs=pos) if stages else FastViTHDConfig()
    net = _network_map(_network_layout_for(fake))
    return {_timm_to_apple_key(k, net): v for k, v in bare.items()}, detected


def load_vision_tower(src, layout: Optional[str] = None, config: Optional[FastViTHDConfig] = None,
                      dtype: Optional[torch.dtype] = None, device=None) -> FastViTHD:
    """A FastViTHD (eval mode) with the weights of ``src``.

    ``src``: a state dict, a file, a directory (sharded or not), or a hub id. ``layout``: 'apple',
    'hf' or 'timm' to override detection. ``config``: the architecture; inferred from the weights
    when not given. ``dtype`` / ``device``: where the model ends up (default: float32, CPU)."""
    sd, found_layout = vision_tower_state_dict(src, layout)
    sd = {k: v for k, v in sd.items() if not _ignored(k)}
    inferred, inference_mode = _infer_config(sd, found_layout)
    cfg = config if config is not None else inferred
    model = FastViTHD(cfg, inference_mode=inference_mode)
    want = {k: v for k, v in model.state_dict().items() if not _ignored(k)}
    missing = sorted(k for k in want if k not in sd)
    unexpected = sorted(k for k in sd if k not in want)
    mismatched = [(k, tuple(sd[k].shape), tuple(want[k].shape)) for k in sorted(want)
                  if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched, found_layout)
    model.load_state_dict(sd, strict=False)
    model.eval()
    model.checkpoint_layout = found_layout
    return model.to(device=device, dtype=dtype or torch.float32)


def load_projector(src, layout: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                   device=None) -> Projector:
    """The mlp2x_gelu projector of a FastVLM checkpoint (apple ``mm_projector.{0,2}`` or hf
    ``multi_modal_projector.linear_{1,2}``), sizes read from the weights."""
    keys, get = _source_keys(src)
    names = {"apple": ("0.", "2."), "hf": ("linear_1.", "linear_2.")}
    found = None
    for lay, prefixes in _PROJECTOR_PREFIXES.items():
        if layout not in (None, lay):
            continue
        p = _strip(keys, prefixes)
        if p is not None:
            found = (lay, p)
            break
    if found is None:
        raise UnknownLayoutError(
            "no projector in the checkpoint: expected keys under model.mm_projector. (apple) or "
            "model.multi_modal_projector. (hf)")
    lay, p = found
    a, b = names[lay]
    want = [p + a + "weight", p + a + "bias", p + b + "weight", p + b + "bias"]
    missing = [k for k in want if k not in keys]
    extra = [k for k in keys if k.startswith(p) and k not in want]
    if missing or extra:
        raise CheckpointMismatchError(missing, extra, [], lay)
    t = get(want)
    w1, b1, w2, b2 = (t[k] for k in want)
    proj = Projector(w1.shape[1], w1.shape[0])
    expect = {want[0]: (proj.hidden_size, proj.in_features), want[1]: (proj.hidden_size,),
              want[2]: (proj.hidden_size, proj.hidden_size), want[3]: (proj.hidden_size,)}
    bad = [(k, tuple(t[k].shape), s) for k, s in expect.items() if tuple(t[k].shape) != s]
    if bad:
        raise CheckpointMismatchError([], [], bad, lay)
    proj.load_state_dict({"linear_1.weight": w1, "linear_1.bias": b1, "linear_2.weight": w2, "linear_2.bias": b2})
    return proj.eval().to(device=device, dtype=dtype or torch.float32)
