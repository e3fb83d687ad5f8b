"""``repmixer_block`` on the cpu backend: csrc/ops/repmixer.cpp (kernels/repmixer.h): the
ConvFFN of convffn.py one rectangle of pixels at a time, with the RepMixer's dw3x3 output over the
rectangle and its 7x7 halo kept in per-thread float32 scratch (for bf16 too)."""
from .isa import C, uses_bf16_pairs
from .packing import packed

#: the 1x1 weights whose GEMM multiplies bf16 pairs (packed by pack_linear_bf16) on AVX512_BF16
PAIRS = ("fc1_w", "fc2_w")


def run(x, mix_w, mix_b, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma):
    pairs = uses_bf16_pairs(x.dtype)
    return C.repmixer_nhwc(x, mix_w, mix_b, ffn_w, ffn_b, packed(fc1_w, pairs), fc1_b, packed(fc2_w, pairs), fc2_b,
                           gamma)
