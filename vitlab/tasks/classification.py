"""Image classification: a linear head, its loss and its torchmetrics (the :class:`~vitlab.tasks.base.Task` contract)."""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from vitlab.data.base import DataInfo
from vitlab.tasks.base import BuildContext, Task


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


LOSSES = ("ce", "bce")


class ClassificationTask(Task):
    """Head + loss + metrics. Built from the data (``num_classes``) and the backbone (``in_dim`` = its
    ``embed_dim``) by :meth:`from_data`; ``monitor`` (val/top1) picks best.ckpt when the recipe's monitor is auto.

    ``loss="ce"``: softmax cross-entropy. ``loss="bce"``: binary cross-entropy with logits, one sigmoid per
    class, averaged over batch and classes: DeiT III's loss (Touvron et al. 2022, "DeiT III: Revenge of the
    ViT", after Wightman et al. 2021, "ResNet strikes back"), computed by timm's
    :class:`timm.loss.BinaryCrossEntropy`. ``bce_target_threshold`` (bce only) binarises targets above it:
    DeiT III's code sets every class present in a mixup / cutmix target to 1 (threshold 0.0); None keeps the
    targets as given (timm's default).
    """

    kind = "classification"
    data_kind = "classification"
    data_hint = "data=cifar10, imagefolder, ..."
    monitor = "val/top1"
    monitor_mode = "max"
    curve_metrics = ("top1", "top5")
    progress_metrics = ("top1", "top5")
    lr_base_batch = 256              # recipe.lr_base_batch=auto: the batch optim.lr is quoted for (DeiT's rule)
    pretrainable = True              # MAE / SimMIM / DINO / distillation train the backbone beside this task

    def __init__(self, in_dim: int, num_classes: int, feature: Literal["pooled", "cls", "avg"] = "pooled",
                 head_dropout: float = 0.0, label_smoothing: float = 0.0, top_k: Sequence[int] = (1, 5),
                 loss: Literal["ce", "bce"] = "ce", bce_target_threshold: Optional[float] = None):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown classification loss {loss!r}; choose {', '.join(LOSSES)} (task.loss)")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"task.label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if bce_target_threshold is not None:
            if not isinstance(bce_target_threshold, (int, float)) or not 0.0 <= bce_target_threshold < 1.0:
                raise ValueError(f"task.bce_target_threshold must be null or in [0, 1), got {bce_target_threshold!r}")
            if loss == "bce" and label_smoothing / num_classes > bce_target_threshold:
                raise ValueError(f"task.label_smoothing={label_smoothing} gives every class a target of "
                                 f"{label_smoothing / num_classes:.3g} > task.bce_target_threshold="
                                 f"{bce_target_threshold}: all targets would become 1; set one of them to 0 / null")
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.loss_type = loss
        self.top_k = tuple(k for k in top_k if k <= num_classes)
        self.head = ClassificationHead(in_dim, num_classes, feature, head_dropout)
        # no parameters and no saved buffers: checkpoints are the same for both losses
        self.bce = (BinaryCrossEntropy(smoothing=label_smoothing, target_threshold=bce_target_threshold)
                    if loss == "bce" else None)

    @classmethod
    def from_data(cls, options: dict, data: DataInfo, backbone: Any, context: Optional[BuildContext] = None
                  ) -> "ClassificationTask":
        return cls(in_dim=int(backbone.embed_dim), num_classes=int(data.num_classes), **options)

    def forward(self, features: dict) -> torch.Tensor:
        return self.head(features)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Hard labels (B,) -> CE with label smoothing; soft targets (B, C) -> soft-target CE.

        Soft targets are used as given: mixup/cutmix build the smoothing into them.
        With ``loss="bce"``: hard labels become one-hot targets smoothed as timm does (off = eps / C,
        on = 1 - eps + eps / C); soft targets are used as given (or binarised, see ``bce_target_threshold``).
        Computed in float32 whatever the logits' dtype.
        """
        if self.bce is not None:
            return self.bce(logits.float(), target.float() if target.ndim == 2 else target)
        if target.ndim == 2:
            return soft_target_cross_entropy(logits, target)
        return F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)

    # ------------------------------------------------------------- steps ---
    def training_step(self, backbone: Any, batch: dict) -> dict[str, torch.Tensor]:
        logits = self(backbone(batch["image"]))                            # (B, C)
        target = batch["label"]                                           # (B,) or soft (B, C) after mixup
        out = {"loss": self.loss(logits, target), "preds": logits.detach()}
        if target.ndim == 1:                                              # hard labels: the train top-1
            out["target"] = target
        return out

    def evaluation_step(self, backbone: Any, batch: dict) -> dict[str, torch.Tensor]:
        logits = self(backbone(batch["image"]))
        return {"loss": self.loss(logits, batch["label"]), "preds": logits, "target": batch["label"]}

    def predict(self, backbone: Any, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, C)."""
        return self(backbone(images))

    def pretrained_heads(self) -> dict[str, nn.Module]:
        return {"head": self.head}

    def metrics(self, validate_args: bool = True) -> MetricCollection:
        """Fresh top-k accuracy metrics (one collection per split), keyed 'top1', 'top5'.

        ``validate_args=False`` skips torchmetrics' per-update checks of the inputs (for integer predictions
        they include a ``torch.unique``, a host sync on a GPU): for the train split, whose labels the data
        layer has already checked. Keep it on for evaluation.
        """
        return MetricCollection({f"top{k}": MulticlassAccuracy(self.num_classes, top_k=k, average="micro",
                                                               validate_args=validate_args)
                                 for k in self.top_k})

    def train_metrics(self) -> MetricCollection:
        """top-1 on the training split, on hard labels only (mixup's soft targets have no class), without
        torchmetrics' per-update input checks (their torch.unique is a host sync on a GPU; the data layer has
        already checked the labels)."""
        return MetricCollection({"top1": MulticlassAccuracy(self.num_classes, top_k=1, average="micro",
                                                            validate_args=False)})
