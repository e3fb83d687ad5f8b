"""The ``triton`` backend's op wrappers: the seven ops as launches of the Triton kernels of
``kernels.py``, registered per op when the backend loads (``fastvlm_kernels.triton``).

CUDA tensors in fp32 / fp16 / bf16 (fp32 accumulation; fp32 GEMMs use IEEE fp32, not TF32, to keep
the fp32 parity bound). With ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors through
Triton's interpreter (fp32 / fp16 only: the interpreter has no bf16), which is how CI checks their
numerics without a GPU.

Launches are CUDA-graph capturable: no host synchronisation, no data-dependent control flow, and
output / scratch buffers come from the caching allocator. On a GPU each kernel is autotuned over
``kernels.CONFIGS`` on its first call for a shape, so warm up once before capturing a graph.
"""
from __future__ import annotations

import os

import torch
import triton

from .. import ops
from . import kernels as K

__all__ = ["INTERPRET", "FFN_FUSED_MAX_C", "launch_config"]

from . import INTERPRET  # noqa: E402
#: Widest C the fully fused FFN kernel takes (3 register accumulators of 64 columns); wider FFNs
#: use fc1+GELU -> hidden -> fc2+epilogue (one round trip of the 4C hidden tensor). Measured with
#: the AOT check (python -m fastvlm_kernels.triton.aot): at C = 384 (three 128-column
#: accumulators) every tile tried (BLOCK_M 64/128, BLOCK_K 32/64, BLOCK_H 16/32, 4/8 warps) spilled
#: 64-1752 B of registers on sm_90 and sm_80, so stage 2 takes the split path for now.
FFN_FUSED_MAX_C = 192
_I32 = 2 ** 31

#: Shape arguments each autotuned kernel is keyed on.
_KEYS = {
    "dw_kernel": ["Cout", "Wo", "STRIDE"],
    "ffn_fused_kernel": ["C", "HID"],
    "linear_kernel": ["N", "K"],
    "attention_kernel": ["N", "HEAD_DIM"],
    "stem_kernel": ["C"],
    "patch_embed_kernel": ["Cout"],
    "se_kernel": ["C"],
    "scale_gelu_kernel": ["C"],
}
_tuned = {}


def _autotuned(name):
    if name not in _tuned:
        cfgs = []
        for c in K.CONFIGS[name]:
            c = dict(c)
            nw, ns = c.pop("num_warps"), c.pop("num_stages")
            cfgs.append(triton.Config(c, num_warps=nw, num_stages=ns))
        _tuned[name] = triton.autotune(configs=cfgs, key=_KEYS[name])(K.KERNELS[name])
    return _tuned[name]


def launch_config(name):
    """The configuration the interpreter runs (the first of kernels.CONFIGS[name])."""
    c = dict(K.CONFIGS[name][0])
    c.pop("num_stages")
    return c


def _launch(name, grid, *args, fixed=False, **consts):
    """Run kernel ``name``: autotuned on a GPU, its first configuration under the interpreter or
    when ``fixed``. ``grid`` maps the tile constexprs to the launch grid."""
    if INTERPRET or fixed:
        cfg = dict(K.CONFIGS[name][0])
        if INTERPRET:
            cfg.pop("num_stages")
        K.KERNELS[name][grid(cfg)](*args, **consts, **cfg)
    else:
        _autotuned(name)[grid](*args, **consts)


def _prec(x):
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _pow2(n, lo=16):
    return max(lo, triton.next_power_of_2(int(n)))


def _conv_out(n, k, s, p):
    return (n + 2 * p - k) // s + 1


