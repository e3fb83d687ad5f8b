"""``dwconv`` on the cpu backend: csrc/ops/dwconv.cpp (kernels/depthwise.h). The dw weights
are tiny and used as fp32 (accumulation is fp32 for fp32 and bf16 activations)."""
import torch

from .isa import C

#: the 1x1 weights whose GEMM multiplies bf16 pairs (packed by pack_linear_bf16) on AVX512_BF16
PAIRS = ()


def _f32(t):
    return None if t is None else t.to(torch.float32).contiguous()


def run(x, w, b, stride, padding, gelu):
    return C.dwconv_nhwc(x, _f32(w), _f32(b), stride, padding, gelu)
