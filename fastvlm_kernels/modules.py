"""The fused ``nn.Module``s, one per op (each defined beside its op in ``ops/<op>.py``): each holds its
weights packed once (the ``ops`` layouts, one dtype) and calls one fused op per forward. They take
and return NHWC activations, except :class:`FusedStem` (NCHW pixels in, converted once) and
:class:`FusedConvExp` (returns an NCHW *view* of its NHWC output, so the encoder's
``forward_features`` keeps its NCHW contract and ``forward``'s tokens need no copy).

Each is built from the corresponding inference-form ``fastvlm`` module. The packed weights are
parameters that never require grad (``requires_grad=False``), so code that asks a model for its
device or dtype through ``parameters()`` (transformers' ``PreTrainedModel.device`` / ``.dtype``)
sees them. :meth:`_Fused.reference_state` gives them back in the names and layout of the modules
they replaced (``accelerate()`` uses it for the original-layout ``state_dict()`` of timm's FastVit).
"""
from __future__ import annotations

from . import ops
from .ops._fused import FrozenDeviceDtypeError, _Fused, pack_dw, pack_pw, unpack_dw

#: Every fused module type, one per op (ops.OPS order): FusedStem, FusedRepMixerBlock, FusedConvFFN,
#: FusedPatchEmbed, FusedDWConv, FusedAttentionBlock, FusedConvExp. Each is also this module's
#: attribute of that name (``modules.FusedStem`` is ``ops.stem.FusedStem``).
FUSED_TYPES = tuple(t for op in ops.OPS for t in vars(ops.contract(op)).values()
                    if isinstance(t, type) and issubclass(t, _Fused) and t.OP == op)
globals().update({t.__name__: t for t in FUSED_TYPES})

__all__ = ["FrozenDeviceDtypeError", "FUSED_TYPES", "pack_dw", "unpack_dw", "pack_pw",
           *(t.__name__ for t in FUSED_TYPES)]
