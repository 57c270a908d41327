"""Learning-rate schedules, stepped once per optimizer step."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr: linear from ~0 over warmup_steps, then cosine down to min_lr_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int,
                    warmup_epochs: float = 0.0, warmup_steps: Optional[int] = None,
                    min_lr_ratio: float = 0.0) -> LambdaLR:
    """Cosine decay with linear warmup, per step. Warmup in epochs unless ``warmup_steps`` is given."""
    warm = warmup_steps if warmup_steps is not None else int(round(warmup_epochs * steps_per_epoch))
    warm = min(warm, max(0, total_steps - 1))
    return LambdaLR(optimizer, lambda s: warmup_cosine_factor(s, total_steps, warm, min_lr_ratio))


def constant_schedule(optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int,
                      warmup_epochs: float = 0.0, warmup_steps: Optional[int] = None) -> LambdaLR:
    """Constant lr after an optional linear warmup."""
    warm = warmup_steps if warmup_steps is not None else int(round(warmup_epochs * steps_per_epoch))
    return LambdaLR(optimizer, lambda s: (s + 1) / warm if warm and s < warm else 1.0)
