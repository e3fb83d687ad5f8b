"""Shared cases of the C++ op tests: argument builders, the C++ ops called as the cpu backend calls them
(1x1 weights packed), and the ISAs to run each case on."""
import pytest
import torch

import fastvlm_kernels


needs_ext = pytest.mark.skipif(not fastvlm_kernels.extension_available(),
                               reason=f"extension not built: {fastvlm_kernels.extension_error()}")


def dw_weight(w):  # (Cout, 1, K, K) -> (K, K, Cout) float32
    return w.float()[:, 0].permute(1, 2, 0).contiguous()


def ffn_args(C, Hd, K=7, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s, sc=1.0):
        return torch.randn(*s, generator=g, dtype=torch.float64) * sc
    return [r(K, K, C, sc=0.2), r(C, sc=0.1), r(Hd, C, sc=C ** -0.5), r(Hd, sc=0.1), r(C, Hd, sc=Hd ** -0.5),
            r(C, sc=0.1), r(C).abs() + 0.5]


def convffn_c(x, a):
    """The C++ op with fc1_w / fc2_w packed as the cpu backend packs them: pack_linear's panels, or
    pack_linear_bf16's pairs where the bf16 ConvFFN runs the AVX512_BF16 kernel now."""
    import fastvlm_kernels.cpu as cpu
    pk = torch.ops.fastvlm_C.pack_linear_bf16 if cpu.uses_bf16_pairs(x.dtype) else torch.ops.fastvlm_C.pack_linear
    return torch.ops.fastvlm_C.convffn_nhwc(x, a[0], a[1], pk(a[2]), a[3], pk(a[4]), a[5], a[6])


def attn_c(x, a, hd):
    """The C++ attention mixer with qkv_w / proj_w packed as the cpu backend packs them (pack_linear,
    or pack_linear_bf16 where bf16 runs the AVX512_BF16 kernels now)."""
    import fastvlm_kernels.cpu as cpu
    pk = torch.ops.fastvlm_C.pack_linear_bf16 if cpu.uses_bf16_pairs(x.dtype) else torch.ops.fastvlm_C.pack_linear
    return torch.ops.fastvlm_C.attention_mixer_nhwc(x, a[0], a[1], pk(a[2]), pk(a[3]), a[4], a[5], hd)


def stem_c(x, a):  # the C++ stem with its 1x1 weight packed
    return torch.ops.fastvlm_C.stem_nhwc(x, *a[:4], torch.ops.fastvlm_C.pack_linear(a[4]), a[5])


def patch_embed_c(x, a):
    """The C++ patch_embed with its 1x1 weight packed as the cpu backend packs it (pack_linear, or
    pack_linear_bf16 where bf16 runs the AVX512_BF16 kernels now)."""
    import fastvlm_kernels.cpu as cpu
    pk = torch.ops.fastvlm_C.pack_linear_bf16 if cpu.uses_bf16_pairs(x.dtype) else torch.ops.fastvlm_C.pack_linear
    return torch.ops.fastvlm_C.patch_embed_nhwc(x, a[0], a[1], pk(a[2]), a[3], 2)


PAIR_ISAS = ("amx_bf16", "avx512_bf16")  # the ISAs whose bf16 GEMMs multiply bf16 pairs (kernels/bf16_pairs.h)


def isas(dp=False):
    """Every ISA path this CPU can run (the widest first): FASTVLM_CPU_ISA caps the choice.
    amx_bf16 and avx512_bf16 are only listed with dp (they change the bf16 GEMMs only)."""
    import fastvlm_kernels.cpu as cpu
    best = cpu.cpu_isa()
    order = ["amx_bf16", "avx512_bf16", "avx512", "avx2", "sse"]
    if not dp:
        order, best = order[2:], ("avx512" if best in PAIR_ISAS else best)
    return order[order.index(best):]


def use_pair_isa(monkeypatch, isa):
    """Runs the rest of the test on the bf16-pair ISA `isa` (FASTVLM_CPU_ISA), or skips it where this
    CPU does not have it."""
    import fastvlm_kernels.cpu as cpu
    if isa not in isas(dp=True):
        pytest.skip(f"no {isa} here (scripts/asan.sh tests the avx512_bf16 kernels emulated on AVX2 CPUs)")
    monkeypatch.setenv("FASTVLM_CPU_ISA", isa)
    assert cpu.cpu_isa() == isa


def mix_args(C, seed=0):  # the RepMixer's dw3x3 (residual folded in): (3, 3, C) weight, (C) bias
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 3, C, generator=g, dtype=torch.float64) * 0.2
    w[1, 1] += 1.0  # the folded identity: m stays of the order of x, as in FastViTHD
    return [w, torch.randn(C, generator=g, dtype=torch.float64) * 0.1]


def repmixer_c(x, mix, a):
    """The C++ RepMixer block with fc1_w / fc2_w packed as the cpu backend packs them."""
    import fastvlm_kernels.cpu as cpu
    pk = torch.ops.fastvlm_C.pack_linear_bf16 if cpu.uses_bf16_pairs(x.dtype) else torch.ops.fastvlm_C.pack_linear
    return torch.ops.fastvlm_C.repmixer_nhwc(x, mix[0], mix[1], a[0], a[1], pk(a[2]), a[3], pk(a[4]), a[5], a[6])


def attn_args(C, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s, sc=1.0):
        return torch.randn(*s, generator=g, dtype=torch.float64) * sc
    return [r(C).abs() + 0.5, r(C, sc=0.1), r(3 * C, C, sc=C ** -0.5), r(C, C, sc=C ** -0.5), r(C, sc=0.1),
            r(C).abs() + 0.5]