# --------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------
def _dw(x, w, b, stride, padding, gelu, sums=False):
    B, H, W, Cin = x.shape
    k, cout = w.shape[0], w.shape[2]
    Ho, Wo = _conv_out(H, k, stride, padding), _conv_out(W, k, stride, padding)
    y = torch.empty(B, Ho, Wo, cout, device=x.device, dtype=x.dtype)
    part = None
    if B == 0:
        return (y, part) if sums else y
    x = x.contiguous()
    if sums:
        # one row of partial sums per (output row, BLOCK_W tile). This launch uses the first
        # configuration, not the autotuner: benchmarking several BLOCK_W on one buffer would leave
        # stale partial rows behind.
        bw = K.CONFIGS["dw_kernel"][0]["BLOCK_W"]
        part = torch.empty(B, Ho * triton.cdiv(Wo, bw), cout, device=x.device, dtype=torch.float32)
    _launch("dw_kernel", lambda m: (B * Ho * triton.cdiv(Wo, m["BLOCK_W"]), triton.cdiv(cout, m["BLOCK_C"])),
            x, w, b if b is not None else w, y, part if part is not None else y, H, W, Cin, Ho, Wo, cout,
            cout // Cin, stride, padding, fixed=sums, K=k, HAS_BIAS=b is not None, GELU=gelu, SUMS=sums)
    return (y, part) if sums else y


def _linear(a, w, b=None, gelu=False, res=None, gamma=None, ln=None, eps=1e-5, out=None):
    """y = [res + gamma·] act(LN(a) @ w.T + b) for a (M, K) row-major, w (N, K)."""
    M, Kd = a.shape
    N = w.shape[0]
    if M * max(N, Kd) >= _I32:
        raise ValueError(f"fastvlm triton: {M} x {max(N, Kd)} elements exceed the kernels' int32 offsets; "
                         "split the batch")
    y = out if out is not None else torch.empty(M, N, device=a.device, dtype=a.dtype)
    if M == 0:
        return y
    lnw, lnb = ln if ln is not None else (w, w)
    _launch("linear_kernel", lambda m: (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),),
            a, w, b if b is not None else w, res if res is not None else a, gamma if gamma is not None else w,
            lnw, lnb, y, M, N, Kd, eps, HAS_BIAS=b is not None, GELU=gelu, RESIDUAL=res is not None,
            LN=ln is not None, PREC=_prec(a))
    return y


def _ffn_from_t(t, res, fc1_w, fc1_b, fc2_w, fc2_b, gamma):
    """res + gamma·(fc2(GELU(fc1(t))) + b2) over NHWC t, res."""
    B, H, W, C = t.shape
    M, HID = B * H * W, fc1_w.shape[0]
    y = torch.empty(res.shape, device=res.device, dtype=res.dtype)
    if M == 0:
        return y
    if M * max(C, HID) >= _I32:
        raise ValueError(f"fastvlm triton: {M} x {HID} elements exceed the kernels' int32 offsets; split the batch")
    t2, r2 = t.reshape(M, C), res.contiguous().reshape(M, C)
    if C <= FFN_FUSED_MAX_C:
        bo = _pow2(triton.cdiv(C, 3))
        _launch("ffn_fused_kernel", lambda m: (triton.cdiv(M, m["BLOCK_M"]),),
                t2, r2, fc1_w, fc1_b, fc2_w, fc2_b, gamma, y, M, C, HID,
                BLOCK_O=bo, NB=triton.cdiv(C, bo), PREC=_prec(t))
    else:  # one round trip of the hidden tensor (see FFN_FUSED_MAX_C)
        hid = _linear(t2, fc1_w, fc1_b, gelu=True)
        _linear(hid, fc2_w, fc2_b, res=r2, gamma=gamma, out=y.view(M, C))
    return y


# --------------------------------------------------------------------------------------------------
# the seven ops
# --------------------------------------------------------------------------------------------------
def _dwconv(x, w, b, stride, padding, gelu):
    return _dw(x, w, b, stride, padding, gelu)


