"""The ``cpu`` backend: C++ kernels from ``fastvlm_kernels._C`` (csrc/), registered per op.

All seven ops:

- ``stem`` (conv3x3 s2 -> dw3x3 s2 -> 1x1, each + GELU, in one pass: per block of 4 x 32 final
  pixels, the intermediate pixels its windows cover are computed (a GEMM over 3x3 patches) into the
  tile, about 1.14 times each, instead of stored at full resolution);
- ``convffn`` (fused dw7x7 -> fc1 -> GELU -> fc2 -> layer scale + residual, one tile of pixels at a
  time, the 4C hidden kept in cache; in bf16 on a CPU with AVX512_BF16, fc1 and fc2 multiply bf16
  pairs with vdpbf16ps, csrc/kernels/bf16_pairs.h, as do attention's qkv, S, P V and proj and patch_embed's
  1x1) and ``repmixer_block`` (the same, one rectangle of pixels at a time, with the RepMixer's dw3x3
  output over the rectangle and its 7x7 halo kept in per-thread float32 scratch, for bf16 too);
- ``patch_embed`` (dw7x7 s2 x2 + GELU -> 1x1 + GELU per tile) and ``dwconv``;
- ``attention_mixer`` (LayerNormChannel as the qkv GEMM's prologue per tile of tokens, flash
  attention with online softmax over key blocks, then proj with a bias + layer scale + residual
  epilogue per tile of tokens; csrc/kernels/attention.h);
- ``conv_exp`` (dw conv with per-row channel sums, SE, then GELU(z·s): two passes, vectorised per
  ISA; csrc/kernels/depthwise.h).

The 1x1 weights of convffn / repmixer_block (fc1, fc2), stem (w2), patch_embed (pw) and
attention_mixer (qkv, proj) are handed to the C++ ops in the panel layout their GEMMs read
(``fastvlm_C::pack_linear``, see :func:`packed`). The op contract (``ops.py``) takes them in the
nn.Linear layout, or already packed for this backend: ``accelerate()`` (:func:`prepack`) replaces the
fused modules' 1x1 weights by their packed form, so the model holds each weight once, and
:func:`unprepack` restores the nn.Linear layout when the model moves to another backend. A packed
module's ``state_dict()`` still has the nn.Linear layout, and ``load_state_dict()`` takes it.

The kernels run with float32 denormals flushed (FTZ + DAZ on their threads, restored afterwards):
values below 1.18e-38 in magnitude are read, and produced, as signed zeros (docs/numerics.md).
"""
from __future__ import annotations

import torch

from . import backends, ops
from ._ext import extension_error, load_extension

# The extension's ops (torch.ops.fastvlm_C.*), loaded here as before, so that every function below works
# on import; without the extension this module still imports (the backend then says why it cannot run).
load_extension()
_C = torch.ops.fastvlm_C


