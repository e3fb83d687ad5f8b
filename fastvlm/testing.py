"""Helpers for tests and benchmarks: weights that make every branch of the network visible.

The released init puts layer scales at 1e-5, which hides broken FFN / attention / mixer branches
from any parity check. :func:`randomize_` gives every parameter and BatchNorm statistic a random
O(1)-effect value: layer scales ~U(0.5, 1.5), running_mean ~N(0, 0.2),
running_var ~U(0.5, 2), conv / linear weights with fan-in scaling.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["randomize_", "random_tower", "rel_l2", "tiny_tokenizer"]


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, weight_gain: float = 0.5) -> nn.Module:
    """Randomise all weights, BatchNorm statistics and layer scales of ``model`` in place."""
    g = torch.Generator().manual_seed(seed)

    def fill(t, fn):
        t.copy_(fn(torch.empty(t.shape, dtype=torch.float64)).to(t.dtype))

    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if "layer_scale" in name or leaf == "gamma":
            fill(p, lambda e: e.uniform_(0.5, 1.5, generator=g))
        elif p.dim() >= 2:
            fan_in = p[0].numel()
            fill(p, lambda e: e.normal_(0.0, weight_gain / math.sqrt(fan_in), generator=g))
        elif leaf == "weight":  # norm weights
            fill(p, lambda e: e.uniform_(0.5, 1.5, generator=g))
        else:  # biases
            fill(p, lambda e: e.normal_(0.0, 0.1, generator=g))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            fill(m.running_mean, lambda e: e.normal_(0.0, 0.2, generator=g))
            fill(m.running_var, lambda e: e.uniform_(0.5, 2.0, generator=g))
    return model


def random_tower(config=None, seed: int = 0, weight_gain: float = 0.5):
    """A random FastViTHD in the inference form whose output really depends on its input.

    Randomising the *inference* form directly draws each folded kernel (RepMixer, MobileOne, PatchEmbed)
    without the identity the fold puts in it, so every block shrinks the signal and the biases take
    over: for the tiny config two different images then give outputs within rel-L2 1e-7 of each other,
    and a whole-model parity test could not see a kernel that ignores its input. Randomising the train
    form and folding keeps the identities: rel-L2 between two random images' outputs is ~0.1 for the
    default config at gain 0.5 and ~0.17 for tiny at gain 0.85 (larger gains overflow the default
    config's activations)."""
    from .fastvithd import FastViTHD
    m = FastViTHD(config, inference_mode=False)
    randomize_(m, seed=seed, weight_gain=weight_gain)
    return m.eval().reparameterize()


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN/inf in ``out`` give inf (never a pass)."""
    out64, ref64 = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    if out64.shape != ref64.shape:
        raise ValueError(f"rel_l2: shapes differ: {tuple(out64.shape)} vs {tuple(ref64.shape)}")
    if not torch.isfinite(out64).all():
        return float("inf")
    den = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


_TINY_CORPUS = (
    "You are a helpful assistant.", "Describe the image in detail.", "What is in this picture?",
    "A cat sits on a mat next to a red ball.", "The chart shows sales rising over four years.",
    "system user assistant", "There are two people, a dog and a tree in the photo.",
)


def tiny_tokenizer(vocab_size: int = 400):
    """A small byte-level BPE tokenizer with the Qwen2 chat specials and ``<image>``, built locally.

    It is what tests, the CLI test and ``FastVLM.from_config('tiny')`` use offline: any text encodes
    (byte level), ``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>`` and ``<image>`` are single
    special tokens, as in the released Qwen2 tokenizer. Needs ``tokenizers`` and ``transformers``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(list(_TINY_CORPUS) * 8, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=specials[1:])


def cpu_flags() -> frozenset:
    """The x86 feature flags of this machine's CPU as /proc/cpuinfo lists them (``avx2``,
    ``avx512f``, ``avx512_bf16``, ...); empty where there is no /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()
