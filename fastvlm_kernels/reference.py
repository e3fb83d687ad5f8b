"""Reference implementations of the fused ops: eager torch, the same math as ``fastvlm``.

Every function takes NHWC activations ``(B, H, W, C)`` and the packed weights of its op contract
(see ``ops.py``), computes in float32 (float64 when given float64) and returns the input's dtype.
They are the ``reference`` backend, the ground truth of the CPU and Triton kernels, and the fallback
when no other backend is available. They are not fast (they go through NCHW convolutions).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["stem", "repmixer_block", "convffn", "patch_embed", "dwconv", "attention_mixer", "conv_exp",
           "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp32/bf16/fp16 storage; float64 stays float64 (for exact references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _nchw(x: torch.Tensor, ct: torch.dtype) -> torch.Tensor:
    return x.to(ct).permute(0, 3, 1, 2)


def _nhwc(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return y.permute(0, 2, 3, 1).contiguous().to(dtype)


def _dw(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], stride: int, padding: int) -> torch.Tensor:
    """Depthwise conv of NCHW ``x`` with a packed (K, K, Cout) weight (Cout = C·M)."""
    ct = x.dtype
    weight = w.to(ct).permute(2, 0, 1).unsqueeze(1)  # (Cout, 1, K, K)
    return F.conv2d(x, weight, None if b is None else b.to(ct), stride, padding, groups=x.shape[1])


def _pw(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """1x1 conv of NCHW ``x`` with a (Cout, Cin) weight."""
    ct = x.dtype
    return F.conv2d(x, w.to(ct)[:, :, None, None], None if b is None else b.to(ct))


def stem(x, w0, b0, w1, b1, w2, b2):
    """GELU(conv3x3 s2 (w0: (C, Cin, 3, 3))) -> GELU(dw3x3 s2 (w1: (3, 3, C))) -> GELU(1x1 (w2: (C, C)))."""
    ct = compute_dtype(x.dtype)
    h = F.gelu(F.conv2d(_nchw(x, ct), w0.to(ct), b0.to(ct), 2, 1))
    h = F.gelu(_dw(h, w1, b1, 2, 1))
    h = F.gelu(_pw(h, w2, b2))
    return _nhwc(h, x.dtype)


def _ffn(h, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b):
    k = ffn_w.shape[0]
    t = _dw(h, ffn_w, ffn_b, 1, k // 2)
    return _pw(F.gelu(_pw(t, fc1_w, fc1_b)), fc2_w, fc2_b)


def repmixer_block(x, mix_w, mix_b, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma):
    """m = dw3x3(x) (residual folded in); y = m + gamma·fc2(GELU(fc1(dw7x7_bnfolded(m))))."""
    ct = compute_dtype(x.dtype)
    k = mix_w.shape[0]
    m = _dw(_nchw(x, ct), mix_w, mix_b, 1, k // 2)
    y = m + gamma.to(ct)[None, :, None, None] * _ffn(m, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b)
    return _nhwc(y, x.dtype)


def convffn(x, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma):
    """y = x + gamma·fc2(GELU(fc1(dw7x7_bnfolded(x))))."""
    ct = compute_dtype(x.dtype)
    h = _nchw(x, ct)
    y = h + gamma.to(ct)[None, :, None, None] * _ffn(h, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b)
    return _nhwc(y, x.dtype)


def patch_embed(x, dw_w, dw_b, pw_w, pw_b):
    """GELU(dw7x7 s2 p3, channel multiplier Cout/C) -> GELU(1x1)."""
    ct = compute_dtype(x.dtype)
    k = dw_w.shape[0]
    h = F.gelu(_dw(_nchw(x, ct), dw_w, dw_b, 2, k // 2))
    return _nhwc(F.gelu(_pw(h, pw_w, pw_b)), x.dtype)


def dwconv(x, w, b, stride: int, padding: int, gelu: bool):
    """Generic depthwise k x k conv (channel multiplier Cout/C), bias, optional GELU."""
    ct = compute_dtype(x.dtype)
    h = _dw(_nchw(x, ct), w, b, stride, padding)
    return _nhwc(F.gelu(h) if gelu else h, x.dtype)


def attention_mixer(x, ln_w, ln_b, qkv_w, proj_w, proj_b, gamma, head_dim: int):
    """y = x + gamma·proj(MHSA(LayerNormChannel(x))); qkv (3C, C) without bias, output features
    ordered [q | k | v] with contiguous heads of ``head_dim``; softmax scale head_dim**-0.5."""
    ct = compute_dtype(x.dtype)
    B, H, W, C = x.shape
    N, heads = H * W, C // head_dim
    t = x.to(ct).reshape(B, N, C)
    u = t.mean(-1, keepdim=True)
    s = (t - u).pow(2).mean(-1, keepdim=True)
    n = (t - u) / torch.sqrt(s + 1e-5) * ln_w.to(ct) + ln_b.to(ct)
    qkv = F.linear(n, qkv_w.to(ct)).reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = ((q * head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    o = (attn @ v).transpose(1, 2).reshape(B, N, C)
    y = t + gamma.to(ct) * F.linear(o, proj_w.to(ct), proj_b.to(ct))
    return y.reshape(B, H, W, C).to(x.dtype).contiguous()


def conv_exp(x, w, b, se_r_w, se_r_b, se_e_w, se_e_b):
    """GELU(SE(dw3x3, channel multiplier Cout/C)); SE = mean -> 1x1 -> ReLU -> 1x1 -> sigmoid -> scale."""
    ct = compute_dtype(x.dtype)
    k = w.shape[0]
    h = _dw(_nchw(x, ct), w, b, 1, k // 2)
    s = h.mean(dim=(2, 3))  # (B, Cout)
    s = torch.sigmoid(F.linear(F.relu(F.linear(s, se_r_w.to(ct), se_r_b.to(ct))), se_e_w.to(ct), se_e_b.to(ct)))
    return _nhwc(F.gelu(h * s[:, :, None, None]), x.dtype)


# ---- the backend's declaration ---------------------------------------------------------------------
def _register_kernels() -> None:
    from . import ops
    for op in ops.OPS:
        ops.register_kernel(op, "reference", globals()[op])


def _declare() -> None:
    from . import backends
    backends.register(backends.Backend(
        name="reference", devices=None, dtypes=(torch.float32, torch.bfloat16, torch.float16),
        load=_register_kernels))


_declare()
