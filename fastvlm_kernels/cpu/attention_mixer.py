"""``attention_mixer`` on the cpu backend: csrc/ops/attention_mixer.cpp (kernels/attention.h):
LayerNormChannel as the qkv GEMM's prologue per tile of tokens, flash attention with online softmax
over key blocks, then proj with a bias + layer scale + residual epilogue per tile of tokens."""
from .isa import C, uses_bf16_pairs
from .packing import packed

#: the 1x1 weights whose GEMM multiplies bf16 pairs (packed by pack_linear_bf16) on AVX512_BF16
PAIRS = ("qkv_w", "proj_w")


def run(x, ln_w, ln_b, qkv_w, proj_w, proj_b, gamma, head_dim):
    pairs = uses_bf16_pairs(x.dtype)
    return C.attention_mixer_nhwc(x, ln_w, ln_b, packed(qkv_w, pairs), packed(proj_w, pairs), proj_b, gamma, head_dim)
