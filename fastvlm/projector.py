"""The mlp2x_gelu projector: Linear(3072, H) -> GELU (erf) -> Linear(H, H), per token."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Projector", "PROJECTOR_HIDDEN_SIZES"]

#: LLM hidden size H of the released FastVLM sizes.
PROJECTOR_HIDDEN_SIZES = {"0.5b": 896, "1.5b": 1536, "7b": 3584}


class Projector(nn.Module):
    """Maps vision tokens (B, N, in_features) to LLM embeddings (B, N, hidden_size)."""

    def __init__(self, in_features: int = 3072, hidden_size: int = 896):
        super().__init__()
        self.in_features, self.hidden_size = in_features, hidden_size
        self.linear_1 = nn.Linear(in_features, hidden_size, bias=True)
        self.linear_2 = nn.Linear(hidden_size, hidden_size, bias=True)

    @classmethod
    def for_model(cls, size: str, in_features: int = 3072) -> "Projector":
        """The projector of a released FastVLM size: '0.5b', '1.5b' or '7b'."""
        key = size.lower()
        if key not in PROJECTOR_HIDDEN_SIZES:
            raise ValueError(f"Projector.for_model: size must be one of {sorted(PROJECTOR_HIDDEN_SIZES)}, got {size!r}")
        return cls(in_features, PROJECTOR_HIDDEN_SIZES[key])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"Projector: input must be a torch.Tensor, got {type(x).__name__}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Projector: last dim must be {self.in_features}, got shape {tuple(x.shape)}")
        return self.linear_2(F.gelu(self.linear_1(x)))
