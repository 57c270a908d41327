"""Supervised training: the task computes the step from the backbone and the batch (the Task contract,
:class:`vitlab.tasks.base.Task`), for every task: classification, multi-label, detection, segmentation, diffusion."""

from __future__ import annotations

from typing import Any

import torch

from vitlab.recipes.base import Recipe


class Supervised(Recipe):
    task_agnostic = True

    def training_step(self, batch: dict) -> dict[str, Any]:
        return self.task.training_step(self.backbone, batch)

    def evaluation_step(self, batch: dict) -> dict[str, Any]:
        return self.task.evaluation_step(self.backbone, batch)

    def visualize(self, batch: dict) -> dict[str, list[torch.Tensor]]:
        """The task's pictures (drawn boxes, coloured masks, sample grids) for a validation batch."""
        return self.task.visualize(self.backbone, batch)
