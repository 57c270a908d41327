"""The judge of generated samples: a trained vitlab classifier that scores what a diffusion model draws.

``task.classifier=PATH`` (training) and ``vitlab-sample classifier=PATH`` load one through the composition root's
checkpoint loader (:class:`vitlab.tasks.base.BuildContext`); the samples' accuracy per class under it is
``val/sample_acc``, and FID / KID may be computed in its feature space (:mod:`vitlab.metrics.generative`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch

from vitlab.tasks.base import LoadedModel
from vitlab.tasks.classification import ClassificationTask

log = logging.getLogger(__name__)


class SampleJudge:
    """A trained vitlab classifier as the judge of generated samples: images in [0, 1] (B, C, H, W) -> logits, or
    -> its pooled features (FID / KID in its feature space). Samples are resized to the classifier's input size,
    given its channel count (grey <-> RGB) and normalised with its data's statistics."""

    def __init__(self, recipe: torch.nn.Module, img_size: int, mean: Sequence[float], std: Sequence[float]):
        self.recipe = recipe.eval().requires_grad_(False)
        self.img_size = int(img_size)
        self.mean, self.std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        self.recipe.to(images.device)
        x = images.float()
        c = self.mean.shape[1]
        if x.shape[1] != c:                  # grey samples for an RGB classifier, or the reverse
            x = x.expand(-1, c, -1, -1) if x.shape[1] == 1 else x.mean(dim=1, keepdim=True)
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = torch.nn.functional.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear",
                                                antialias=True, align_corners=False)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.recipe(self._prepare(images))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.recipe.features(self._prepare(images))


def load_judge(path: str, num_classes: int, load_model: Callable[[str], LoadedModel]) -> SampleJudge:
    """The vitlab classifier checkpoint at ``path`` (its EMA weights when it kept them) as the judge; it must be a
    trained classifier (not a pretraining or another task's checkpoint) of the same ``num_classes``."""
    from vitlab.checkpoints import is_vitlab_checkpoint

    if not is_vitlab_checkpoint(path):
        raise FileNotFoundError(f"task.classifier={path} is not a vitlab checkpoint; train a classifier on the same "
                                "data first (e.g. vitlab-train experiment=vit_mnist) and give its "
                                "checkpoints/best.ckpt")
    loaded = load_model(path)
    model, data = loaded.recipe, loaded.data
    task: Any = model.task
    if not isinstance(task, ClassificationTask) or data.task != "classification" or model.pretraining:
        what = "pretraining" if model.pretraining else task.kind
        raise ValueError(f"task.classifier={path} is not a trained classifier (a {what} checkpoint); give a "
                         "classification checkpoint trained on the same data")
    if data.num_classes != num_classes:
        raise ValueError(f"the classifier {path} predicts {data.num_classes} classes but this data has "
                         f"{num_classes}; judge samples with a classifier trained on the same classes")
    log.info("sample judge: %s (%d classes, %s px)", path, num_classes, data.img_size)
    return SampleJudge(model, int(data.img_size), data.mean, data.std)
