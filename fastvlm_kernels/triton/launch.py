"""Launching the ``triton`` backend's kernels (``kernels.py``), and the building blocks its op
modules (``triton/<op>.py``) share: the depthwise conv, the GEMM with its prologues and epilogues, the
ConvFFN after its dw conv.

CUDA tensors in fp32 / fp16 / bf16 (fp32 accumulation; fp32 GEMMs use IEEE fp32, not TF32, to keep
the fp32 parity bound). With ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors through
Triton's interpreter (fp32 / fp16 only: the interpreter has no bf16), which is how CI checks their
numerics without a GPU.

Launches are CUDA-graph capturable: no host synchronisation, no data-dependent control flow, and
output / scratch buffers come from the caching allocator. On a GPU each kernel is autotuned over
``kernels.CONFIGS`` on its first call for a shape, so warm up once before capturing a graph.
"""
from __future__ import annotations


import torch
import triton

from . import INTERPRET
from . import kernels as K

__all__ = ["INTERPRET", "FFN_FUSED_MAX_C", "launch_config"]
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


def launch(name, grid, *args, fixed=False, **consts):
    """Run kernel ``name``: autotuned on a GPU, its first configuration under the interpreter or
    when ``fixed``. ``grid`` maps the tile constexprs to the launch grid."""
    if INTERPRET or fixed:
        cfg = dict(K.CONFIGS[name][0])
        if INTERPRET:
            cfg.pop("num_stages")
        K.KERNELS[name][grid(cfg)](*args, **consts, **cfg)
    else:
        _autotuned(name)[grid](*args, **consts)


def prec(x):
    return "ieee" if x.dtype == torch.float32 else "tf32"


def pow2(n, lo=16):
    return max(lo, triton.next_power_of_2(int(n)))


def conv_out(n, k, s, p):
    return (n + 2 * p - k) // s + 1


# --------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------
def dw(x, w, b, stride, padding, gelu, sums=False):
    B, H, W, Cin = x.shape
    k, cout = w.shape[0], w.shape[2]
    Ho, Wo = conv_out(H, k, stride, padding), conv_out(W, k, stride, padding)
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
    launch("dw_kernel", lambda m: (B * Ho * triton.cdiv(Wo, m["BLOCK_W"]), triton.cdiv(cout, m["BLOCK_C"])),
            x, w, b if b is not None else w, y, part if part is not None else y, H, W, Cin, Ho, Wo, cout,
            cout // Cin, stride, padding, fixed=sums, K=k, HAS_BIAS=b is not None, GELU=gelu, SUMS=sums)
    return (y, part) if sums else y


def linear(a, w, b=None, gelu=False, res=None, gamma=None, ln=None, eps=1e-5, out=None):
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
    launch("linear_kernel", lambda m: (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),),
            a, w, b if b is not None else w, res if res is not None else a, gamma if gamma is not None else w,
            lnw, lnb, y, M, N, Kd, eps, HAS_BIAS=b is not None, GELU=gelu, RESIDUAL=res is not None,
            LN=ln is not None, PREC=prec(a))
    return y


def ffn_from_t(t, res, fc1_w, fc1_b, fc2_w, fc2_b, gamma):
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
        bo = pow2(triton.cdiv(C, 3))
        launch("ffn_fused_kernel", lambda m: (triton.cdiv(M, m["BLOCK_M"]),),
                t2, r2, fc1_w, fc1_b, fc2_w, fc2_b, gamma, y, M, C, HID,
                BLOCK_O=bo, NB=triton.cdiv(C, bo), PREC=prec(t))
    else:  # one round trip of the hidden tensor (see FFN_FUSED_MAX_C)
        hid = linear(t2, fc1_w, fc1_b, gelu=True)
        linear(hid, fc2_w, fc2_b, res=r2, gamma=gamma, out=y.view(M, C))
    return y
