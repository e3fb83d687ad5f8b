"""Helpers for tests and benchmarks: weights that make every branch of the network visible.

The released init puts layer scales at 1e-5, which hides broken FFN / attention / mixer branches
from any parity check. :func:`randomize_` gives every parameter and BatchNorm statistic a random
O(1)-effect value (design.md §5): layer scales ~U(0.5, 1.5), running_mean ~N(0, 0.2),
running_var ~U(0.5, 2), conv / linear weights with fan-in scaling.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["randomize_", "rel_l2"]


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
