"""FastViTHD, the vision encoder of Apple's FastVLM, in plain PyTorch.

One file, read top to bottom: building blocks (MobileOne, large-kernel conv, RepMixer, ConvFFN,
attention, RepCPE), the blocks, and the network. Module and parameter names follow the Apple
ml-fastvlm release (``patch_embed``, ``network.N``, ``conv_exp``, ``rbr_*``, ``lkb_*``) so that its
state dicts load without renaming; the timm / HF-transformers names are mapped in ``checkpoint.py``.

Every re-parameterizable module has a train-time form (the branches it was trained with) and an
inference form (one conv, what the released checkpoints hold). ``reparameterize()`` folds the
former into the latter (see ``reparam.py`` for the math). The ConvFFN BatchNorm is *not* folded in
the model, as in the release; ``reparam.fold_convffn_bn`` gives its fold for kernels that want it.

Numerics (docs/numerics.md): exact-erf GELU, BatchNorm / LayerNormChannel eps 1e-5, softmax scale
head_dim**-0.5, SE with ReLU and sigmoid.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, asdict
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import reparam

__all__ = ["FastViTHD", "FastViTHDConfig"]


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class FastViTHDConfig:
    """Hyper-parameters of FastViTHD. The defaults are the released architecture."""

    layers: Tuple[int, ...] = (2, 12, 24, 4, 2)
    embed_dims: Tuple[int, ...] = (96, 192, 384, 768, 1536)
    token_mixers: Tuple[str, ...] = ("repmixer", "repmixer", "repmixer", "attention", "attention")
    pos_embs: Tuple[bool, ...] = (False, False, False, True, True)  # RepCPE 7x7 before the stage
    mlp_ratio: float = 4.0
    head_dim: int = 32
    repmixer_kernel_size: int = 3
    down_patch_size: int = 7
    cpe_kernel_size: int = 7
    cls_ratio: float = 2.0  # conv_exp widens the last stage by this factor (1536 -> 3072)
    se_rd_ratio: float = 0.0625
    layer_scale_init_value: float = 1e-5
    in_chans: int = 3

    def __post_init__(self):
        self.layers = tuple(int(v) for v in self.layers)
        self.embed_dims = tuple(int(v) for v in self.embed_dims)
        self.token_mixers = tuple(self.token_mixers)
        self.pos_embs = tuple(bool(v) for v in self.pos_embs)
        n = len(self.layers)
        if not (len(self.embed_dims) == len(self.token_mixers) == len(self.pos_embs) == n):
            raise ValueError(
                "FastViTHDConfig: layers, embed_dims, token_mixers and pos_embs must have the same "
                f"length, got {len(self.layers)}, {len(self.embed_dims)}, {len(self.token_mixers)}, "
                f"{len(self.pos_embs)}"
            )
        for i, (d, m) in enumerate(zip(self.embed_dims, self.token_mixers)):
            if m not in ("repmixer", "attention"):
                raise ValueError(f"FastViTHDConfig: token_mixers[{i}] must be 'repmixer' or 'attention', got {m!r}")
            if m == "attention" and d % self.head_dim:
                raise ValueError(f"FastViTHDConfig: embed_dims[{i}]={d} is not a multiple of head_dim={self.head_dim}")
        for i in range(n - 1):
            if self.embed_dims[i + 1] % self.embed_dims[i]:
                raise ValueError(
                    "FastViTHDConfig: each PatchEmbed is a grouped conv with groups=in_channels, so "
                    f"embed_dims[{i + 1}]={self.embed_dims[i + 1]} must be a multiple of embed_dims[{i}]={self.embed_dims[i]}"
                )

    @classmethod
    def tiny(cls) -> "FastViTHDConfig":
        """Same structure as the released model (5 stages, RepMixer and attention, RepCPE, SE),
        narrow and shallow, for fast tests."""
        return cls(layers=(1, 2, 1, 1, 1), embed_dims=(8, 16, 32, 64, 128))

    @property
    def num_features(self) -> int:
        return int(self.embed_dims[-1] * self.cls_ratio)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------


class ConvBN(nn.Sequential):
    """conv (no bias) -> BatchNorm, the unit every re-parameterizable branch is made of."""

    def __init__(self, cin, cout, k, stride=1, padding=0, groups=1):
        super().__init__()
        self.add_module("conv", nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))


class SEBlock(nn.Module):
    """Squeeze-excite: global mean -> 1x1 reduce -> ReLU -> 1x1 expand -> sigmoid -> scale.

    The Apple release pools with a hard-coded 16x16 window (the 1024x1024 grid); this is the full-map
    mean, identical there and defined for every input size (as timm does)."""

    def __init__(self, channels: int, rd_ratio: float = 0.0625):
        super().__init__()
        rd = int(channels * rd_ratio)
        self.reduce = nn.Conv2d(channels, rd, 1, bias=True)
        self.expand = nn.Conv2d(rd, channels, 1, bias=True)

    def forward(self, x):
        s = x.mean(dim=(2, 3), keepdim=True)
        s = torch.sigmoid(self.expand(F.relu(self.reduce(s))))
        return x * s


class MobileOneBlock(nn.Module):
    """MobileOne block: sum of k x k conv-BN branches, an optional 1x1 "scale" conv-BN and an
    optional identity BN ("skip"), then SE and GELU. Inference form: one conv with bias."""

    def __init__(self, cin, cout, k, stride=1, padding=0, groups=1, inference_mode=False,
                 use_se=False, use_act=True, use_scale_branch=True, num_conv_branches=1,
                 se_rd_ratio=0.0625):
        super().__init__()
        self.cin, self.cout, self.k, self.stride, self.padding, self.groups = cin, cout, k, stride, padding, groups
        self.inference_mode = inference_mode
        self.se = SEBlock(cout, se_rd_ratio) if use_se else nn.Identity()
        self.activation = nn.GELU() if use_act else nn.Identity()
        if inference_mode:
            self.reparam_conv = nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=True)
        else:
            self.rbr_skip = nn.BatchNorm2d(cin) if (cin == cout and stride == 1) else None
            self.rbr_conv = nn.ModuleList(
                [ConvBN(cin, cout, k, stride, padding, groups) for _ in range(num_conv_branches)]
            )
            self.rbr_scale = ConvBN(cin, cout, 1, stride, 0, groups) if (k > 1 and use_scale_branch) else None

    def forward(self, x):
        if self.inference_mode:
            return self.activation(self.se(self.reparam_conv(x)))
        out = 0
        if self.rbr_skip is not None:
            out = self.rbr_skip(x)
        if self.rbr_scale is not None:
            out = out + self.rbr_scale(x)
        for branch in self.rbr_conv:
            out = out + branch(x)
        return self.activation(self.se(out))

    def fused_kernel_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(W, b) of the single conv equivalent to all branches."""
        if self.inference_mode:
            return self.reparam_conv.weight, self.reparam_conv.bias
        w_shape = (self.cout, self.cin // self.groups, self.k, self.k)
        ref = next(self.parameters())
        w = torch.zeros(w_shape, dtype=ref.dtype, device=ref.device)
        b = torch.zeros(self.cout, dtype=ref.dtype, device=ref.device)
        for branch in self.rbr_conv:
            bw, bb = reparam.fuse_conv_bn(branch.conv.weight, branch.bn)
            w, b = w + bw, b + bb
        if self.rbr_scale is not None:
            sw, sb = reparam.fuse_conv_bn(self.rbr_scale.conv.weight, self.rbr_scale.bn)
            w, b = w + reparam.pad_kernel(sw, self.k), b + sb
        if self.rbr_skip is not None:
            ident = reparam.identity_kernel(self.cin, self.groups, self.k, dtype=ref.dtype, device=ref.device)
            iw, ib = reparam.fuse_conv_bn(ident, self.rbr_skip)
            w, b = w + iw, b + ib
        return w, b

    @torch.no_grad()
    def reparameterize(self):
        if self.inference_mode:
            return
        w, b = self.fused_kernel_bias()
        self.reparam_conv = reparam.make_conv(w, b, self.stride, self.padding, self.groups)
        del self.rbr_conv, self.rbr_scale, self.rbr_skip
        self.inference_mode = True


class ReparamLargeKernelConv(nn.Module):
    """k x k conv-BN plus a small-kernel conv-BN (RepLKNet), then GELU (PatchEmbed ``proj.0``).

    Unlike the original FastViT code, the activation is applied."""

    def __init__(self, cin, cout, k, stride, groups, small_kernel=3, inference_mode=False):
        super().__init__()
        self.cin, self.cout, self.k, self.stride, self.groups = cin, cout, k, stride, groups
        self.small_kernel = small_kernel
        self.inference_mode = inference_mode
        self.activation = nn.GELU()
        if inference_mode:
            self.lkb_reparam = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=True)
        else:
            self.lkb_origin = ConvBN(cin, cout, k, stride, k // 2, groups)
            self.small_conv = ConvBN(cin, cout, small_kernel, stride, small_kernel // 2, groups)

    def forward(self, x):
        if self.inference_mode:
            out = self.lkb_reparam(x)
        else:
            out = self.lkb_origin(x) + self.small_conv(x)
        return self.activation(out)

    @torch.no_grad()
    def reparameterize(self):
        if self.inference_mode:
            return
        w, b = reparam.fuse_conv_bn(self.lkb_origin.conv.weight, self.lkb_origin.bn)
        sw, sb = reparam.fuse_conv_bn(self.small_conv.conv.weight, self.small_conv.bn)
        self.lkb_reparam = reparam.make_conv(w + reparam.pad_kernel(sw, self.k), b + sb,
                                             self.stride, self.k // 2, self.groups)
        del self.lkb_origin, self.small_conv
        self.inference_mode = True


class PatchEmbed(nn.Module):
    """Stride-2 downsampling between stages: grouped 7x7 (channel multiplier cout/cin) + GELU,
    then 1x1 + GELU."""

    def __init__(self, cin, cout, patch_size=7, stride=2, inference_mode=False):
        super().__init__()
        self.proj = nn.Sequential(
            ReparamLargeKernelConv(cin, cout, patch_size, stride, groups=cin, inference_mode=inference_mode),
            MobileOneBlock(cout, cout, 1, 1, 0, inference_mode=inference_mode),
        )

    def forward(self, x):
        return self.proj(x)


class RepMixer(nn.Module):
    """Depthwise token mixer, train form ``x + λ·(mixer(x) − norm(x))``; inference form one dw conv
    with the residual folded into its kernel."""

    def __init__(self, dim, kernel_size=3, layer_scale_init_value=1e-5, inference_mode=False):
        super().__init__()
        self.dim, self.kernel_size = dim, kernel_size
        self.inference_mode = inference_mode
        p = kernel_size // 2
        if inference_mode:
            self.reparam_conv = nn.Conv2d(dim, dim, kernel_size, 1, p, groups=dim, bias=True)
        else:
            self.norm = MobileOneBlock(dim, dim, kernel_size, 1, p, groups=dim, use_act=False,
                                       use_scale_branch=False, num_conv_branches=0)
            self.mixer = MobileOneBlock(dim, dim, kernel_size, 1, p, groups=dim, use_act=False)
            self.layer_scale = nn.Parameter(layer_scale_init_value * torch.ones(dim, 1, 1))

    def forward(self, x):
        if self.inference_mode:
            return self.reparam_conv(x)
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))

    @torch.no_grad()
    def reparameterize(self):
        if self.inference_mode:
            return
        wm, bm = self.mixer.fused_kernel_bias()
        wn, bn = self.norm.fused_kernel_bias()
        lam = self.layer_scale.reshape(-1)
        ident = reparam.identity_kernel(self.dim, self.dim, self.kernel_size, dtype=wm.dtype, device=wm.device)
        w = ident + lam[:, None, None, None] * (wm - wn)
        b = lam * (bm - bn)
        self.reparam_conv = reparam.make_conv(w, b, 1, self.kernel_size // 2, self.dim)
        del self.norm, self.mixer, self.layer_scale
        self.inference_mode = True


class ConvFFN(nn.Module):
    """dw7x7 (no bias) -> BatchNorm -> 1x1 (d -> r·d) -> GELU -> 1x1 (r·d -> d)."""

    def __init__(self, dim, hidden, kernel_size=7):
        super().__init__()
        self.conv = ConvBN(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1, bias=True)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1, bias=True)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.conv(x))))


