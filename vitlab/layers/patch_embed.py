"""Image to patch tokens."""

from __future__ import annotations

import torch
from torch import nn


def to_2tuple(x: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """An image size or a grid: 224 -> (224, 224); (h, w) or [h, w] -> (h, w)."""
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches, linearly embedded by a strided convolution.

    Any input whose sides are multiples of the patch size is accepted; the
    grid it produces is returned alongside the tokens.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        B, C, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not divisible by the patch size {p}")
        x = self.proj(x)                                   # (B, D, h, w)
        grid = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), grid          # (B, N, D)
