"""The ``cpu`` backend: C++ kernels from ``fastvlm_kernels._C`` (csrc/), registered per op.

Implemented so far: dwconv. Not implemented yet (clearly so: ``available_backends()`` leaves
``cpu`` out and says why until all seven exist): stem, repmixer_block, convffn, patch_embed,
attention_mixer, conv_exp.
"""
from __future__ import annotations

import torch

from . import ops
from ._ext import load_extension

if load_extension() is None:  # pragma: no cover - guarded by backends._register_cpu
    raise ImportError("fastvlm_kernels.cpu needs the C++ extension")


def _dwconv(x, w, b, stride, padding, gelu):
    # The C++ kernel takes fp32 weights (accumulation is fp32 for fp32 and bf16 activations).
    wf = w.to(torch.float32).contiguous()
    bf = None if b is None else b.to(torch.float32).contiguous()
    return torch.ops.fastvlm_C.dwconv_nhwc(x, wf, bf, stride, padding, gelu)


ops.register_kernel("dwconv", "cpu", _dwconv)
