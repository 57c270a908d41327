"""The recipe interface: how one training / evaluation step is computed.

A recipe owns the backbone, the task and any extra modules its algorithm
needs (an MAE decoder, DINO heads and an EMA teacher). It is pure torch: the
Lightning module only calls these methods, so recipes are testable alone.

The hooks the Lightning module calls, in order, for one optimizer step::

    setup_schedule(total_steps, steps_per_epoch)      # once, when the optimizer is built
    training_step(batch)                              # forward + loss (twice per step under SAM)
    on_before_optimizer_step(step, epoch)             # gradients are ready (DINO freezes its last layer here)
    on_after_optimizer_step(step, epoch)              # weights were updated (DINO's EMA teacher follows here)

Evaluation: ``evaluation_step(batch)``; ``features(images)`` gives the frozen representation the kNN and linear
probes read; ``eval_backbone()`` is the backbone that is evaluated and exported for fine-tuning (DINO: the
teacher's). Pretraining recipes (``pretraining = True``) do not train the classification task: they freeze it,
report no top-k accuracy, and the kNN monitor (vitlab/lit/probes.py) follows them instead.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, Optional, Sequence

import torch
from torch import nn

LRScaling = Literal["linear", "sqrt", "none"]
Feature = Literal["pooled", "cls", "avg"]


class Recipe(nn.Module):
    """Base class. Subclasses implement :meth:`training_step` and :meth:`evaluation_step`.

    ``monitor`` / ``monitor_mode``: the validation metric that picks checkpoints/best.ckpt (lit/build.py gives them to
    the checkpoint callback). None: no metric, best.ckpt is the latest epoch's (pretraining). ``"auto"``: the task's
    own (``task.monitor``: val/top1 for classification, val/map for detection, val/miou for segmentation).
    """

    pretraining: bool = False

    def __init__(self, backbone: nn.Module, task: nn.Module, lr_scaling: LRScaling = "linear",
                 lr_base_batch: int | Literal["auto"] = 256, monitor: Optional[str] = "auto",
                 monitor_mode: Literal["max", "min"] = "max"):
        super().__init__()
        if lr_scaling not in ("linear", "sqrt", "none"):
            raise ValueError(f"lr_scaling must be linear, sqrt or none, got {lr_scaling!r}")
        if monitor_mode not in ("max", "min"):
            raise ValueError(f"monitor_mode must be max or min, got {monitor_mode!r}")
        self.backbone = backbone
        self.task = task
        if lr_base_batch == "auto":                 # the task's convention: 256 images (classification), 16 (dense)
            lr_base_batch = int(getattr(task, "lr_base_batch", 256))
        if monitor == "auto":                       # the task's metric, and its direction
            monitor, monitor_mode = getattr(task, "monitor", "val/top1"), getattr(task, "monitor_mode", monitor_mode)
        self.lr_scaling = lr_scaling
        self.lr_base_batch = lr_base_batch
        self.monitor = monitor
        self.monitor_mode = monitor_mode

    # ------------------------------------------------------------ wiring ---
    @classmethod
    def backbone_options(cls, **recipe_cfg: Any) -> dict:
        """Extra keyword arguments the backbone factory needs for this recipe, from the recipe's config
        (SimMIM: a learned mask token; DeiT distillation: a distillation token). lit/build.py passes them."""
        return {}

    def train_transform(self, img_size: int, mean: Sequence[float], std: Sequence[float],
                        in_chans: int) -> Optional[Callable]:
        """A training transform that replaces the configured one (DINO's multi-crop), or None."""
        return None

    def freeze(self, *modules: Optional[nn.Module]) -> None:
        """Stop training these modules (e.g. the classification task during pretraining). DDP requires every
        trainable parameter to take part in each step's loss, so a recipe freezes what its loss never reads."""
        for m in modules:
            if m is not None:
                m.requires_grad_(False)

    # ------------------------------------------------------- learning rate ---
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

    # ------------------------------------------------------------- hooks ---
    def setup_schedule(self, total_steps: int, steps_per_epoch: int) -> None:
        """Called once before training with the number of optimizer steps (for per-step schedules)."""

    def on_before_optimizer_step(self, step: int, epoch: int) -> None:
        """Gradients of optimizer step ``step`` are ready (after accumulation), before clipping and the update."""

    def on_after_optimizer_step(self, step: int, epoch: int) -> None:
        """The optimizer has just applied step ``step`` (0-based)."""

    # ------------------------------------------------------------- steps ---
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) of the task head on the backbone (untrained for pretraining recipes)."""
        return self.task(self.backbone(images))

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Return at least {"loss": scalar}; other scalar entries are logged under train/.
        With hard labels, "logits" (B, C) and "target" (B,) update the train top-1."""
        raise NotImplementedError

    def evaluation_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Return scalars to log (e.g. "loss"), and "logits" (B, C) + "target" (B,) to update the top-k metrics
        (pretraining recipes return no logits)."""
        raise NotImplementedError

    # -------------------------------------------------------- evaluation ---
    def eval_backbone(self) -> nn.Module:
        """The backbone that is evaluated (kNN, linear probe) and exported for fine-tuning."""
        return self.backbone

    @torch.no_grad()
    def features(self, images: torch.Tensor, feature: Feature = "pooled") -> torch.Tensor:
        """The frozen image representation (B, D): ``pooled`` (the backbone's global_pool), ``cls`` (the class
        token) or ``avg`` (the mean of the final patch tokens)."""
        f = self.eval_backbone()(images)
        if feature == "avg":
            return f["patch"].mean(dim=1)
        if feature not in ("pooled", "cls"):
            raise ValueError(f"feature must be pooled, cls or avg, got {feature!r}")
        if feature not in f:
            raise ValueError(f"the backbone has no {feature!r} feature (no class token?); use feature=avg")
        return f[feature]

    def visualize(self, batch: dict) -> dict[str, list[torch.Tensor]]:
        """Pictures of what the recipe does, for a validation batch: name -> rows of images (n, C, H, W) in the
        data's normalised space. A callback de-normalises them and saves one PNG grid per name and epoch."""
        return {}
