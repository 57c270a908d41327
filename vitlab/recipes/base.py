"""The recipe interface: how one training / evaluation step is computed.

A recipe owns the backbone, the task and any extra modules its algorithm
needs (an MAE decoder, DINO heads and an EMA teacher). It is pure torch: the
Lightning module only calls these methods, so recipes are testable alone.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

LRScaling = Literal["linear", "sqrt", "none"]


class Recipe(nn.Module):
    """Base class. Subclasses implement :meth:`training_step` and :meth:`evaluation_step`."""

    def __init__(self, backbone: nn.Module, task: nn.Module, lr_scaling: LRScaling = "linear",
                 lr_base_batch: int = 256):
        super().__init__()
        if lr_scaling not in ("linear", "sqrt", "none"):
            raise ValueError(f"lr_scaling must be linear, sqrt or none, got {lr_scaling!r}")
        self.backbone = backbone
        self.task = task
        self.lr_scaling = lr_scaling
        self.lr_base_batch = lr_base_batch

    def scaled_lr(self, base_lr: float, global_batch: int) -> float:
        """The recipe's learning-rate scaling rule, e.g. linear: lr = base_lr * global_batch / 256."""
        ratio = global_batch / self.lr_base_batch
        if self.lr_scaling == "linear":
            return base_lr * ratio
        if self.lr_scaling == "sqrt":
            return base_lr * math.sqrt(ratio)
        return base_lr

    def describe_lr(self, base_lr: float, global_batch: int) -> str:
        lr = self.scaled_lr(base_lr, global_batch)
        if self.lr_scaling == "none":
            return f"lr = {lr:.4g} (no scaling rule)"
        f = "" if self.lr_scaling == "linear" else "sqrt"
        return f"lr = {base_lr:.4g} x {f}({global_batch}/{self.lr_base_batch}) = {lr:.4g} ({self.lr_scaling} rule)"

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Return at least {"loss": scalar}; other scalar entries are logged under train/."""
        raise NotImplementedError

    def evaluation_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Return {"loss": scalar, "logits": (B, C), "target": (B,)} for metric updates."""
        raise NotImplementedError
