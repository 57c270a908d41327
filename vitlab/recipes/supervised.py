"""Supervised training: images -> backbone -> task head -> loss against the labels."""

from __future__ import annotations

import torch

from vitlab.recipes.base import Recipe


class Supervised(Recipe):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.task(self.backbone(images))                          # (B, C)

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        logits = self(batch["image"])
        target = batch["label"]                                           # (B,) or soft (B, C)
        out = {"loss": self.task.loss(logits, target), "logits": logits.detach()}
        if target.ndim == 1:
            out["target"] = target
        return out

    def evaluation_step(self, batch: dict) -> dict[str, torch.Tensor]:
        logits = self(batch["image"])
        return {"loss": self.task.loss(logits, batch["label"]), "logits": logits, "target": batch["label"]}
