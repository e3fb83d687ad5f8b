"""``convffn`` on the triton backend: ``dw_kernel`` writes the dw7x7 output once, then the FFN (fully
fused for C <= FFN_FUSED_MAX_C, else with one round trip of the hidden tensor; launch.ffn_from_t)."""
from .launch import dw, ffn_from_t


def run(x, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma):
    k = ffn_w.shape[0]
    t = dw(x, ffn_w, ffn_b, 1, k // 2, False)  # the dw7x7 output: C wide, written once
    return ffn_from_t(t, x, fc1_w, fc1_b, fc2_w, fc2_b, gamma)
