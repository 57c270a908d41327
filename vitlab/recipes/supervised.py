"""Supervised training: images -> backbone -> task head -> loss against the labels (classification), or the
boxes / masks of a dense task, which computes its own step from the backbone and the batch
(:class:`vitlab.heads.dense.DenseTask`)."""

from __future__ import annotations

from typing import Any

import torch

from vitlab.recipes.base import Recipe


def is_dense(task: torch.nn.Module) -> bool:
    """A detection or segmentation task (it reads the backbone and the whole batch), not a classifier."""
    return getattr(task, "kind", "classification") != "classification"


class Supervised(Recipe):
    def forward(self, images: torch.Tensor) -> Any:
        if is_dense(self.task):                     # detections per image, or segmentation logits (B, C, H, W)
            return self.task.predict(self.backbone, images)
        return self.task(self.backbone(images))                          # (B, C)

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        if is_dense(self.task):
            return self.task.training_step(self.backbone, batch)
        logits = self(batch["image"])
        target = batch["label"]                                           # (B,) or soft (B, C)
        out = {"loss": self.task.loss(logits, target), "logits": logits.detach()}
        if target.ndim == 1:
            out["target"] = target
        return out

    def evaluation_step(self, batch: dict) -> dict[str, Any]:
        if is_dense(self.task):
            return self.task.evaluation_step(self.backbone, batch)
        logits = self(batch["image"])
        return {"loss": self.task.loss(logits, batch["label"]), "logits": logits, "target": batch["label"]}

    def visualize(self, batch: dict) -> dict[str, list[torch.Tensor]]:
        if is_dense(self.task):                     # drawn boxes / coloured masks (uint8 pictures)
            return self.task.visualize(self.backbone, batch)
        return {}
