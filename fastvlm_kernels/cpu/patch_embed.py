"""``patch_embed`` on the cpu backend: csrc/ops/patch_embed.cpp (kernels/patch_embed.h):
dw7x7 s2 x2 + GELU -> 1x1 + GELU per tile of pixels."""
from .isa import C, uses_bf16_pairs
from .packing import packed

#: the 1x1 weights whose GEMM multiplies bf16 pairs (packed by pack_linear_bf16) on AVX512_BF16
PAIRS = ("pw_w",)


def run(x, dw_w, dw_b, pw_w, pw_b):
    return C.patch_embed_nhwc(x, dw_w, dw_b, packed(pw_w, uses_bf16_pairs(x.dtype)), pw_b, 2)
