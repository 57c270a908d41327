"""The multi-head self-attention module and the pre-norm transformer block every vitlab ViT is made of (and the
MAE decoder, and DiT's attention). Attention runs through :func:`vitlab.layers.attention.attention`, the one
place that picks the kernel."""

from __future__ import annotations

import torch
from torch import nn

from vitlab.layers.attention import attention
from vitlab.layers.drop_path import DropPath
from vitlab.layers.layer_scale import LayerScale
from vitlab.layers.mlp import Mlp
from vitlab.layers.pos_embed import RotaryEmbedding2D
from vitlab.layers.window import window_partition, window_shape, window_unpartition


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                num_prefix_tokens: int = 0, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D); key_padding_mask (B, T) bool, True = a real token (padded tokens are never attended to)."""
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                            # (B, H, T, Dh) each
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q = RotaryEmbedding2D.rotate(q, cos, sin, num_prefix_tokens)
            k = RotaryEmbedding2D.rotate(k, cos, sin, num_prefix_tokens)
        x = attention(q, k, v, key_padding_mask=key_padding_mask, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, T, D)                             # (B, T, D)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(LS(Attn(LN(x)))), then the same with the MLP.

    ``window_size`` > 0 (ViTDet): the patch tokens attend within window_size x window_size windows of the grid
    (zero-padded after norm1 to a multiple of the window, cropped after attention, as ViTDet; the padded slots
    are attended to, as there); prefix tokens (class / distillation / registers) attend among themselves only.
    The MLP half is unchanged. No parameters are added: a windowed block loads the same weights as a global one.
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, qkv_bias: bool = True, qk_norm: bool = False,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 layer_scale_init: float | None = None, window_size: int = 0):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_norm, attn_drop, drop)
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim, drop)
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, rope=None, num_prefix_tokens: int = 0,
                key_padding_mask: torch.Tensor | None = None, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """x (B, P + N, D). A windowed block needs ``grid`` (h, w) with h * w = N, no key_padding_mask, and
        ``rope`` (if any) already partitioned into windows: (nW, wh * ww, Dh/2) tables (the model does it)."""
        if self.window_size:
            y = self._window_attention(self.norm1(x), rope, num_prefix_tokens, grid)
        else:
            y = self.attn(self.norm1(x), rope, num_prefix_tokens, key_padding_mask)
        x = x + self.drop_path1(self.ls1(y))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x

    def _window_attention(self, x: torch.Tensor, rope, P: int, grid: tuple[int, int] | None) -> torch.Tensor:
        """ViTDet's windowed attention of normed tokens x (B, P + N, D) -> (B, P + N, D)."""
        B, T, D = x.shape
        if grid is None or grid[0] * grid[1] != T - P:
            raise ValueError(f"window attention needs the full patch grid: got {T - P} patch tokens for grid {grid}")
        h, w = grid
        window = window_shape(self.window_size, grid)
        xw, padded = window_partition(x[:, P:].reshape(B, h, w, D), window)      # (B*nW, wh*ww, D)
        if rope is not None:                                                  # (nW, wh*ww, Dh/2) -> (B*nW, 1, ., .)
            rope = tuple(t.unsqueeze(0).expand(B, -1, -1, -1).reshape(-1, 1, *t.shape[1:]) for t in rope)
        yw = self.attn(xw, rope, 0)                                           # (B*nW, wh*ww, D)
        y = window_unpartition(yw, window, padded, grid).reshape(B, h * w, D)   # (B, N, D)
        if P:                                                                 # prefix tokens: among themselves
            y = torch.cat([self.attn(x[:, :P]), y], dim=1)
        return y
