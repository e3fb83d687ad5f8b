"""The cpu backend's packed-weight format (the Python owner; csrc/packed.h is the C++ one) and the
packing of a model's fused modules at ``accelerate()`` time.

The 1x1 weights of the fused ops (each op's ``LINEAR_WEIGHTS``: convffn / repmixer_block's fc1 and
fc2, stem's w2, patch_embed's pw, attention_mixer's qkv and proj) are handed to the C++ ops in the
panel layout their GEMMs read (``fastvlm_C::pack_linear``, see :func:`packed`). The op contract takes
them in the nn.Linear layout, or already packed for this backend: ``accelerate()`` (:func:`prepack`)
replaces the fused modules' 1x1 weights by their packed form, so the model holds each weight once, and
:func:`unprepack` restores the nn.Linear layout when the model moves to another backend. A packed
module's ``state_dict()`` still has the nn.Linear layout, and ``load_state_dict()`` takes it.
"""
from __future__ import annotations

import importlib

import torch

from .. import ops
from .isa import C as _C, cpu_isa, uses_bf16_pairs


class PackedFormat:
    """The packed-weight format of the cpu backend: the Python side of its one C++ owner, csrc/packed.h
    (tests/test_cpu_packing.py checks the two against each other). An (N, K) nn.Linear / 1x1 weight is
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


def _pairs(op: str) -> tuple:
    """The 1x1 weights of ``op`` that the bf16-pair GEMMs read (its cpu module's PAIRS)."""
    return importlib.import_module(f"{__package__}.{op}").PAIRS


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
    from ..ops._fused import _Fused
    for m in model.modules():
        if not isinstance(m, _Fused):
            continue
        if "_fastvlm_linear_shapes" not in m.__dict__:  # first prepack of this module: hooks once
            m.register_state_dict_post_hook(_state_dict_linear)
            m.register_load_state_dict_pre_hook(_load_state_dict_packed)
        shapes = m.__dict__.setdefault("_fastvlm_linear_shapes", {})
        for name in ops.linear_weights(m.OP):
            t = m._parameters.get(name)
            if t is None or t.device.type != "cpu":
                continue
            pairs = name in _pairs(m.OP) and uses_bf16_pairs(m.dtype)
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


def is_prepacked(model: torch.nn.Module) -> bool:
    """Whether ``model``'s fused modules hold their 1x1 weights packed (:func:`prepack`)."""
    return any("_fastvlm_linear_shapes" in m.__dict__ for m in model.modules())
