"""Multi-label classification: several classes per image, one sigmoid each (``task=multilabel``).

The head is classification's (dropout + linear on a named backbone feature); the loss is binary cross-entropy
with logits over every class, averaged over batch and classes (optionally with label smoothing towards 0.5:
``y (1 - eps) + eps / 2``). Targets are multi-hot vectors (B, C) from a multi-label reader
(:class:`vitlab.data.MultiLabelFileList`), or mixup / cutmix blends of them.

Metrics (torchmetrics, on the sigmoid probabilities):

- ``map_macro``: the mean over classes of each class's average precision (the "mAP" of multi-label papers on
  VOC 2007, COCO, NUS-WIDE; ML-Decoder, ASL, Query2Label); classes without a positive in the split are left out
  of the mean (torchmetrics' ``MultilabelAveragePrecision``); it picks best.ckpt;
- ``map_micro``: average precision over all (image, class) pairs pooled;
- ``f1_macro`` / ``f1_micro``: F1 at ``threshold`` (0.5), per class then averaged / pooled.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MultilabelAveragePrecision, MultilabelF1Score

from vitlab.data.base import DataInfo
from vitlab.tasks.base import BuildContext, Task
from vitlab.tasks.classification import ClassificationHead


class MultiLabelTask(Task):
    """Head + per-class BCE + mAP / F1 (module docstring). Built from the data (``num_classes``) and the backbone
    (``in_dim`` = its ``embed_dim``) by :meth:`from_data`."""

    kind = "multilabel"
    data_kind = "multilabel"
    data_hint = "a multi-label reader: data=multilabel (lists whose rows name several labels)"
    monitor = "val/map_macro"
    monitor_mode = "max"
    curve_metrics = ("map_macro", "f1_micro")
    lr_base_batch = 256

    def __init__(self, in_dim: int, num_classes: int, feature: Literal["pooled", "cls", "avg"] = "pooled",
                 head_dropout: float = 0.0, label_smoothing: float = 0.0, threshold: float = 0.5,
                 mean: tuple = (0.485, 0.456, 0.406), std: tuple = (0.229, 0.224, 0.225), class_names=None):
        super().__init__(mean, std, class_names)
        if num_classes < 1:
            raise ValueError(f"task=multilabel needs at least one class, got num_classes={num_classes}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"task.label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"task.threshold (the probability above which a class is predicted, for F1) must be in "
                             f"(0, 1), got {threshold!r}")
        self.num_classes = int(num_classes)
        self.label_smoothing = float(label_smoothing)
        self.threshold = float(threshold)
        self.head = ClassificationHead(in_dim, num_classes, feature, head_dropout)

    @classmethod
    def from_data(cls, options: dict, data: DataInfo, backbone: Any, context: Optional[BuildContext] = None
                  ) -> "MultiLabelTask":
        return cls(in_dim=int(backbone.embed_dim), num_classes=int(data.num_classes), mean=data.mean, std=data.std,
                   class_names=data.class_names, **options)

    def forward(self, features: dict) -> torch.Tensor:
        return self.head(features)                                         # (B, C) logits

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """BCE with logits against multi-hot (or mixed) targets (B, C), in float32."""
        if target.shape != logits.shape:
            raise ValueError(f"task=multilabel needs a multi-hot target per image, shape (B, C) = "
                             f"{tuple(logits.shape)}, got {tuple(target.shape)}: use a multi-label reader "
                             "(data=multilabel), not single-label data")
        y = target.float()
        if self.label_smoothing:
            y = y * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        return F.binary_cross_entropy_with_logits(logits.float(), y)

    # ------------------------------------------------------------- steps ---
    def training_step(self, backbone: Any, batch: dict) -> dict[str, torch.Tensor]:
        logits = self(backbone(batch["image"]))
        return {"loss": self.loss(logits, batch["label"])}

    def evaluation_step(self, backbone: Any, batch: dict) -> dict[str, torch.Tensor]:
        logits = self(backbone(batch["image"]))
        target = batch["label"]
        return {"loss": self.loss(logits, target), "preds": logits.float().sigmoid(), "target": target.long()}

    def predict(self, backbone: Any, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, C); ``.sigmoid()`` gives each class's probability."""
        return self(backbone(images))

    def pretrained_heads(self) -> dict[str, nn.Module]:
        return {"head": self.head}

    # ----------------------------------------------------------- metrics ---
    def metrics(self, validate_args: bool = True) -> MetricCollection:
        C, t = self.num_classes, self.threshold
        return MetricCollection({
            "map_macro": MultilabelAveragePrecision(C, average="macro", validate_args=validate_args),
            "map_micro": MultilabelAveragePrecision(C, average="micro", validate_args=validate_args),
            "f1_macro": MultilabelF1Score(C, threshold=t, average="macro", validate_args=validate_args),
            "f1_micro": MultilabelF1Score(C, threshold=t, average="micro", validate_args=validate_args),
        })
