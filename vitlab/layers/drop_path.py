"""Stochastic depth (Huang et al. 2016), per sample, as used by DeiT and later ViTs."""

from __future__ import annotations

import torch
from torch import nn


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Zero the whole residual branch for a random subset of samples, rescaling the rest by 1/(1-p)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"


def linear_drop_path_rates(rate: float, depth: int) -> list[float]:
    """The linear rule of DeiT: block i of `depth` drops with rate * i / (depth - 1)."""
    if depth == 1:
        return [rate]
    return [rate * i / (depth - 1) for i in range(depth)]
