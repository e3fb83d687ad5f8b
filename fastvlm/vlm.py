"""FastVLM: FastViTHD -> mlp2x_gelu projector -> Qwen2ForCausalLM (transformers), end to end.

Prompting follows the reference ``predict.py`` (docs/model.md): the qwen_2 chat template,
``<image>`` placeholders replaced by the image's projected tokens. Two placeholder forms give the same
embeddings, hence the same logits:

- ``"apple"``: the text is split on ``<image>``, each chunk tokenized alone and the chunks joined
  with the sentinel -200; each sentinel becomes the image's N embeddings (``tokenizer_image_token``
  + ``prepare_inputs_labels_for_multimodal``);
- ``"hf"``: ``<image>`` is a real added token (151646 for Qwen2 tokenizers), repeated N times, and the
  image embeddings are scattered into those slots (transformers ``FastVlm``).

A batch of prompts is left-padded; position ids start at 0 after the padding. ``generate`` runs the
LLM with its KV cache and reports the time to first token with its breakdown
(:class:`TTFT`). transformers is an optional dependency (the ``[vlm]`` extra).
"""
from __future__ import annotations

import inspect
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .checkpoint import (CheckpointError, CheckpointMismatchError, _resolve_source, _source_keys,
                         convert_state_dict, load_projector, load_vision_tower)
from .fastvithd import FastViTHD, FastViTHDConfig
from .projector import Projector

__all__ = [
    "FastVLM", "TTFT", "GenerationOutput", "MissingTokenizerError", "chat_prompt", "LLM_CONFIGS",
    "IMAGE_TOKEN", "IMAGE_TOKEN_INDEX", "HF_IMAGE_TOKEN_ID", "SYSTEM_PROMPT",
]

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200          # Apple's sentinel, never looked up in the embedding table
HF_IMAGE_TOKEN_ID = 151646        # transformers fast_vlm / Qwen2 tokenizers with <image> added
SYSTEM_PROMPT = "You are a helpful assistant."
DOWNSAMPLE = 64                   # FastViTHD's total stride: (S/64)^2 tokens per S x S image

#: Qwen2 shapes of the released FastVLM sizes, plus a tiny one for tests.
LLM_CONFIGS: Dict[str, dict] = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}
_QWEN2_COMMON = dict(rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768, hidden_act="silu",
                     tie_word_embeddings=False, attention_dropout=0.0)
# Fields of a Qwen2 config that config.json files carry and Qwen2Config takes.
_QWEN2_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                 "rope_scaling", "rope_parameters", "tie_word_embeddings", "attention_dropout",
                 "use_sliding_window", "sliding_window", "max_window_layers", "bos_token_id", "eos_token_id")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class MissingTokenizerError(CheckpointError):
    """The checkpoint directory has no tokenizer files."""


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("fastvlm.FastVLM needs transformers: pip install transformers tokenizers "
                          "(the [vlm] extra)") from e
    return transformers


