"""``stem`` on the cpu backend: csrc/ops/stem.cpp (kernels/stem.h): per block of 4 x 32
final pixels, the intermediate pixels its windows cover are computed (a GEMM over 3x3 patches) into the
tile, about 1.14 times each, instead of stored at full resolution. fp32 GEMMs for bf16 too."""
from .isa import C
from .packing import packed

#: the 1x1 weights whose GEMM multiplies bf16 pairs (packed by pack_linear_bf16) on AVX512_BF16
PAIRS = ()


def run(x, w0, b0, w1, b1, w2, b2):
    return C.stem_nhwc(x, w0, b0, w1, b1, packed(w2), b2)
