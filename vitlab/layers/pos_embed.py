"""Position information: learned absolute embeddings (with resampling), fixed 2-D sin-cos, and 2-D axial RoPE."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------- absolute ---

def resample_abs_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int],
                           old_grid: tuple[int, int] | None = None,
                           num_prefix_tokens: int = 0) -> torch.Tensor:
    """Bicubically resample a (1, P + h*w, D) table to a new (h', w') grid.

    The first ``num_prefix_tokens`` rows (class / register tokens) are kept as
    they are. ``old_grid`` defaults to a square grid.
    """
    prefix, grid_pe = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n_old = grid_pe.shape[1]
    if old_grid is None:
        side = int(math.isqrt(n_old))
        if side * side != n_old:
            raise ValueError(f"cannot infer a square grid from {n_old} position embeddings; pass old_grid")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    D = grid_pe.shape[-1]
    orig_dtype = grid_pe.dtype
    grid_pe = grid_pe.reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2).float()   # (1, D, h, w)
    grid_pe = F.interpolate(grid_pe, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=True)
    grid_pe = grid_pe.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D).to(orig_dtype)
    return torch.cat([prefix, grid_pe], dim=1)


def sincos_2d_pos_embed(embed_dim: int, grid_hw: tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings (1, [1 +] h*w, D), as MAE's ``get_2d_sincos_pos_embed``.

    Half of the channels encode the patch's column (x) and half its row (y), each as [sin, cos] of the
    coordinate at frequencies 10000^(-k / (D/4)); rows are in row-major grid order (the order of
    PatchEmbed's tokens). ``cls_token`` prepends an all-zero row for a class token. Used by the MAE
    decoder (He et al. 2022), where the table is a fixed buffer, not a parameter.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos position embeddings need a width divisible by 4, got {embed_dim}; "
                         "pick a multiple of 4 (e.g. the MAE decoder's decoder_embed_dim)")
    h, w = int(grid_hw[0]), int(grid_hw[1])
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)          # (D/4,)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")                                                 # (h, w) each

    def one_axis(pos: torch.Tensor) -> torch.Tensor:                                       # (h*w,) -> (h*w, D/2)
        ang = pos.reshape(-1, 1) * omega
        return torch.cat([ang.sin(), ang.cos()], dim=1)

    # MAE's order: the first half from the column coordinate, the second from the row coordinate.
    emb = torch.cat([one_axis(xs), one_axis(ys)], dim=1).float()                           # (h*w, D)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim), emb], dim=0)
    return emb.unsqueeze(0)


# ------------------------------------------------------------ 2-D axial RoPE ---

class RotaryEmbedding2D(nn.Module):
    """Axial 2-D rotary position embedding (Heo et al., "Rotary Position Embedding
    for Vision Transformer", ECCV 2024, the RoPE-Axial variant).

    Half of each head's channel pairs rotate with the patch's x coordinate and
    half with its y coordinate, at frequencies theta^(-k / (Dh/4)). Positions
    are patch indices, so a model trained on one grid runs on another with no
    resampling. Prefix tokens (class, registers) are left unrotated.
    """

    def __init__(self, head_dim: int, theta: float = 100.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
        self.head_dim = head_dim
        quarter = head_dim // 4
        freqs = theta ** (-torch.arange(quarter, dtype=torch.float32) / quarter)     # (Dh/4,)
        self.register_buffer("freqs", freqs, persistent=False)

    def angles(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables of shape (h*w, Dh/2) for a (h, w) grid."""
        h, w = grid
        ys, xs = torch.meshgrid(torch.arange(h, device=self.freqs.device, dtype=torch.float32),
                                torch.arange(w, device=self.freqs.device, dtype=torch.float32), indexing="ij")
        ang = torch.cat([xs.reshape(-1, 1) * self.freqs, ys.reshape(-1, 1) * self.freqs], dim=-1)  # (N, Dh/2)
        return ang.cos(), ang.sin()

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_prefix_tokens: int = 0) -> torch.Tensor:
        """Rotate channel pairs (2i, 2i+1) of the patch tokens of x: (B, H, T, Dh)."""
        prefix, t = x[..., :num_prefix_tokens, :], x[..., num_prefix_tokens:, :]
        t2 = t.float().reshape(*t.shape[:-1], -1, 2)                                  # (B, H, N, Dh/2, 2)
        a, b = t2[..., 0], t2[..., 1]
        rot = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
        return torch.cat([prefix, rot.to(x.dtype)], dim=-2)
