"""Conditioning layers of diffusion transformers: adaptive LayerNorm modulation and the timestep / class embedders.

From DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023): the conditioning vector
c = t_emb + y_emb regresses a per-sample shift and scale applied after a LayerNorm without affine parameters
(adaLN, the FiLM idea of Perez et al. 2018), and a gate on each residual branch (adaLN-Zero). The timestep goes
through the transformer's sinusoidal code (Vaswani et al. 2017, as in DDPM, Ho et al. 2020) and a small MLP;
the class label through a table with one extra row, the "null" label of classifier-free guidance (Ho & Salimans,
"Classifier-Free Diffusion Guidance", 2022). Label dropout is the caller's job (it swaps labels for the null one).

Parameter names follow DiT's reference code (``mlp``, ``embedding_table``) so its checkpoints load as they are.
Imports torch only.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, D) scaled by (1 + scale) and shifted, per sample; shift, scale (B, D).

    ``1 + scale`` (not ``scale``) so that a zero-initialised modulation leaves the normalised x unchanged.
    """
    return x * (1 + scale[:, None]) + shift[:, None]                        # (B, N, D)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal code of (possibly fractional) timesteps: t (B,) -> (B, dim) float32, DiT's layout.

    Frequencies f_i = exp(-ln(max_period) * i / half), i < half = dim // 2; the code is [cos(t f), sin(t f)]
    (cosines first) and one zero column is appended when dim is odd. t = 0 gives ones then zeros.
    """
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects t of shape (B,), got {tuple(t.shape)}; "
                         "flatten it or pass one timestep per sample")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                                 # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)            # (B, 2 * half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)       # (B, dim)
    return emb


class TimestepEmbedder(nn.Module):
    """t (B,) -> sinusoidal code of width ``freq_dim`` -> Linear -> SiLU -> Linear -> (B, hidden)."""

    def __init__(self, hidden: int, freq_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.freq_dim, self.max_period)        # (B, freq_dim) float32
        return self.mlp(freq.to(self.mlp[0].weight.dtype))                  # (B, hidden)


class LabelEmbedder(nn.Module):
    """Class labels (B,) in [0, num_classes] -> (B, hidden); row ``num_classes`` is the null (unconditional) label.

    The range is checked only for CPU tensors: checking a GPU tensor would wait for the device every step
    (an out-of-range index there fails inside the embedding kernel instead).
    """

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"LabelEmbedder needs num_classes >= 1, got {num_classes}; an unconditional model "
                             "has no label embedder (DiT with num_classes=0)")
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)         # + the null label

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise TypeError(f"class labels must be an integer tensor (torch.long), got {y.dtype}; "
                            "pass labels as y.long()")
        if y.device.type == "cpu" and y.numel() and not torch.compiler.is_compiling():
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi > self.num_classes:
                raise ValueError(f"class labels must lie in [0, {self.num_classes}] ({self.num_classes} = the null "
                                 f"label for classifier-free guidance), got values in [{lo}, {hi}]: check the "
                                 "model's num_classes against the dataset's")
        return self.embedding_table(y)                                      # (B, hidden)