class PackedFormat:
    """The packed-weight format of the cpu backend: the Python side of its one C++ owner, csrc/packed.h
    (tests/test_packing.py checks the two against each other). An (N, K) nn.Linear / 1x1 weight is
    packed into panels of PANEL output channels, the panel count rounded up to even:

    - float32 (``pack_linear``): (panels(N), K, PANEL); out[p][k][i] = w[PANEL p + i][k];
    - bf16 pairs (``pack_linear_bf16``): (panels(N), pair_rows(K), 2 PANEL) bfloat16;
      out[p][j][2i + e] = w[PANEL p + i][2j + e];

    zero where PANEL p + i >= N (and where 2j + e = K for an odd K)."""

    description = "packed for the cpu backend (fastvlm_kernels.cpu.PackedFormat)"
    PANEL = 16

    @classmethod
    def panels(cls, n: int) -> int:
        return (n + 2 * cls.PANEL - 1) // (2 * cls.PANEL) * 2

    @staticmethod
    def pair_rows(k: int) -> int:
        return (k + 1) // 2

    @classmethod
    def shape(cls, n: int, k: int, pairs: bool) -> tuple:
        return (cls.panels(n), cls.pair_rows(k), 2 * cls.PANEL) if pairs else (cls.panels(n), k, cls.PANEL)

    @classmethod
    def owns(cls, t: torch.Tensor) -> bool:
        """Whether ``t`` is a weight in this layout (of any shape)."""
        return (t.dim() == 3 and t.dtype in (torch.float32, torch.bfloat16)
                and t.shape[2] == (2 * cls.PANEL if t.dtype == torch.bfloat16 else cls.PANEL))

    @classmethod
    def matches(cls, t: torch.Tensor, shape) -> bool:
        """Whether ``t`` is the (n, k) weight ``shape`` in this layout (n < 0: any n)."""
        if not cls.owns(t):
            return False
        n, k = shape
        want = cls.shape(n if n >= 0 else 1, k, t.dtype == torch.bfloat16)
        return t.shape[1:] == want[1:] and (n < 0 or t.shape[0] == want[0])

    @classmethod
    def unpack(cls, p: torch.Tensor, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
        """The (n, k) nn.Linear-layout weight in ``dtype`` from its packed form. Exact: the panels hold
        the weight's own values (bf16 ones for a bf16 model)."""
        if p.dtype == torch.bfloat16:  # pairs: [panel][k // 2][2 * lane + k % 2]
            P, kh, _ = p.shape
            w = p.view(P, kh, cls.PANEL, 2).permute(0, 2, 1, 3).reshape(P * cls.PANEL, kh * 2)
        else:  # panels: [panel][k][lane]
            w = p.permute(0, 2, 1).reshape(-1, p.shape[1])
        return w[:n, :k].to(dtype).contiguous()


def _f32(t):
    return None if t is None else t.to(torch.float32).contiguous()


def _dwconv(x, w, b, stride, padding, gelu):
    # dw weights are tiny: used as fp32 (accumulation is fp32 for fp32 and bf16 activations)
    return _C.dwconv_nhwc(x, _f32(w), _f32(b), stride, padding, gelu)


def packed(w: torch.Tensor, pairs: bool = False) -> torch.Tensor:
    """``w`` (N, K) in the panel layout of the pixel-major GEMMs (ConvFFN, stem, patch_embed, attention):
    ``fastvlm_C::pack_linear``, float32 (P, K, 16), 16 output channels per panel; or, with ``pairs``,
    ``fastvlm_C::pack_linear_bf16``, bfloat16 (P, ceil(K / 2), 32), pairs of k per channel, for the
    AVX512_BF16 ConvFFN (see :func:`uses_bf16_pairs`). Packed once per weight tensor and layout.

    The panels are kept on the tensor itself, tagged with its version counter, so an in-place
    update of the weight (``copy_``, ``load_state_dict``) repacks on the next call and a new tensor
    (``.to()``, a fresh module) packs anew. ``accelerate()`` calls :func:`prepack`, so a model's
    weights are packed before its first forward. Inference tensors have no version counter: they
    are packed on every call (correct, a few ms slower per block). An already packed weight (3-D: a
    fused module's weight after :func:`prepack`) is returned as it is."""
    if w.dim() == 3:  # already packed (accelerate()'s prepack)
        if (w.dtype == torch.bfloat16) != pairs:
            have, need = ("float32 panels", "bf16 pairs") if pairs else ("bf16 pairs", "float32 panels")
            raise RuntimeError(f"fastvlm_kernels.cpu: this weight was packed as {have} at accelerate() time, but "
                               f"the kernels now need {need} (the ISA is {cpu_isa()}; was FASTVLM_CPU_ISA changed?): "
                               "call fastvlm_kernels.accelerate(model) again to repack")
        return w
    pack, attr = (_C.pack_linear_bf16, "_fastvlm_packed_bf16") if pairs else (_C.pack_linear, "_fastvlm_packed")
    try:
        version = w._version
    except RuntimeError:  # an inference tensor
        return pack(w)
    cached = getattr(w, attr, None)
    if cached is not None and cached[0] == version:
        return cached[1]
    p = pack(w)
    setattr(w, attr, (version, p))
    return p


def uses_bf16_pairs(dtype: torch.dtype) -> bool:
    """Whether the GEMMs of ``dtype`` activations (the ConvFFN's, attention's and patch_embed's)
    run the bf16-pair kernels now (bf16 pair products, fp32 accumulation; csrc/kernels/bf16_pairs.h, on AMX
    tiles where the ISA is ``amx_bf16``: csrc/kernels/amx.h): bfloat16 on a CPU with AVX512_BF16,
    unless FASTVLM_CPU_ISA caps the ISA below ``avx512_bf16``.
    Their fc1 / fc2, qkv / proj and pw weights are then packed by ``pack_linear_bf16``; the other
    bf16 kernels (the stem, the depthwise convs, the softmax) compute in fp32 on bf16 storage."""
    return dtype == torch.bfloat16 and cpu_isa() in ("avx512_bf16", "amx_bf16")


_PAIRS = ("fc1_w", "fc2_w", "qkv_w", "proj_w", "pw_w")  # the weights of the GEMMs with an AVX512_BF16 kernel


_LINEAR = ("fc1_w", "fc2_w", "w2", "pw_w", "qkv_w", "proj_w")  # the fused modules' 1x1 weights


def unpack(p: torch.Tensor, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The (n, k) nn.Linear-layout weight in ``dtype`` from its :func:`packed` form (PackedFormat.unpack)."""
    return PackedFormat.unpack(p, n, k, dtype)


def _packed_shapes(m: torch.nn.Module) -> dict:
    return m.__dict__.get("_fastvlm_linear_shapes", {})


def _state_dict_linear(m, state_dict, prefix, local_metadata) -> None:
    # state_dict() of a packed module: its 1x1 weights in the nn.Linear layout, whatever this CPU packs
    for name, (n, k) in _packed_shapes(m).items():
        t = state_dict.get(prefix + name)
        if t is not None and t.dim() == 3:
            state_dict[prefix + name] = unpack(t, n, k, m.dtype)


def _load_state_dict_packed(m, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    # load_state_dict() into a packed module: nn.Linear-layout weights are packed like the ones they replace
    shapes = _packed_shapes(m)
    for name in list(shapes):
        t, cur = state_dict.get(prefix + name), m._parameters.get(name)
        # (another shape is left as it is: the loader then reports the size mismatch)
        if isinstance(t, torch.Tensor) and tuple(t.shape) == shapes[name] and cur is not None and cur.dim() == 3:
            pack = _C.pack_linear_bf16 if cur.dtype == torch.bfloat16 else _C.pack_linear
            state_dict[prefix + name] = pack(t.detach().to(device="cpu", dtype=m.dtype).contiguous())


def prepack(model: torch.nn.Module) -> None:
    """Pack the 1x1 weights of every fused module in ``model`` (called by ``accelerate()``) in the
    layout their kernels read (the ConvFFN's fc1 / fc2, attention's qkv / proj and patch_embed's pw of a bf16 model:
    bf16 pairs where the CPU has AVX512_BF16), in place of their nn.Linear-layout tensors: the model
    then holds each weight once. Weights packed before in the other form (the ISA changed since) are
    repacked."""
    from .modules import _Fused
    for m in model.modules():
        if not isinstance(m, _Fused):
            continue
        if "_fastvlm_linear_shapes" not in m.__dict__:  # first prepack of this module: hooks once
            m.register_state_dict_post_hook(_state_dict_linear)
            m.register_load_state_dict_pre_hook(_load_state_dict_packed)
        shapes = m.__dict__.setdefault("_fastvlm_linear_shapes", {})
        for name in _LINEAR:
            t = m._parameters.get(name)
            if t is None or t.device.type != "cpu":
                continue
            pairs = name in _PAIRS and uses_bf16_pairs(m.dtype)
            if t.dim() == 3:
                if (t.dtype == torch.bfloat16) == pairs:
                    continue
                t = unpack(t, *shapes[name], m.dtype)
            shapes[name] = tuple(t.shape)
            m.set_weight(name, (_C.pack_linear_bf16 if pairs else _C.pack_linear)(t.detach().contiguous()))


def unprepack(model: torch.nn.Module) -> None:
    """Undo :func:`prepack`: the fused modules' 1x1 weights back in the nn.Linear layout (on whatever
    device they are now), for a backend that reads that layout."""
    for m in model.modules():
        shapes = _packed_shapes(m)
        for name, (n, k) in list(shapes.items()):
            t = m._parameters.get(name)
            if t is not None and t.dim() == 3:
                m.set_weight(name, unpack(t.detach(), n, k, m.dtype))
        shapes.clear()


def _convffn(x, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma):
    pairs = uses_bf16_pairs(x.dtype)
    return _C.convffn_nhwc(x, ffn_w, ffn_b, packed(fc1_w, pairs), fc1_b, packed(fc2_w, pairs), fc2_b, gamma)


def _repmixer_block(x, mix_w, mix_b, ffn_w, ffn_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma):
    # one pass: the mixer output m stays in per-thread scratch, float32 for bf16 x too (csrc/kernels/repmixer.h)
    pairs = uses_bf16_pairs(x.dtype)
    return _C.repmixer_nhwc(x, mix_w, mix_b, ffn_w, ffn_b, packed(fc1_w, pairs), fc1_b, packed(fc2_w, pairs), fc2_b,
                            gamma)


def _stem(x, w0, b0, w1, b1, w2, b2):
    return _C.stem_nhwc(x, w0, b0, w1, b1, packed(w2), b2)


def _patch_embed(x, dw_w, dw_b, pw_w, pw_b):
    return _C.patch_embed_nhwc(x, dw_w, dw_b, packed(pw_w, uses_bf16_pairs(x.dtype)), pw_b, 2)


def _conv_exp(x, w, b, se_r_w, se_r_b, se_e_w, se_e_b):
    return _C.conv_exp_nhwc(x, w, b, se_r_w, se_r_b, se_e_w, se_e_b)


def _attention_mixer(x, ln_w, ln_b, qkv_w, proj_w, proj_b, gamma, head_dim):
    pairs = uses_bf16_pairs(x.dtype)
    return _C.attention_mixer_nhwc(x, ln_w, ln_b, packed(qkv_w, pairs), packed(proj_w, pairs), proj_b, gamma, head_dim)


def cpu_isa() -> str:
    """The vector ISA the C++ kernels use now ('amx_bf16', 'avx512_bf16', 'avx512', 'avx2' or 'sse';
    FASTVLM_CPU_ISA caps it). 'avx512_bf16' is 'avx512' plus the bf16-pair GEMMs (ConvFFN,
    attention, patch_embed's 1x1); 'amx_bf16' runs those GEMMs on AMX tiles."""
    return load_extension().cpu_isa()


def peak_gflops(dtype: torch.dtype = torch.float32, seconds: float = 0.2, reps: int = 3) -> float:
    """The measured multiply-add peak, in GFLOP/s, of the C++ kernels' GEMMs for ``dtype`` activations
    on ``torch.get_num_threads()`` threads: FMA chains of the ISA in use (:func:`cpu_isa`), or
    vdpbf16ps chains where :func:`uses_bf16_pairs` (bf16 on AVX512_BF16; TDPBF16PS tile chains on
    ``amx_bf16``). Register-only loops, no
    memory traffic: the compute roofline that ``bench/`` divides FLOPs by (the best of ``reps`` runs
    of about ``seconds``). Not the rate of any GEMM (``torch.mm``'s is usually well below it)."""
    return float(_C.peak_gflops(uses_bf16_pairs(dtype), float(seconds), int(reps)))


# ---- the backend's declaration ---------------------------------------------------------------------
_KERNELS = {"dwconv": _dwconv, "convffn": _convffn, "repmixer_block": _repmixer_block, "stem": _stem,
            "patch_embed": _patch_embed, "attention_mixer": _attention_mixer, "conv_exp": _conv_exp}


def _unavailable():
    return None if load_extension() is not None else f"the C++ extension is not built ({extension_error()})"


def _register_kernels() -> None:
    for op, fn in _KERNELS.items():
        ops.register_kernel(op, "cpu", fn)


def is_prepacked(model: torch.nn.Module) -> bool:
    """Whether ``model``'s fused modules hold their 1x1 weights packed (:func:`prepack`)."""
    return any("_fastvlm_linear_shapes" in m.__dict__ for m in model.modules())


ops.register_weight_format("cpu", PackedFormat)
backends.register(backends.Backend(
    name="cpu", devices=("cpu",), dtypes=(torch.float32, torch.bfloat16), unavailable=_unavailable,
    load=_register_kernels, prepare=prepack, unprepare=unprepack, is_prepared=is_prepacked))
