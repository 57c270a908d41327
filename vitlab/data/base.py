"""What every classification data source provides, and the shared pieces.

A *source* knows where its data lives and how it is split; it hands out
datasets of (image, label) per split. :class:`DictDataset` applies a
transform and yields the batch dicts every path in vitlab uses:
``{"image": (C, H, W) float, "label": int, "index": int}``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

SPLITS = ("train", "val", "test")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is missing or incomplete; the message says where to put it."""


def seeded_split(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split range(n) into len(fractions)+1 disjoint index sets: the given fractions, then the rest.

    The same (n, fractions, seed) always gives the same split, independent of
    the training seed, so the validation set does not move between runs.
    """
    perm = np.random.default_rng(seed).permutation(n)
    out, start = [], 0
    for f in fractions:
        k = int(round(f * n))
        out.append(np.sort(perm[start:start + k]))
        start += k
    out.append(np.sort(perm[start:]))
    return out


class ClassificationSource:
    """Base for classification sources. Subclasses set the attributes and implement ``_load``."""

    name: str = "?"
    num_classes: int
    in_chans: int = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    class_names: list[str]
    splits: tuple[str, ...] = SPLITS

    def check(self) -> None:
        """Raise :class:`DatasetNotFoundError` naming the problem and the fix, before any work."""

    def has_split(self, split: str) -> bool:
        return split in self.splits

    def dataset(self, split: str) -> Dataset:
        """A dataset of (image, label) for ``split`` (PIL image or float tensor (C, H, W))."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        if not self.has_split(split):
            raise DatasetNotFoundError(self.missing_split_message(split))
        return self._load(split)

    def missing_split_message(self, split: str) -> str:
        return (f"the {self.name} data has no {split!r} split (it has: {', '.join(self.splits)}); "
                "evaluate on one of those, e.g. split=val")

    def _load(self, split: str) -> Dataset:
        raise NotImplementedError


class ArrayDataset(Dataset):
    """Images held in memory as an array, with integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, to_image: Callable[[np.ndarray], Any]):
        self.images, self.labels, self.to_image = images, np.asarray(labels, dtype=np.int64), to_image

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.to_image(self.images[i]), int(self.labels[i])


class DictDataset(Dataset):
    """(image, label) -> {"image", "label", "index"} after ``transform``."""

    def __init__(self, base: Dataset, transform: Optional[Callable] = None):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        image, label = self.base[i]
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "label": torch.tensor(label, dtype=torch.long), "index": i}
