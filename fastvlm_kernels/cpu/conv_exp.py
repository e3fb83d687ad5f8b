"""``conv_exp`` on the cpu backend: csrc/ops/conv_exp.cpp (kernels/conv_exp.h): the dw conv
with per-row channel sums, SE, then GELU(z·s): two passes, vectorised per ISA."""
from .isa import C

#: the 1x1 weights whose GEMM multiplies bf16 pairs (packed by pack_linear_bf16) on AVX512_BF16
PAIRS = ()


def run(x, w, b, se_r_w, se_r_b, se_e_w, se_e_b):
    return C.conv_exp_nhwc(x, w, b, se_r_w, se_r_b, se_e_w, se_e_b)
