"""``fastvlm::patch_embed``: GELU(dw7x7 s2, channel multiplier 2) -> GELU(1x1), the downsampling
between stages (the large-kernel conv with its small-kernel branch folded in).

Weights: dw_w ``(K, K, Cout)`` + dw_b ``(Cout,)`` (Cout = 2C, padding K // 2), pw_w ``(Cout, Cout)``
+ pw_b ``(Cout,)``. NHWC ``(B, H, W, C)`` in, ``(B, ceil(H/2), ceil(W/2), Cout)`` out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastvlm import fastvithd as fv

from . import define, kernel_for, own_layouts_only
from ._checks import check_dw, check_w, check_x, conv_out
from ._eager import compute_dtype, dw, nchw, nhwc, pw
from ._fused import _Fused, pack_dw, pack_pw

LINEAR_WEIGHTS = ("pw_w",)


def _check(x, dw_w, dw_b, pw_w, pw_b):
    check_x("patch_embed", x)
    cout = check_dw("patch_embed", "dw", dw_w, dw_b, x)
    check_w("patch_embed", "pw_w", pw_w, (cout, cout), x)
    check_w("patch_embed", "pw_b", pw_b, (cout,), x)
    k = dw_w.shape[0]
    B, H, W, _ = x.shape
    return (B, conv_out(H, k, 2, k // 2), conv_out(W, k, 2, k // 2), cout)


@define
def patch_embed(x: Tensor, dw_w: Tensor, dw_b: Tensor, pw_w: Tensor, pw_b: Tensor, backend: str) -> Tensor:
    _check(x, dw_w, dw_b, pw_w, pw_b)
    own_layouts_only("patch_embed", backend, pw_w)
    return kernel_for("patch_embed", backend)(x, dw_w, dw_b, pw_w, pw_b)


@patch_embed.register_fake
def _(x, dw_w, dw_b, pw_w, pw_b, backend):
    return x.new_empty(_check(x, dw_w, dw_b, pw_w, pw_b))


def reference(x, dw_w, dw_b, pw_w, pw_b):
    ct = compute_dtype(x.dtype)
    k = dw_w.shape[0]
    h = F.gelu(dw(nchw(x, ct), dw_w, dw_b, 2, k // 2))
    return nhwc(F.gelu(pw(h, pw_w, pw_b)), x.dtype)


class FusedPatchEmbed(_Fused):
    OP = "patch_embed"
    _REFERENCE_NAMES = {"dw_w": ("proj.0.lkb_reparam.weight", True), "dw_b": ("proj.0.lkb_reparam.bias", False),
                        "pw_w": ("proj.1.reparam_conv.weight", False), "pw_b": ("proj.1.reparam_conv.bias", False)}

    def __init__(self, pe: fv.PatchEmbed, backend: str, dtype: torch.dtype):
        super().__init__(backend, dtype)
        lk, pwc = pe.proj[0].lkb_reparam, pe.proj[1].reparam_conv
        if lk.stride != (2, 2) or lk.padding != (lk.kernel_size[0] // 2,) * 2:
            raise ValueError(f"FusedPatchEmbed: expected a stride-2 'same'-padded conv, got {lk}")
        self._pack("dw_w", pack_dw(lk.weight))  # groups = Cin: one input channel per group
        self._pack("dw_b", lk.bias)
        self._pack("pw_w", pack_pw(pwc.weight))
        self._pack("pw_b", pwc.bias)

    def forward(self, x):
        return torch.ops.fastvlm.patch_embed(x, self.dw_w, self.dw_b, self.pw_w, self.pw_b, self.backend)
