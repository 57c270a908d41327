"""Basic augmentation (torchvision transforms v2). The full DeiT stack is built on timm later."""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torchvision.transforms import v2

TrainAugment = Literal["none", "crop_flip", "rrc_flip"]
_POLICIES = ("none", "crop_flip", "rrc_flip")


def build_transforms(is_train: bool, img_size: int, mean: Sequence[float], std: Sequence[float],
                     policy: TrainAugment = "crop_flip", crop_padding: int = 4,
                     rrc_scale: Sequence[float] = (0.08, 1.0), rrc_ratio: Sequence[float] = (3 / 4, 4 / 3),
                     hflip: float = 0.5, eval_crop_ratio: float = 1.0) -> v2.Compose:
    """Image (PIL or float tensor) -> normalised float tensor (C, img_size, img_size).

    train + ``crop_flip``: resize, random crop with ``crop_padding`` pixels of zero padding, flip (CIFAR style).
    train + ``rrc_flip``: RandomResizedCrop(``rrc_scale``, ``rrc_ratio``) and flip (ImageNet style).
    eval: resize to img_size / eval_crop_ratio, centre crop img_size.
    """
    if policy not in _POLICIES:                 # checked for eval too, so a config typo fails at once
        raise ValueError(f"unknown augmentation policy {policy!r}; choose {', '.join(_POLICIES)}")
    to_float = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    norm = [v2.Normalize(mean=list(mean), std=list(std))]
    flip = [v2.RandomHorizontalFlip(hflip)] if hflip > 0 else []
    if not is_train or policy == "none":
        resize = int(round(img_size / eval_crop_ratio))
        geo = [v2.Resize(resize, antialias=True), v2.CenterCrop(img_size)]
        return v2.Compose(to_float + geo + norm)
    if policy == "crop_flip":
        geo = [v2.Resize(img_size, antialias=True), v2.CenterCrop(img_size)]
        if crop_padding:
            geo.append(v2.RandomCrop(img_size, padding=crop_padding))
        return v2.Compose(to_float + geo + flip + norm)
    geo = [v2.RandomResizedCrop(img_size, scale=tuple(rrc_scale), ratio=tuple(rrc_ratio), antialias=True)]
    return v2.Compose(to_float + geo + flip + norm)
