"""``conv_exp`` on the triton backend: ``dw_kernel`` with per-tile channel sums, the SE from those
sums (``se_reduce_kernel`` over blocks of the reduced channels, ``se_expand_kernel`` over blocks of
the output channels), then GELU(y·s) in place (``scale_gelu_kernel``): two passes over the output."""
import torch
import triton

from .launch import check_i32, dw, launch, pow2


def run(x, w, b, se_r_w, se_r_b, se_e_w, se_e_b):
    B = x.shape[0]
    y, part = dw(x, w, b, 1, w.shape[0] // 2, False, sums=True)  # pass 1: conv + per-tile channel sums
    if B == 0:
        return y
    _, Ho, Wo, cout = y.shape
    rd = se_r_w.shape[0]
    hwc = Ho * Wo * cout
    check_i32("conv_exp", y_per_image=hwc)
    red = torch.empty(B, rd, device=x.device, dtype=torch.float32)
    s = torch.empty(B, cout, device=x.device, dtype=torch.float32)
    launch("se_reduce_kernel", lambda m: (B, triton.cdiv(rd, m["BLOCK_R"])), part, se_r_w, se_r_b, red,
           part.shape[1], cout, rd, 1.0 / (Ho * Wo), shape={}, dtype=x.dtype)
    launch("se_expand_kernel", lambda m: (B, triton.cdiv(cout, m["BLOCK_C"])), red, se_e_w, se_e_b, s, cout, rd,
           RDP=pow2(rd), shape={}, dtype=x.dtype)
    launch("scale_gelu_kernel", lambda m: (triton.cdiv(hwc, m["BLOCK"]), B), y, s, hwc, cout,
           shape={}, dtype=x.dtype)  # pass 2
    return y