def _convffn(x, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma):
    k = ffn_w.shape[0]
    t = _dw(x, ffn_w, ffn_b, 1, k // 2, False)  # the dw7x7 output: C wide, written once
    return _ffn_from_t(t, x, fc1_w, fc1_b, fc2_w, fc2_b, gamma)


def _repmixer_block(x, mix_w, mix_b, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma):
    k = mix_w.shape[0]
    m = _dw(x, mix_w, mix_b, 1, k // 2, False)
    return _convffn(m, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma)


def _stem(x, w0, b0, w1, b1, w2, b2):
    B, H, W, cin = x.shape
    C = w0.shape[0]
    H1, W1 = _conv_out(H, 3, 2, 1), _conv_out(W, 3, 2, 1)
    Ho, Wo = _conv_out(H1, 3, 2, 1), _conv_out(W1, 3, 2, 1)
    y = torch.empty(B, Ho, Wo, C, device=x.device, dtype=x.dtype)
    M = B * Ho * Wo
    if M == 0:
        return y
    _launch("stem_kernel", lambda m: (triton.cdiv(M, m["BLOCK_M"]),),
            x.contiguous(), w0.contiguous(), b0, w1, b1, w2, b2, y, H, W, H1, W1, Ho, Wo, C, M,
            CIN=cin, CP=_pow2(C), PREC=_prec(x))
    return y


def _patch_embed(x, dw_w, dw_b, pw_w, pw_b):
    B, H, W, cin = x.shape
    k, cout = dw_w.shape[0], dw_w.shape[2]
    Ho, Wo = _conv_out(H, k, 2, k // 2), _conv_out(W, k, 2, k // 2)
    y = torch.empty(B, Ho, Wo, cout, device=x.device, dtype=x.dtype)
    M = B * Ho * Wo
    if M == 0:
        return y
    _launch("patch_embed_kernel", lambda m: (triton.cdiv(M, m["BLOCK_M"]), triton.cdiv(cout, m["BLOCK_N"])),
            x.contiguous(), dw_w, dw_b, pw_w, pw_b, y, H, W, cin, Ho, Wo, cout, M, K=k, PREC=_prec(x))
    return y


def _attention_mixer(x, ln_w, ln_b, qkv_w, proj_w, proj_b, gamma, head_dim):
    B, H, W, C = x.shape
    N, M = H * W, B * H * W
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if M == 0:
        return y
    x2 = x.contiguous().reshape(M, C)
    qkv = _linear(x2, qkv_w, ln=(ln_w, ln_b))                 # LayerNormChannel in the prologue
    o = torch.empty(M, C, device=x.device, dtype=x.dtype)
    heads = C // head_dim
    _launch("attention_kernel", lambda m: (triton.cdiv(N, m["BLOCK_M"]), B * heads),
            qkv, o, N, C, heads, head_dim, head_dim ** -0.5, HDP=_pow2(head_dim), PREC=_prec(x))
    _linear(o, proj_w, proj_b, res=x2, gamma=gamma, out=y.view(M, C))  # proj + layer scale + residual
    return y


def _conv_exp(x, w, b, se_r_w, se_r_b, se_e_w, se_e_b):
    B = x.shape[0]
    y, part = _dw(x, w, b, 1, w.shape[0] // 2, False, sums=True)  # pass 1: conv + per-tile channel sums
    if B == 0:
        return y
    _, Ho, Wo, cout = y.shape
    rd = se_r_w.shape[0]
    s = torch.empty(B, cout, device=x.device, dtype=torch.float32)
    _launch("se_kernel", lambda m: (B,), part, se_r_w, se_r_b, se_e_w, se_e_b, s, part.shape[1], cout, rd,
            1.0 / (Ho * Wo), RDP=_pow2(rd))
    hwc = Ho * Wo * cout
    _launch("scale_gelu_kernel", lambda m: (triton.cdiv(hwc, m["BLOCK"]), B), y, s, hwc, cout)  # pass 2
    return y


for _name, _fn in (("stem", _stem), ("repmixer_block", _repmixer_block), ("convffn", _convffn),
                   ("patch_embed", _patch_embed), ("dwconv", _dwconv), ("attention_mixer", _attention_mixer),
                   ("conv_exp", _conv_exp)):
    ops.register_kernel(_name, "triton", _fn)
