"""Non-overlapping windows of a patch grid (ViTDet's window attention; Li et al., "Exploring Plain Vision
Transformer Backbones for Object Detection", ECCV 2022): partition a (B, h, w, C) grid into windows and back."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def window_shape(window_size: int, grid: tuple[int, int]) -> tuple[int, int]:
    """The (wh, ww) window on a (h, w) grid: window_size, shrunk to the grid along an axis it exceeds.

    A window larger than the grid is the whole grid along that axis (no padding), so window_size >= grid is
    global attention among the patches, not attention over zero padding.
    """
    return min(window_size, grid[0]), min(window_size, grid[1])


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """ViTDet's window_partition: (B, h, w, C) -> (B * nW, wh * ww, C) windows in row-major order.

    The grid is zero-padded bottom/right to a multiple of the window; returns the padded grid (Hp, Wp) too.
    """
    B, h, w, C = x.shape
    wh, ww = window
    pad_h, pad_w = (-h) % wh, (-w) % ww
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))                           # (B, Hp, Wp, C)
    Hp, Wp = h + pad_h, w + pad_w
    x = x.view(B, Hp // wh, wh, Wp // ww, ww, C).permute(0, 1, 3, 2, 4, 5)  # (B, nH, nW, wh, ww, C)
    return x.reshape(-1, wh * ww, C), (Hp, Wp)


def window_unpartition(windows: torch.Tensor, window: tuple[int, int], padded: tuple[int, int],
                       grid: tuple[int, int]) -> torch.Tensor:
    """The inverse: (B * nW, wh * ww, C) -> (B, h, w, C), the padding cropped away."""
    wh, ww = window
    Hp, Wp = padded
    C = windows.shape[-1]
    x = windows.view(-1, Hp // wh, Wp // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)   # (B, nH, wh, nW, ww, C)
    x = x.reshape(-1, Hp, Wp, C)
    return x[:, :grid[0], :grid[1]]
