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

Declared for the composition root (``vitlab/lit/build.py``), which reads them and never probes a recipe:

- ``task_agnostic``: the recipe trains any task through the Task contract (supervised); False: it reads images
  (and class labels) only, so the task must be ``Task.pretrainable`` (classification);
- ``backbone_options(options)``: extra backbone factory arguments (SimMIM's mask token, DeiT's distillation token);
- ``from_config(options, backbone, task, context)``: the recipe from its config block (Distill loads its teacher
  through ``context``);
- ``layer_id(name)`` / ``num_layers`` / ``fsdp_units()`` / ``pretrained_heads()``: what the optimizer builder, FSDP
  and ``weights=`` read, from the backbone's contract plus the recipe's own modules.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Literal, Optional, Sequence

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
    task_agnostic: ClassVar[bool] = False

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
            lr_base_batch = int(task.lr_base_batch)
        if monitor == "auto":                       # the task's metric, and its direction
            monitor, monitor_mode = task.monitor, task.monitor_mode
        self.lr_scaling = lr_scaling
        self.lr_base_batch = lr_base_batch
        self.monitor = monitor
        self.monitor_mode = monitor_mode

    # ------------------------------------------------------------ wiring ---
    @classmethod
    def backbone_options(cls, options: dict) -> dict:
        """Extra keyword arguments the backbone factory needs for this recipe, from the recipe's config
        (SimMIM: a learned mask token; DeiT distillation: a distillation token). lit/build.py passes them."""
        return {}

    @classmethod
    def preflight(cls, options: dict) -> None:
        """Check, before any work, files the options name but the recipe reads only later (Distill's teacher)."""

    @classmethod
    def from_config(cls, options: dict, backbone: nn.Module, task: nn.Module, context: Any = None) -> "Recipe":
        """The recipe from its config block (without ``_target_``); ``context``
        (:class:`vitlab.tasks.base.BuildContext`) loads other checkpoints for recipes that need them."""
        return cls(backbone=backbone, task=task, **options)

    # ------------------------------------------- what others read of a recipe ---
    @property
    def num_layers(self) -> int:
        """The backbone's depth for layer-wise lr decay (0: it has no layers to decay)."""
        return int(self.backbone.num_layers)

    def layer_id(self, name: str) -> int:
        """Layer of recipe parameter ``name`` for layer-wise lr decay: the backbone's own ids for ``backbone.*``
        (its contract's :meth:`~vitlab.backbones.base.Backbone.layer_id`); the task head and every other module
        of the recipe (an MAE decoder, DINO heads) -> ``num_layers + 1``, the full lr."""
        if name.startswith("backbone."):
            return self.backbone.layer_id(name[len("backbone."):])
        return self.num_layers + 1

    def fsdp_units(self) -> list[nn.Module]:
        """The modules FSDP shards as one unit each: the backbone's blocks (recipes add their own, e.g. MAE's
        decoder blocks)."""
        return list(self.backbone.fsdp_units())

    def pretrained_heads(self) -> dict[str, nn.Module]:
        """Heads that take a classifier from external pretrained weights (``weights=`` timm ViT / DeiT files)."""
        return dict(self.task.pretrained_heads())

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
    def forward(self, images: torch.Tensor) -> Any:
        """The task's prediction on the backbone (logits (B, C) for classification; untrained for pretraining
        recipes, which freeze the task)."""
        return self.task.predict(self.backbone, images)

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Return at least {"loss": scalar}; other scalar entries are logged under train/; "preds" and "target"
        update the task's training metrics (classification: the train top-1 on hard labels)."""
        raise NotImplementedError

    def evaluation_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Return scalars to log (e.g. "loss"), and "preds" + "target" to update the task's metrics (pretraining
        recipes return none)."""
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
