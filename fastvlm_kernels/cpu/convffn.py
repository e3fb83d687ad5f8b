"""``convffn`` on the cpu backend: csrc/ops/convffn.cpp (kernels/convffn.h; bf16 pairs:
kernels/bf16_pairs.h): dw7x7 -> fc1 -> GELU -> fc2 -> layer scale + residual, one tile of pixels at a
time, the 4C hidden kept in cache."""
from .isa import C, uses_bf16_pairs
from .packing import packed

#: the 1x1 weights whose GEMM multiplies bf16 pairs (packed by pack_linear_bf16) on AVX512_BF16
PAIRS = ("fc1_w", "fc2_w")


def run(x, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma):
    pairs = uses_bf16_pairs(x.dtype)
    return C.convffn_nhwc(x, ffn_w, ffn_b, packed(fc1_w, pairs), fc1_b, packed(fc2_w, pairs), fc2_b, gamma)
