"""Re-parameterization math (docs/model.md): folding BatchNorm into convs and merging branches.

Pure functions on tensors, shared by the model's ``reparameterize()`` and by the kernels (which fold
the ConvFFN BatchNorm into the 7x7 depthwise weights with :func:`fold_convffn_bn`).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn


def bn_scale_shift(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = t·x + s: t = γ/√(σ²+ε), s = β − μ·t."""
    t = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return t, bn.bias - bn.running_mean * t


def fuse_conv_bn(weight: torch.Tensor, bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """conv (no bias) followed by BN -> one conv with bias: W' = W·t, b' = β − μ·t (§2.1)."""
    t, s = bn_scale_shift(bn)
    return weight * t.reshape(-1, 1, 1, 1), s


def pad_kernel(weight: torch.Tensor, k: int) -> torch.Tensor:
    """Zero-pad a (Cout, Cin/g, kh, kw) kernel symmetrically to k x k (centres stay aligned)."""
    p = (k - weight.shape[-1]) // 2
    return torch.nn.functional.pad(weight, [p, p, p, p])


def identity_kernel(channels: int, groups: int, k: int, dtype=None, device=None) -> torch.Tensor:
    """Kernel of a k x k conv (``groups`` groups, Cout == Cin) that computes the identity."""
    cin_g = channels // groups
    w = torch.zeros(channels, cin_g, k, k, dtype=dtype, device=device)
    idx = torch.arange(channels, device=device)
    w[idx, idx % cin_g, k // 2, k // 2] = 1
    return w


def make_conv(weight: torch.Tensor, bias: torch.Tensor, stride: int, padding: int, groups: int) -> nn.Conv2d:
    """An nn.Conv2d (with bias) holding the given folded weights, on their device and dtype."""
    cout, cin_g, kh, kw = weight.shape
    conv = nn.Conv2d(cin_g * groups, cout, (kh, kw), stride, padding, groups=groups, bias=True,
                     device=weight.device, dtype=weight.dtype)
    conv.weight.copy_(weight.detach())
    conv.bias.copy_(bias.detach())
    return conv


@torch.no_grad()
def fold_convffn_bn(convffn) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ConvFFN's depthwise 7x7 (no bias) + eval BatchNorm as one depthwise conv: (W', b').

    W' has shape (d, 1, 7, 7), b' shape (d,). The model keeps the BatchNorm (as the release does);
    the fused kernels consume this fold."""
    return fuse_conv_bn(convffn.conv.conv.weight, convffn.conv.bn)
