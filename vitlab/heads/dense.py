"""The interface of dense tasks (detection, semantic segmentation): what the recipe and the Lightning module call.

A classification task maps one feature vector to logits; a dense task needs more of the image: several
feature scales, the batch's boxes or masks, several backbone passes for sliding-window inference. So a dense
task is handed the *backbone* (a callable ``images -> feature dict``) and the batch, and computes everything
past it::

    training_step(backbone, batch)   -> {"loss": scalar, <loss parts>: scalars}        logged under train/
    evaluation_step(backbone, batch) -> {"preds": ..., "target": ..., <scalars>}      metric.update(preds, target)
    compute_metrics(metric)          -> {"map": scalar, "map_50": scalar, ...}        logged as val/<name>, test/<name>
    predict(backbone, images)        -> the task's predictions (detections per image, or logits (B, C, H, W))
    visualize(backbone, batch)       -> {name: [rows of uint8 pictures (n, 3, H, W)]} saved as PNG grids

The builder (vitlab/lit/build.py) passes a task the values it names in its signature, from the backbone and the
data: ``in_dim``, ``num_classes``, ``patch_size``, ``img_size``, ``class_names``, ``mean``, ``std``,
``ignore_index``, ``palette``. ``backbone_options(**task_cfg)`` returns extra backbone arguments the task needs
(e.g. ``out_indices`` for intermediate feature taps), as recipes do.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

Backbone = Callable[[torch.Tensor], dict]


class DenseTask(nn.Module):
    kind: str = "?"                  # "detection" | "segmentation": must match the data source's ``task``
    monitor: str = "?"               # the validation metric that picks best.ckpt (recipe.monitor=auto)
    monitor_mode: str = "max"
    lr_base_batch: int = 16          # recipe.lr_base_batch=auto: optim.lr is quoted for 16 images (mmdet / mmseg)

    def __init__(self, mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                 class_names: Optional[Sequence[str]] = None):
        super().__init__()
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.class_names = list(class_names) if class_names is not None else None

    @classmethod
    def backbone_options(cls, **task_cfg: Any) -> dict:
        return {}

    def training_step(self, backbone: Backbone, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def evaluation_step(self, backbone: Backbone, batch: dict) -> dict[str, Any]:
        raise NotImplementedError

    def metrics(self, validate_args: bool = True):
        raise NotImplementedError

    def compute_metrics(self, metric) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict(self, backbone: Backbone, images: torch.Tensor) -> Any:
        raise NotImplementedError

    def visualize(self, backbone: Backbone, batch: dict) -> dict[str, list[torch.Tensor]]:
        return {}

    def to_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, C, H, W) -> uint8 RGB pictures (B, 3, H, W) for drawing on."""
        x = images.detach().float().cpu()
        x = x * torch.tensor(self.std).view(1, -1, 1, 1) + torch.tensor(self.mean).view(1, -1, 1, 1)
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]
