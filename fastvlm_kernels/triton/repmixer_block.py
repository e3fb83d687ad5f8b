"""``repmixer_block`` on the triton backend: the mixer's dw3x3 (``dw_kernel``), then convffn on its
output."""
from .convffn import run as convffn
from .launch import dw


def run(x, mix_w, mix_b, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma):
    k = mix_w.shape[0]
    m = dw(x, mix_w, mix_b, 1, k // 2, False)
    return convffn(m, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma)
