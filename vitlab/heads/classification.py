"""Image classification: a linear head, its loss and its torchmetrics."""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy


class ClassificationHead(nn.Module):
    """Dropout + Linear on one named backbone feature.

    ``feature='pooled'`` reads the backbone's chosen representation (class token
    or average-pooled tokens, set by its ``global_pool``); ``'cls'`` forces the
    class token and ``'avg'`` averages the normed patch tokens.
    """

    def __init__(self, in_dim: int, num_classes: int, feature: Literal["pooled", "cls", "avg"] = "pooled",
                 dropout: float = 0.0):
        super().__init__()
        self.feature = feature
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: dict) -> torch.Tensor:
        if self.feature == "avg":
            x = features["patch"].mean(dim=1)                              # (B, D)
        else:
            x = features[self.feature]                                     # (B, D)
        return self.fc(self.drop(x))                                       # (B, C)


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a probability vector per sample (mixup / cutmix targets)."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class ClassificationTask(nn.Module):
    """Head + loss + metrics. The builder passes ``in_dim`` and ``num_classes``."""

    def __init__(self, in_dim: int, num_classes: int, feature: Literal["pooled", "cls", "avg"] = "pooled",
                 head_dropout: float = 0.0, label_smoothing: float = 0.0, top_k: Sequence[int] = (1, 5)):
        super().__init__()
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.top_k = tuple(k for k in top_k if k <= num_classes)
        self.head = ClassificationHead(in_dim, num_classes, feature, head_dropout)

    def forward(self, features: dict) -> torch.Tensor:
        return self.head(features)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Hard labels (B,) -> CE with label smoothing; soft targets (B, C) -> soft-target CE.

        Soft targets are used as given: mixup/cutmix build the smoothing into them.
        """
        if target.ndim == 2:
            return soft_target_cross_entropy(logits, target)
        return F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)

    def metrics(self) -> MetricCollection:
        """Fresh top-k accuracy metrics (one collection per split), keyed 'top1', 'top5'."""
        return MetricCollection({f"top{k}": MulticlassAccuracy(self.num_classes, top_k=k, average="micro")
                                 for k in self.top_k})
