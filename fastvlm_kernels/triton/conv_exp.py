"""``conv_exp`` on the triton backend: ``dw_kernel`` with per-tile channel sums, the SE from those
sums (``se_kernel``), then GELU(y·s) in place (``scale_gelu_kernel``): two passes over the output."""
import torch
import triton

from .launch import dw, launch, pow2


def run(x, w, b, se_r_w, se_r_b, se_e_w, se_e_b):
    B = x.shape[0]
    y, part = dw(x, w, b, 1, w.shape[0] // 2, False, sums=True)  # pass 1: conv + per-tile channel sums
    if B == 0:
        return y
    _, Ho, Wo, cout = y.shape
    rd = se_r_w.shape[0]
    s = torch.empty(B, cout, device=x.device, dtype=torch.float32)
    launch("se_kernel", lambda m: (B,), part, se_r_w, se_r_b, se_e_w, se_e_b, s, part.shape[1], cout, rd,
           1.0 / (Ho * Wo), RDP=pow2(rd))
    hwc = Ho * Wo * cout
    launch("scale_gelu_kernel", lambda m: (triton.cdiv(hwc, m["BLOCK"]), B), y, s, hwc, cout)  # pass 2
    return y
