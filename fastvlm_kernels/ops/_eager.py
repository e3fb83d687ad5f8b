"""Eager-torch helpers of the reference implementations (``ops/<op>.py``'s ``reference``): NHWC in
and out, NCHW convolutions in between, float32 compute (float64 when given float64)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp32/bf16/fp16 storage; float64 stays float64 (for exact references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def nchw(x: torch.Tensor, ct: torch.dtype) -> torch.Tensor:
    return x.to(ct).permute(0, 3, 1, 2)


def nhwc(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return y.permute(0, 2, 3, 1).contiguous().to(dtype)


def dw(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], stride: int, padding: int) -> torch.Tensor:
    """Depthwise conv of NCHW ``x`` with a packed (K, K, Cout) weight (Cout = C·M)."""
    ct = x.dtype
    weight = w.to(ct).permute(2, 0, 1).unsqueeze(1)  # (Cout, 1, K, K)
    return F.conv2d(x, weight, None if b is None else b.to(ct), stride, padding, groups=x.shape[1])


def pw(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """1x1 conv of NCHW ``x`` with a (Cout, Cin) weight."""
    ct = x.dtype
    return F.conv2d(x, w.to(ct)[:, :, None, None], None if b is None else b.to(ct))


def ffn(h, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b):
    """fc2(GELU(fc1(dw7x7_bnfolded(h)))) of NCHW ``h`` (the ConvFFN without its layer scale)."""
    k = ffn_w.shape[0]
    t = dw(h, ffn_w, ffn_b, 1, k // 2)
    return pw(F.gelu(pw(t, fc1_w, fc1_b)), fc2_w, fc2_b)
