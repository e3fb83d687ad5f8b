"""The base of the fused ``nn.Module``s (each op's module lives in ``ops/<op>.py``) and the weight
layouts they pack into (``ops`` docstring)."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn


def pack_dw(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, 1, K, K) depthwise / grouped conv weight (one input channel per group, Cout = M·Cin)
    -> (K, K, Cout)."""
    if weight.dim() != 4 or weight.shape[1] != 1:
        raise ValueError(f"pack_dw: expected a depthwise (Cout, 1, K, K) weight, got {tuple(weight.shape)}")
    return weight[:, 0].permute(1, 2, 0)


def unpack_dw(w: torch.Tensor) -> torch.Tensor:
    """:func:`pack_dw`'s inverse: (K, K, Cout) -> (Cout, 1, K, K)."""
    return w.permute(2, 0, 1).unsqueeze(1).contiguous()


def pack_pw(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 1, 1) pointwise conv weight or (Cout, Cin) linear weight -> (Cout, Cin)."""
    return weight.reshape(weight.shape[0], -1)


class FrozenDeviceDtypeError(TypeError):
    """``.to()`` / ``.half()`` / ``.cuda()`` ... on an accelerated module: its weights are packed for one
    backend, device and dtype at ``accelerate()`` time and cannot be converted in place."""


class _Fused(nn.Module):
    """Packed weights (parameters that never require grad: inference only) and the backend that runs the op.

    ``OP``: the op this module calls (its 1x1 weights are that op's ``LINEAR_WEIGHTS``, which a backend
    may hold in a layout of its own, e.g. the cpu backend's packed panels)."""

    OP: str = ""

    def __init__(self, backend: str, dtype: torch.dtype):
        super().__init__()
        self.backend = backend
        self.dtype = dtype
        self.train(False)  # inference-only

    #: packed name -> (name in the replaced module, whether it is a depthwise weight in pack_dw's layout)
    _REFERENCE_NAMES: Dict[str, tuple] = {}

    def _pack(self, name: str, t: torch.Tensor) -> None:
        self.set_weight(name, t.detach().to(self.dtype).contiguous())

    def set_weight(self, name: str, t: torch.Tensor) -> None:
        """Hold ``t`` as the weight ``name`` (a parameter that does not require grad)."""
        self._parameters[name] = nn.Parameter(t, requires_grad=False)

    @classmethod
    def reference_state(cls, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """This module's ``state_dict()`` (keys relative to it, 1x1 weights in the nn.Linear layout)
        -> the state of the inference-form ``fastvlm`` module it replaced, in that module's names.
        1x1 weights come out 2-D and layer scales 1-D (the caller reshapes them to the model's
        shapes); depthwise weights in the conv layout (Cout, 1, K, K)."""
        out = {}
        for name, (ref, dw) in cls._REFERENCE_NAMES.items():
            out[ref] = unpack_dw(state[name]) if dw else state[name]
        return out

    def _apply(self, fn, recurse=True):
        # The weights are packed for one backend on one device in one dtype: refuse conversions that
        # would change either, before anything is converted, and let the others (a no-op .to(), a
        # .share_memory()) through. What fn would do is read from a 0-element probe of each tensor.
        for name, t in self._parameters.items():
            if t is None:
                continue
            probe = fn(torch.empty(0, dtype=t.dtype, device=t.device))
            if probe.dtype != t.dtype or probe.device != t.device:
                raise FrozenDeviceDtypeError(
                    f"fastvlm_kernels: the accelerated modules hold weights packed for the {self.backend!r} backend "
                    f"in {t.dtype} on {t.device}; they cannot be converted to {probe.dtype} on {probe.device} in "
                    "place. Move or cast the model before fastvlm_kernels.accelerate(), or accelerate a fresh copy "
                    "(accelerate(model, dtype=...) picks the dtype).")
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, dtype={self.dtype}"