def chat_prompt(text: str, system: str = SYSTEM_PROMPT) -> str:
    """``text`` in the qwen_2 chat template of ``predict.py``."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[fastvlm] {msg}", file=sys.stderr, flush=True)


def _module_dtype(m: nn.Module) -> torch.dtype:
    for t in list(m.parameters()) + list(m.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _module_device(m: nn.Module) -> torch.device:
    for t in list(m.parameters()) + list(m.buffers()):
        return t.device
    return torch.device("cpu")


@dataclass
class TTFT:
    """Time to first token, seconds, and where it went. ``total`` is the sum of the parts."""
    preprocess: float = 0.0
    encode: float = 0.0
    project: float = 0.0
    prefill: float = 0.0
    first_token: float = 0.0
    prompt_tokens: int = 0      # longest prompt in the batch, image tokens included

    @property
    def total(self) -> float:
        return self.preprocess + self.encode + self.project + self.prefill + self.first_token

    def as_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        return d

    def __str__(self) -> str:
        return (f"TTFT {self.total * 1e3:.0f} ms (preprocess {self.preprocess * 1e3:.0f}, encode "
                f"{self.encode * 1e3:.0f}, project {self.project * 1e3:.0f}, prefill {self.prefill * 1e3:.0f}, "
                f"first token {self.first_token * 1e3:.0f}; {self.prompt_tokens} prompt tokens)")


@dataclass
class GenerationOutput:
    texts: List[str]
    token_ids: List[List[int]]
    ttft: TTFT
    decode_time: float = 0.0          # seconds after the first token
    new_tokens: int = 0               # tokens generated after the first one, over the batch
    first_logits: Optional[torch.Tensor] = field(default=None, repr=False)  # (B, vocab), fp32

    @property
    def tokens_per_s(self) -> float:
        """Decode rate after the first token (batch total); NaN when fewer than 2 tokens came."""
        return self.new_tokens / self.decode_time if self.decode_time > 0 and self.new_tokens else float("nan")


def _llm_config(fields: dict):
    tf = _transformers()
    kw = {k: v for k, v in fields.items() if k in _QWEN2_FIELDS and v is not None}
    if "rope_parameters" in kw and "rope_theta" in kw:
        kw.pop("rope_theta")
    return tf.Qwen2Config(**kw)


class FastVLM(nn.Module):
    """Vision tower (:class:`FastViTHD`) + :class:`Projector` + transformers ``Qwen2ForCausalLM``.

    Build one with :meth:`from_pretrained` (Apple llava_qwen2 or HF fast_vlm checkpoint directory,
    or a hub id) or :meth:`from_config` (random weights). ``fastvlm_kernels.accelerate(vlm)`` swaps the
    fused kernels into the vision tower; the LLM stays with transformers (SDPA)."""

    def __init__(self, vision_tower: FastViTHD, projector: Projector, language_model: nn.Module, tokenizer,
                 image_size: int = 1024, pad_to_square: bool = True, image_token_id: Optional[int] = None,
                 max_length: int = 8192, system_prompt: str = SYSTEM_PROMPT):
        super().__init__()
        if projector.in_features != vision_tower.num_features:
            raise ValueError(f"FastVLM: the projector takes {projector.in_features} features, the vision tower "
                             f"gives {vision_tower.num_features}")
        hidden = language_model.get_input_embeddings().weight.shape[1]
        if projector.hidden_size != hidden:
            raise ValueError(f"FastVLM: the projector gives {projector.hidden_size} features, the LLM's hidden "
                             f"size is {hidden}")
        if image_size % DOWNSAMPLE:
            raise ValueError(f"FastVLM: image_size must be a multiple of {DOWNSAMPLE}, got {image_size}")
        self.vision_tower, self.projector, self.language_model = vision_tower, projector, language_model
        self.tokenizer = tokenizer
        self.image_size, self.pad_to_square, self.max_length = image_size, pad_to_square, max_length
        self.system_prompt = system_prompt
        if image_token_id is None and tokenizer is not None:
            tid = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
            image_token_id = tid if isinstance(tid, int) and tid != tokenizer.unk_token_id else HF_IMAGE_TOKEN_ID
        self.image_token_id = image_token_id if image_token_id is not None else HF_IMAGE_TOKEN_ID

    # ------------------------------------------------------------------------------------------ build
    @classmethod
    def from_config(cls, size: str = "0.5b", vision_config: Optional[FastViTHDConfig] = None, tokenizer=None,
                    image_size: Optional[int] = None, seed: int = 0, dtype: Optional[torch.dtype] = None,
                    llm_overrides: Optional[dict] = None) -> "FastVLM":
        """Random weights in the shapes of a released size ('0.5b', '1.5b', '7b') or 'tiny'.

        'tiny' pairs a tiny FastViTHD (128x128 images, 4 tokens) with a 2-layer Qwen2 and, unless a
        tokenizer is given, the locally built :func:`fastvlm.testing.tiny_tokenizer`. The big sizes
        need a tokenizer for text; without one, :func:`tiny_tokenizer` is used (ids stay in range)."""
        tf = _transformers()
        key = size.lower()
        if key not in LLM_CONFIGS:
            raise ValueError(f"FastVLM.from_config: size must be one of {sorted(LLM_CONFIGS)}, got {size!r}")
        if tokenizer is None:
            from .testing import tiny_tokenizer
            tokenizer = tiny_tokenizer()
        fields = dict(_QWEN2_COMMON, **LLM_CONFIGS[key], **(llm_overrides or {}))
        if len(tokenizer) > fields["vocab_size"]:
            raise ValueError(f"FastVLM.from_config: the tokenizer has {len(tokenizer)} tokens, more than the "
                             f"vocabulary of {fields['vocab_size']}")
        tiny = key == "tiny"
        vcfg = vision_config or (FastViTHDConfig.tiny() if tiny else FastViTHDConfig())
        # The tower's train form is randomised and then folded (fastvlm.testing.random_tower), so its
        # features, and the answers, depend on the image; the release's init (layer scales 1e-5) or a
        # randomised inference form would give nearly the same features for every image.
        from .testing import random_tower
        tower = random_tower(vcfg, seed=seed, weight_gain=0.85 if tiny else 0.5).eval()
        torch.manual_seed(seed)
        projector = Projector(tower.num_features, fields["hidden_size"]).eval()
        lm = tf.Qwen2ForCausalLM(_llm_config(fields)).eval()
        vlm = cls(tower, projector, lm, tokenizer, image_size=image_size or (128 if tiny else 1024))
        return vlm.to(dtype) if dtype is not None else vlm

    @classmethod
    def from_pretrained(cls, src, dtype: Optional[torch.dtype] = None, llm_dtype: Optional[torch.dtype] = None,
                        device=None, tokenizer=None, progress: bool = True) -> "FastVLM":
        """A FastVLM from a checkpoint directory (or a hub id when online).

        Apple llava_qwen2 layout (``model.vision_tower.vision_tower.model.*``, ``model.mm_projector.*``,
        ``model.layers.*``) and HF fast_vlm layout (``model.vision_tower.timm_model.*``,
        ``model.multi_modal_projector.*``, ``model.language_model.*``) are detected from the keys.
        ``lm_head.weight`` is used when present, else tied to the embeddings. The tokenizer comes from
        the same directory (:class:`MissingTokenizerError` when it has none), unless given.
        ``dtype``: tower + projector (default float32); ``llm_dtype``: the LLM (default ``dtype``)."""
        tf = _transformers()
        t0 = time.perf_counter()
        path = _resolve_source(src)
        if not os.path.isdir(path):
            raise CheckpointError(f"FastVLM.from_pretrained needs a checkpoint directory (config.json, weights, "
                                  f"tokenizer), got the file {path!r}")
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise CheckpointError(f"no config.json in {path!r}: FastVLM.from_pretrained needs the LLM's shape from it")
        try:
            with open(cfg_path) as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {cfg_path!r}: {e}") from e
        hf = cfg.get("model_type") == "fast_vlm" or "text_config" in cfg
        text = dict(cfg["text_config"]) if hf else dict(cfg)
        image_size = cfg.get("fastvlm_image_size")
        if image_size is None and hf and cfg.get("image_seq_length"):
            image_size = int(round(math.sqrt(cfg["image_seq_length"]))) * DOWNSAMPLE
        if image_size is None:
            tail = str(cfg.get("mm_vision_tower", "")).rsplit("_", 1)[-1]
            image_size = int(tail) if tail.isdigit() else 1024
        _log(progress, f"loading {'HF fast_vlm' if hf else 'Apple llava_qwen2'} checkpoint from {path}")

        if tokenizer is None:
            if not any(os.path.isfile(os.path.join(path, n)) for n in _TOKENIZER_FILES):
                raise MissingTokenizerError(
                    f"no tokenizer in {path!r} (looked for {', '.join(_TOKENIZER_FILES)}); copy the tokenizer files "
                    "of the checkpoint there or pass tokenizer=")
            # AutoTokenizer reads config.json too and warns that llava_qwen2 is not a model type it
            # knows; that is expected here, so keep its logging quiet while the tokenizer loads.
            verbosity = tf.logging.get_verbosity()
            tf.logging.set_verbosity_error()
            try:
                tokenizer = tf.AutoTokenizer.from_pretrained(path)
            finally:
                tf.logging.set_verbosity(verbosity)

        keys, get = _source_keys(path)
        tower = load_vision_tower(path, layout="hf" if hf else "apple", dtype=dtype, device=device)
        _log(progress, f"vision tower: {sum(p.numel() for p in tower.parameters()) / 1e6:.2f} M parameters")
        projector = load_projector(path, layout="hf" if hf else "apple", dtype=dtype, device=device)

        prefix = "model.language_model." if hf else "model."
        skip = ("model.vision_tower.", "model.mm_projector.", "model.multi_modal_projector.")
        llm_keys = [k for k in keys if (k.startswith(prefix) and not k.startswith(skip)) or k == "lm_head.weight"]
        lcfg = _llm_config(text)
        with torch.device("meta"):
            lm = tf.Qwen2ForCausalLM(lcfg)
        shapes = lm.state_dict()
        want = set(shapes)
        sd: Dict[str, torch.Tensor] = {}
        n_chunks = max(1, min(10, len(llm_keys)))
        step = math.ceil(len(llm_keys) / n_chunks) if llm_keys else 1
        for i in range(0, len(llm_keys), step):
            part = get(llm_keys[i:i + step])
            for k, v in part.items():
                sd["model." + k[len(prefix):] if k != "lm_head.weight" else k] = v
            if len(llm_keys) >= 100:
                _log(progress, f"language model: {min(i + step, len(llm_keys))}/{len(llm_keys)} tensors read")
        tied = "lm_head.weight" not in sd
        missing = sorted(k for k in want if k not in sd and not (tied and k == "lm_head.weight"))
        unexpected = sorted(k for k in sd if k not in want)
        mismatched = [(k, tuple(sd[k].shape), tuple(shapes[k].shape)) for k in sorted(sd)
                      if k in shapes and tuple(sd[k].shape) != tuple(shapes[k].shape)]
        if missing or unexpected or mismatched:
            raise CheckpointMismatchError(missing, unexpected, mismatched, "hf" if hf else "apple")
        ldt = llm_dtype or dtype or torch.float32
        lm.load_state_dict({k: v.to(ldt) for k, v in sd.items()}, strict=False, assign=True)
        if tied:
            lm.lm_head.weight = lm.model.embed_tokens.weight
        # Non-persistent buffers (rotary inv_freq) were made on the meta device: rebuild them.
        lm.model.rotary_emb = type(lm.model.rotary_emb)(config=lcfg)
        left = [n for n, t in list(lm.named_parameters()) + list(lm.named_buffers()) if t.is_meta]
        if left:
            raise CheckpointError(f"FastVLM.from_pretrained: tensors left uninitialised: {left[:8]}")
        lm = lm.to(device=device).eval()
        image_token_id = cfg.get("image_token_id", cfg.get("image_token_index")) if hf else None
        vlm = cls(tower, projector, lm, tokenizer, image_size=image_size, image_token_id=image_token_id,
                  max_length=int(cfg.get("tokenizer_model_max_length", 8192)))
        vlm.checkpoint_layout = "hf" if hf else "apple"
        vlm.lm_head_tied = tied
        _log(progress, f"loaded in {time.perf_counter() - t0:.1f} s (LLM {sum(p.numel() for p in lm.parameters()) / 1e6:.2f} M "
                       f"parameters, {ldt}, lm_head {'tied to the embeddings' if tied else 'from lm_head.weight'})")
        return vlm

    def save_pretrained(self, path: str, layout: str = "apple") -> None:
        """Write config.json, model.safetensors and the tokenizer in the Apple or HF layout (what
        :meth:`from_pretrained` reads; used by the tests and to convert between layouts)."""
        from safetensors.torch import save_file
        if layout not in ("apple", "hf"):
            raise ValueError(f"save_pretrained: layout must be 'apple' or 'hf', got {layout!r}")
        if getattr(self.vision_tower, "accelerated_backend", None):
            raise RuntimeError("save_pretrained: the vision tower is accelerated (packed weights); save the model "
                               "before fastvlm_kernels.accelerate()")
        os.makedirs(path, exist_ok=True)
        tower = {k: v for k, v in self.vision_tower.state_dict().items() if not k.endswith("num_batches_tracked")}
        if not self.vision_tower.inference_mode:
            raise RuntimeError("save_pretrained: reparameterize() the vision tower first (checkpoints hold the "
                               "inference form)")
        lm_sd = self.language_model.state_dict()
        tied = self.language_model.lm_head.weight.data_ptr() == self.language_model.model.embed_tokens.weight.data_ptr()
        text = {k: v for k, v in self.language_model.config.to_dict().items() if k in _QWEN2_FIELDS}
        text["model_type"] = "qwen2"
        text["tie_word_embeddings"] = tied
        out: Dict[str, torch.Tensor] = {}
        p = self.projector
        if layout == "apple":
            out.update({"model.vision_tower.vision_tower.model." + k: v for k, v in tower.items()})
            out.update({"model.mm_projector.0.weight": p.linear_1.weight, "model.mm_projector.0.bias": p.linear_1.bias,
                        "model.mm_projector.2.weight": p.linear_2.weight, "model.mm_projector.2.bias": p.linear_2.bias})
            out.update({k: v for k, v in lm_sd.items() if k.startswith("model.")})
            cfg = dict(text, architectures=["LlavaQwen2ForCausalLM"], model_type="llava_qwen2",
                       mm_hidden_size=p.in_features, mm_projector_type="mlp2x_gelu",
                       mm_vision_tower=f"mobileclip_l_{self.image_size}", image_aspect_ratio="pad",
                       tokenizer_model_max_length=self.max_length, fastvlm_image_size=self.image_size)
        else:
            timm = convert_state_dict(tower, "apple", "timm", config=self.vision_tower.config)
            out.update({"model.vision_tower.timm_model." + k: v for k, v in timm.items()})
            out.update({"model.multi_modal_projector.linear_1.weight": p.linear_1.weight,
                        "model.multi_modal_projector.linear_1.bias": p.linear_1.bias,
                        "model.multi_modal_projector.linear_2.weight": p.linear_2.weight,
                        "model.multi_modal_projector.linear_2.bias": p.linear_2.bias})
            out.update({"model.language_model." + k[len("model."):]: v for k, v in lm_sd.items() if k.startswith("model.")})
            n = (self.image_size // DOWNSAMPLE) ** 2
            cfg = dict(architectures=["FastVlmForConditionalGeneration"], model_type="fast_vlm", text_config=text,
                       # as transformers' FastVlmConfig builds the tower: timm's fastvit_mci3 in its
                       # inference form (the layout written here), the given architecture's shape
                       vision_config={"architecture": "fastvit_mci3", "hidden_size": p.in_features,
                                      "model_type": "timm_wrapper", "do_pooling": True, "global_pool": "avg",
                                      "model_args": _timm_model_args(self.vision_tower.config)},
                       image_token_id=self.image_token_id, image_seq_length=n, projector_hidden_act="gelu",
                       fastvlm_image_size=self.image_size)
        if not tied:
            out["lm_head.weight"] = lm_sd["lm_head.weight"]
        save_file({k: v.detach().contiguous().cpu() for k, v in out.items()}, os.path.join(path, "model.safetensors"))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)

    # ------------------------------------------------------------------------------------------ images
    def load_images(self, images) -> torch.Tensor:
        """Images (PIL, uint8 arrays, file paths, or an already preprocessed (B, 3, S, S) tensor) ->
        a float tensor (B, 3, S, S) in [0, 1] at ``image_size``."""
        from .preprocess import preprocess
        if isinstance(images, torch.Tensor):
            if images.dim() == 3:
                images = images.unsqueeze(0)
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"FastVLM: image tensors must be (B, 3, H, W), got {tuple(images.shape)}")
            return images
        items = list(images)
        loaded = []
        for im in items:
            if isinstance(im, (str, os.PathLike)):
                loaded.append(_open_image(im))
            else:
                loaded.append(im)
        return preprocess(loaded, size=self.image_size, pad_to_square=self.pad_to_square)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, timing: Optional[TTFT] = None) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> projected image embeddings (B, N, hidden) in the LLM's dtype."""
        dev = _module_device(self.vision_tower)
        t0 = _now(dev)
        feats = self.vision_tower(pixels.to(device=dev, dtype=_module_dtype(self.vision_tower)))
        t1 = _now(dev)
        emb = self.projector(feats.to(_module_dtype(self.projector)))
        emb = emb.to(self.language_model.get_input_embeddings().weight.dtype)
        t2 = _now(dev)
        if timing is not None:
            timing.encode += t1 - t0
            timing.project += t2 - t1
        return emb

    # ------------------------------------------------------------------------------------------ prompts
    def _normalise(self, images, prompts) -> Tuple[List[list], List[str], bool]:
        single = isinstance(prompts, str)
        plist = [prompts] if single else list(prompts)
        if not plist:
            raise ValueError("FastVLM: no prompts given")
        if not all(isinstance(p, str) for p in plist):
            raise TypeError("FastVLM: prompts must be a str or a list of str")
        if single:
            if images is None:
                ilist = [[]]
            elif isinstance(images, (list, tuple)):
                ilist = [list(images)]
            elif isinstance(images, torch.Tensor) and images.dim() == 4:
                ilist = [list(images)]
            else:
                ilist = [[images]]
        else:
            if images is None:
                images = [None] * len(plist)
            if isinstance(images, torch.Tensor):
                images = list(images)
            if not isinstance(images, (list, tuple)) or len(images) != len(plist):
                n = len(images) if isinstance(images, (list, tuple)) else 1
                raise ValueError(f"FastVLM: {len(plist)} prompts but {n} image entries; pass one entry per prompt "
                                 "(an image, a list of images, or None)")
            ilist = [[] if im is None else (list(im) if isinstance(im, (list, tuple)) else [im]) for im in images]
        for i, (p, ims) in enumerate(zip(plist, ilist)):
            n = p.count(IMAGE_TOKEN)
            if n != len(ims):
                raise ValueError(f"FastVLM: prompt {i} has {n} {IMAGE_TOKEN} placeholder(s) but {len(ims)} image(s) "
                                 f"were given for it; put one {IMAGE_TOKEN} where each image goes "
                                 f"(predict.py uses '{IMAGE_TOKEN}\\n' + question)")
        return ilist, plist, single

    def _embed_apple(self, text: str, img_emb: List[torch.Tensor]) -> torch.Tensor:
        tok, embed = self.tokenizer, self.language_model.get_input_embeddings()
        ids: List[int] = []
        for j, chunk in enumerate(text.split(IMAGE_TOKEN)):
            if j:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(tok(chunk, add_special_tokens=False)["input_ids"])
        parts, run, k = [], [], 0
        dev = embed.weight.device
        for t in ids + [None]:
            if t is None or t == IMAGE_TOKEN_INDEX:
                if run:
                    parts.append(embed(torch.tensor(run, device=dev)))
                    run = []
                if t is not None:
                    parts.append(img_emb[k])
                    k += 1
            else:
                run.append(t)
        return torch.cat(parts) if parts else embed.weight.new_zeros(0, embed.weight.shape[1])

    def _embed_hf(self, text: str, img_emb: List[torch.Tensor]) -> torch.Tensor:
        tok, embed = self.tokenizer, self.language_model.get_input_embeddings()
        tid = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        if not isinstance(tid, int) or tid == tok.unk_token_id or tid != self.image_token_id:
            raise ValueError(f"FastVLM: the 'hf' placeholder form needs {IMAGE_TOKEN} as a token of the tokenizer with "
                             f"id {self.image_token_id}; this tokenizer maps it to {tid}. Use placeholder='apple'.")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        expanded: List[int] = []
        for t in ids:
            expanded.extend([t] * (img_emb[0].shape[0] if t == tid and img_emb else 1))
        idt = torch.tensor(expanded, device=embed.weight.device, dtype=torch.long)
        mask = idt == tid
        emb = embed(torch.where(mask, torch.zeros_like(idt), idt))
        if mask.any():
            feats = torch.cat(img_emb).to(emb.dtype)
            if int(mask.sum()) != feats.shape[0]:
                raise ValueError(f"FastVLM: {int(mask.sum())} image slots for {feats.shape[0]} image tokens")
            emb = emb.masked_scatter(mask[:, None], feats)
        return emb

    def prepare_inputs(self, images=None, prompts: Union[str, Sequence[str]] = "", placeholder: str = "apple",
                       chat_template: bool = True, timing: Optional[TTFT] = None) -> dict:
        """Embeddings, attention mask and position ids of a (left-padded) batch, ready for the LLM.

        ``prompts``: a str (with its image or list of images) or a list of str with one entry per
        prompt in ``images`` (an image, a list of images or None). Each image fills one ``<image>``."""
        if self.tokenizer is None:
            raise MissingTokenizerError("FastVLM: no tokenizer; pass one to the constructor or from_pretrained")
        if placeholder not in ("apple", "hf"):
            raise ValueError(f"FastVLM: placeholder must be 'apple' or 'hf', got {placeholder!r}")
        timing = timing if timing is not None else TTFT()
        ilist, plist, _ = self._normalise(images, prompts)
        flat = [im for ims in ilist for im in ims]
        emb_dev = self.language_model.get_input_embeddings().weight.device
        t0 = time.perf_counter()
        if flat:
            if all(isinstance(im, torch.Tensor) and im.dim() == 3 for im in flat):
                pixels = torch.stack(flat)
            else:
                pixels = self.load_images(flat)
        timing.preprocess += time.perf_counter() - t0
        img_emb = list(self.encode_images(pixels, timing)) if flat else []
        seqs, k = [], 0
        with torch.no_grad():
            for p, ims in zip(plist, ilist):
                text = chat_prompt(p, self.system_prompt) if chat_template else p
                mine = img_emb[k:k + len(ims)]
                k += len(ims)
                e = (self._embed_apple if placeholder == "apple" else self._embed_hf)(text, mine)
                if e.shape[0] > self.max_length:
                    e = e[: self.max_length]   # predict.py truncates to tokenizer_model_max_length
                if e.shape[0] == 0:
                    raise ValueError("FastVLM: an empty prompt (no tokens, no image)")
                seqs.append(e)
        L = max(e.shape[0] for e in seqs)
        H = seqs[0].shape[1]
        embeds = seqs[0].new_zeros(len(seqs), L, H)
        mask = torch.zeros(len(seqs), L, dtype=torch.long, device=emb_dev)
        for i, e in enumerate(seqs):
            embeds[i, L - e.shape[0]:] = e
            mask[i, L - e.shape[0]:] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        timing.prompt_tokens = L
        return {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": pos}

    @torch.no_grad()
    def logits(self, images=None, prompts: Union[str, Sequence[str]] = "", placeholder: str = "apple",
               chat_template: bool = True) -> torch.Tensor:
        """The LLM's logits (B, L, vocab) over the whole (left-padded) prompt."""
        inp = self.prepare_inputs(images, prompts, placeholder, chat_template)
        return self.language_model(**inp, use_cache=False).logits

    # ------------------------------------------------------------------------------------------ generate
    def _stop_ids(self) -> set:
        tok = self.tokenizer
        ids = set()
        for t in ("<|im_end|>", "<|endoftext|>"):
            i = tok.convert_tokens_to_ids(t)
            if isinstance(i, int) and i != tok.unk_token_id and i is not None:
                ids.add(i)
        if tok.eos_token_id is not None:
            ids.add(tok.eos_token_id)
        gc = getattr(self.language_model, "generation_config", None)
        e = getattr(gc, "eos_token_id", None) if gc is not None else None
        if e is not None:
            ids.update([e] if isinstance(e, int) else e)
        return ids

    @torch.no_grad()
    def generate(self, images=None, prompts: Union[str, Sequence[str]] = "", max_new_tokens: int = 128,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: Optional[int] = None,
                 streamer: Optional[Callable[[int, str], None]] = None, placeholder: str = "apple",
                 chat_template: bool = True, stop: bool = True) -> GenerationOutput:
        """Answer ``prompts`` about ``images``; greedy unless ``do_sample``.

        ``streamer(i, text)`` is called with each new piece of text of prompt i as it is decoded.
        The result holds the texts, token ids, :class:`TTFT` (preprocess + encode + project + prefill
        + first token) and the decode rate after the first token. ``stop=False`` ignores end-of-turn
        tokens (fixed-length runs for benchmarks)."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if do_sample and not (temperature > 0 and 0 < top_p <= 1):
            raise ValueError(f"generate: sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        timing = TTFT()
        inp = self.prepare_inputs(images, prompts, placeholder, chat_template, timing)
        lm = self.language_model
        dev = inp["inputs_embeds"].device
        gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
        t0 = _now(dev)
        cache_kw = _cache_argument(lm)
        out = lm(**inp, use_cache=True, logits_to_keep=1)
        t1 = _now(dev)
        timing.prefill = t1 - t0
        B = inp["inputs_embeds"].shape[0]
        stop_ids = self._stop_ids() if stop else set()

        def pick(logits):
            logits = logits.float()
            if not do_sample:
                return logits.argmax(-1)
            probs = torch.softmax(logits / temperature, -1)
            if top_p < 1:
                sp, si = probs.sort(-1, descending=True)
                keep = sp.cumsum(-1) - sp < top_p
                sp = sp * keep
                return si.gather(-1, torch.multinomial(sp, 1, generator=gen)).squeeze(-1)
            return torch.multinomial(probs, 1, generator=gen).squeeze(-1)

        first_logits = out.logits[:, -1].float()
        nxt = pick(first_logits)
        tokens: List[List[int]] = [[] for _ in range(B)]
        done = [False] * B
        emitted = [""] * B

        def push(step_ids):
            for i, t in enumerate(step_ids.tolist()):
                if done[i]:
                    continue
                if t in stop_ids:
                    done[i] = True
                    continue
                tokens[i].append(t)
                if streamer is not None:
                    text = self.tokenizer.decode(tokens[i], skip_special_tokens=True)
                    if not text.endswith("\ufffd") and text.startswith(emitted[i]) and len(text) > len(emitted[i]):
                        streamer(i, text[len(emitted[i]):])
                        emitted[i] = text

        push(nxt)
        timing.first_token = _now(dev) - t1
        past, mask, pos = out[cache_kw], inp["attention_mask"], inp["position_ids"][:, -1:]
        n_new, t2 = 0, _now(dev)
        for _ in range(max_new_tokens - 1):
            if all(done):
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            pos = pos + 1
            out = lm(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True, **{cache_kw: past})
            past = out[cache_kw]
            nxt = pick(out.logits[:, -1])
            n_new += sum(not d for d in done)
            push(nxt)
        decode = _now(dev) - t2
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
        if streamer is not None:   # flush what a trailing partial character held back
            for i, t in enumerate(texts):
                if len(t) > len(emitted[i]) and t.startswith(emitted[i]):
                    streamer(i, t[len(emitted[i]):])
        return GenerationOutput(texts, tokens, timing, decode, n_new, first_logits)


def _timm_model_args(cfg: FastViTHDConfig) -> dict:
    """timm ``create_model`` arguments that build ``cfg`` as a ``fastvit_mci3`` in inference form:
    only the fields where ``cfg`` differs from the released architecture (none for it)."""
    args: dict = {"inference_mode": True}
    default = FastViTHDConfig()
    if cfg.layers != default.layers:
        args["layers"] = list(cfg.layers)
    if cfg.embed_dims != default.embed_dims:
        args["embed_dims"] = list(cfg.embed_dims)
    if cfg != FastViTHDConfig(layers=cfg.layers, embed_dims=cfg.embed_dims):
        raise ValueError(f"save_pretrained(layout='hf'): this vision tower's configuration {cfg.to_dict()} differs "
                         "from fastvit_mci3 in more than its layers and widths; timm cannot build it from the HF config")
    return args


def _cache_argument(lm: nn.Module) -> str:
    """The name under which this transformers' causal LM takes and returns its KV cache: ``cache``
    from transformers 5.25 on (where ``past_key_values`` is deprecated, to be removed in 5.40),
    ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def _now(dev) -> float:
    if isinstance(dev, torch.device) and dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


def _open_image(path):
    from PIL import Image, UnidentifiedImageError
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"FastVLM: image file not found: {p!r}")
    try:
        with Image.open(p) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"FastVLM: cannot read image {p!r}: {type(e).__name__}: {e}") from e