class LayerNormChannel(nn.Module):
    """LayerNorm over the channel dim of an NCHW tensor (biased variance, eps 1e-5)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        # F.layer_norm over the last dim of the NHWC view, as timm's LayerNorm2d: one fused op
        # instead of seven passes over x; returns an NCHW-shaped view of the NHWC result
        return F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class MHSA(nn.Module):
    """Multi-head self-attention over the H·W positions (row-major), head_dim 32, qkv without bias."""

    def __init__(self, dim, head_dim=32):
        super().__init__()
        self.head_dim = head_dim
        self.num_heads = dim // head_dim
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        B, C, H, W = x.shape
        N = H * W
        t = x.flatten(2).transpose(1, 2)  # (B, N, C)
        qkv = self.qkv(t).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim)
        # softmax(q k^T · head_dim^-0.5) v, as timm's and transformers' FastViT compute it: through
        # PyTorch's fused attention where it has one (flash attention on CPU for fp32 / bf16 / fp16;
        # float64 takes its reference path), without an N x N matrix in memory
        o = F.scaled_dot_product_attention(q, k, v, scale=self.scale).transpose(1, 2).reshape(B, N, C)
        return self.proj(o).transpose(1, 2).reshape(B, C, H, W)


class RepCPE(nn.Module):
    """Conditional positional encoding ``x + dw7x7(x)``; inference form folds the residual."""

    def __init__(self, dim, kernel_size=7, inference_mode=False):
        super().__init__()
        self.dim, self.kernel_size = dim, kernel_size
        self.inference_mode = inference_mode
        if inference_mode:
            self.reparam_conv = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim, bias=True)
        else:
            self.pe = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim, bias=True)

    def forward(self, x):
        if self.inference_mode:
            return self.reparam_conv(x)
        return x + self.pe(x)

    @torch.no_grad()
    def reparameterize(self):
        if self.inference_mode:
            return
        w = self.pe.weight
        ident = reparam.identity_kernel(self.dim, self.dim, self.kernel_size, dtype=w.dtype, device=w.device)
        self.reparam_conv = reparam.make_conv(ident + w, self.pe.bias, 1, self.kernel_size // 2, self.dim)
        del self.pe
        self.inference_mode = True


class RepMixerBlock(nn.Module):
    """x = RepMixer(x); x = x + γ·ConvFFN(x)."""

    def __init__(self, dim, kernel_size=3, mlp_ratio=4.0, layer_scale_init_value=1e-5, inference_mode=False):
        super().__init__()
        self.token_mixer = RepMixer(dim, kernel_size, layer_scale_init_value, inference_mode)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio))
        self.layer_scale = nn.Parameter(layer_scale_init_value * torch.ones(dim, 1, 1))

    def forward(self, x):
        x = self.token_mixer(x)
        return x + self.layer_scale * self.convffn(x)


class AttentionBlock(nn.Module):
    """x = x + γ1·MHSA(LNc(x)); x = x + γ2·ConvFFN(x)."""

    def __init__(self, dim, head_dim=32, mlp_ratio=4.0, layer_scale_init_value=1e-5):
        super().__init__()
        self.norm = LayerNormChannel(dim)
        self.token_mixer = MHSA(dim, head_dim)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio))
        self.layer_scale_1 = nn.Parameter(layer_scale_init_value * torch.ones(dim, 1, 1))
        self.layer_scale_2 = nn.Parameter(layer_scale_init_value * torch.ones(dim, 1, 1))

    def forward(self, x):
        x = x + self.layer_scale_1 * self.token_mixer(self.norm(x))
        return x + self.layer_scale_2 * self.convffn(x)


# --------------------------------------------------------------------------------------------------
# the network
# --------------------------------------------------------------------------------------------------


class FastViTHD(nn.Module):
    """FastViTHD vision encoder.

    ``forward_features(pixels)``: (B, 3, H, W) in [0, 1] -> (B, 3072, ceil(H/64), ceil(W/64)).
    ``forward(pixels)``: -> tokens (B, N, 3072), N = ceil(H/64)·ceil(W/64), row-major.

    ``network`` is the flat list of the release: stage, [PatchEmbed, [RepCPE,] stage]...;
    ``network_layout`` names each entry as (kind, stage index).
    """

    def __init__(self, config: Optional[FastViTHDConfig] = None, inference_mode: bool = False):
        super().__init__()
        cfg = config if config is not None else FastViTHDConfig()
        if not isinstance(cfg, FastViTHDConfig):
            raise TypeError(f"FastViTHD: config must be a FastViTHDConfig, got {type(cfg).__name__}")
        self.config = cfg
        d = cfg.embed_dims
        im = inference_mode
        self.patch_embed = nn.Sequential(
            MobileOneBlock(cfg.in_chans, d[0], 3, 2, 1, inference_mode=im, use_scale_branch=False),
            MobileOneBlock(d[0], d[0], 3, 2, 1, groups=d[0], inference_mode=im, use_scale_branch=False),
            MobileOneBlock(d[0], d[0], 1, 1, 0, inference_mode=im, use_scale_branch=False),
        )
        network: List[nn.Module] = []
        self.network_layout: List[Tuple[str, int]] = []
        for i, depth in enumerate(cfg.layers):
            if i > 0:
                network.append(PatchEmbed(d[i - 1], d[i], cfg.down_patch_size, 2, inference_mode=im))
                self.network_layout.append(("downsample", i))
            if cfg.pos_embs[i]:
                network.append(RepCPE(d[i], cfg.cpe_kernel_size, inference_mode=im))
                self.network_layout.append(("pos_emb", i))
            if cfg.token_mixers[i] == "repmixer":
                blocks = [RepMixerBlock(d[i], cfg.repmixer_kernel_size, cfg.mlp_ratio,
                                        cfg.layer_scale_init_value, inference_mode=im) for _ in range(depth)]
            else:
                blocks = [AttentionBlock(d[i], cfg.head_dim, cfg.mlp_ratio, cfg.layer_scale_init_value)
                          for _ in range(depth)]
            network.append(nn.Sequential(*blocks))
            self.network_layout.append(("blocks", i))
        self.network = nn.ModuleList(network)
        self.conv_exp = MobileOneBlock(d[-1], cfg.num_features, 3, 1, 1, groups=d[-1], inference_mode=im,
                                       use_se=True, se_rd_ratio=cfg.se_rd_ratio)
        self.num_features = cfg.num_features
        self.downsample_factor = 2 ** (2 + len(cfg.layers) - 1)  # stem /4, one /2 per PatchEmbed
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ---- form ------------------------------------------------------------------------------------

    @property
    def inference_mode(self) -> bool:
        """True when no re-parameterizable branch is left (the form the checkpoints hold)."""
        return all(getattr(m, "inference_mode", True) for m in self.modules() if m is not self)

    @torch.no_grad()
    def reparameterize(self) -> "FastViTHD":
        """Fold every train-time branch into single convs, in place. Returns self."""
        for m in list(self.modules()):
            if m is not self and hasattr(m, "reparameterize"):
                m.reparameterize()
        return self

    # ---- forward ---------------------------------------------------------------------------------

    def output_grid(self, height: int, width: int) -> Tuple[int, int]:
        """Token grid for an input of height x width: every stride-2 layer maps n -> ceil(n/2)."""
        f = self.downsample_factor
        return -(-height // f), -(-width // f)

    def _check_input(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"FastViTHD: pixels must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"FastViTHD: pixels must be 4-D (B, {self.config.in_chans}, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.config.in_chans:
            raise ValueError(f"FastViTHD: pixels must have {self.config.in_chans} channels (dim 1), got shape {tuple(x.shape)}")
        if x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"FastViTHD: pixels must have H, W >= 1, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"FastViTHD: pixels must be floating point (in [0, 1]), got dtype {x.dtype}")
        # the stem's first weight tells the model's dtype, device and memory format (works for any
        # stem module, e.g. a fused one that holds packed buffers)
        w = next(t for t in itertools.chain(self.patch_embed.parameters(), self.patch_embed.buffers())
                 if t.is_floating_point())
        if x.dtype != w.dtype:
            raise TypeError(f"FastViTHD: pixels dtype {x.dtype} does not match the model's {w.dtype}; "
                            f"cast one of them (e.g. pixels.to({w.dtype}))")
        if x.device != w.device:
            raise ValueError(f"FastViTHD: pixels are on {x.device} but the model is on {w.device}")
        return w

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        w = self._check_input(x)
        # Follow the model's memory format, not the input's: NCHW and channels_last inputs then run
        # the same kernels and give identical results.
        channels_last_model = not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)
        fmt = torch.channels_last if channels_last_model else torch.contiguous_format
        x = x.contiguous(memory_format=fmt)
        if x.shape[0] == 0:
            gh, gw = self.output_grid(x.shape[2], x.shape[3])
            return x.new_zeros((0, self.num_features, gh, gw))
        x = self.patch_embed(x)
        for m in self.network:
            x = m(x)
        return self.conv_exp(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.forward_features(x)
        return f.flatten(2).transpose(1, 2)
