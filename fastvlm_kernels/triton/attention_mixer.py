"""``attention_mixer`` on the triton backend: the qkv GEMM with LayerNormChannel in its prologue,
flash attention (``attention_kernel``), proj with the bias + layer scale + residual epilogue."""
import torch
import triton

from .launch import check_i32, launch, linear, pow2, prec


def run(x, ln_w, ln_b, qkv_w, proj_w, proj_b, gamma, head_dim):
    B, H, W, C = x.shape
    N, M = H * W, B * H * W
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if M == 0:
        return y
    check_i32("attention_mixer", qkv_per_image=N * 3 * C)
    x2 = x.reshape(M, C)
    qkv = linear(x2, qkv_w, ln=(ln_w, ln_b))                 # LayerNormChannel in the prologue
    o = torch.empty(M, C, device=x.device, dtype=x.dtype)
    heads = C // head_dim
    launch("attention_kernel", lambda m: (triton.cdiv(N, m["BLOCK_M"]), B * heads),
           qkv, o, N, C, heads, head_dim, head_dim ** -0.5, HDP=pow2(head_dim), PREC=prec(x),
           shape=dict(N=N, HEAD_DIM=head_dim), dtype=x.dtype)
    linear(o, proj_w, proj_b, res=x2, gamma=gamma, out=y.view(M, C))  # proj + layer scale + residual
    return y
