"""LayerScale (Touvron et al., "Going deeper with Image Transformers", CaiT 2021)."""

from __future__ import annotations

import torch
from torch import nn


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch, initialised small (e.g. 1e-5 or 0.1)."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma
