"""What every classification data source provides, and the shared pieces.

A *source* knows where its data lives and how it is split; it hands out
datasets of (image, label) per split. :class:`DictDataset` applies a
transform and yields the batch dicts every path in vitlab uses:
``{"image": (C, H, W) float, "label": int, "index": int, "corrupt": int}``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

log = logging.getLogger("vitlab")

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


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know of its data, from the source and ``data.img_size``: the task family the data is
    for (``task``: classification, multilabel, detection, segmentation), the classes, channels and normalisation,
    and for dense data the ignore index and palette. Tasks are built from it (``Task.from_data``), and every
    checkpoint stores it (:meth:`to_dict`, under ``data_info``) so ``vitlab.load`` rebuilds the task alone."""

    num_classes: int
    in_chans: int = 3
    name: str = "?"
    task: str = "classification"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    img_size: Optional[int] = None
    class_names: Optional[tuple[str, ...]] = None
    ignore_index: Optional[int] = None
    palette: Optional[tuple[tuple[int, int, int], ...]] = None

    @classmethod
    def from_source(cls, source: "DataSource", img_size: Optional[int] = None) -> "DataInfo":
        names = source.class_names
        return cls(num_classes=int(source.num_classes), in_chans=int(source.in_chans), name=str(source.name),
                   task=str(source.task), mean=tuple(float(m) for m in source.mean),
                   std=tuple(float(v) for v in source.std), img_size=None if img_size is None else int(img_size),
                   class_names=None if names is None else tuple(str(n) for n in names),
                   ignore_index=None if source.ignore_index is None else int(source.ignore_index),
                   palette=None if source.palette is None else tuple(tuple(int(c) for c in rgb[:3])
                                                                     for rgb in source.palette))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], img_size: Optional[int] = None) -> "DataInfo":
        """A checkpoint's ``data_info`` (older checkpoints lack some keys: their defaults apply)."""
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known and v is not None}
        for key in ("mean", "std", "class_names"):
            if key in kw:
                kw[key] = tuple(kw[key])
        if "palette" in kw:
            kw["palette"] = tuple(tuple(int(c) for c in rgb) for rgb in kw["palette"])
        if img_size is not None:
            kw["img_size"] = int(img_size)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly (lists, no None values): what checkpoints store under ``data_info``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if f.name == "palette":
                v = [list(rgb) for rgb in v]
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    def replace(self, **changes: Any) -> "DataInfo":
        return dataclasses.replace(self, **changes)


class DataSource:
    """What every data source provides: where its splits are and a dataset per split. ``task`` names the task
    family the data is for (classification here; detection / segmentation: :class:`vitlab.data.dense.DenseSource`).
    Subclasses set the attributes and implement ``_load``."""

    name: str = "?"
    task: str = "classification"
    num_classes: int
    in_chans: int = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    class_names: Optional[list[str]] = None
    ignore_index: Optional[int] = None               # dense data: the label value that is not scored
    palette: Optional[Sequence[Sequence[int]]] = None   # dense data: a colour per class for drawn predictions
    splits: tuple[str, ...] = SPLITS

    def check(self) -> None:
        """Raise :class:`DatasetNotFoundError` naming the problem and the fix, before any work."""

    def has_split(self, split: str) -> bool:
        return split in self.splits

    def dataset(self, split: str) -> Dataset:
        """The dataset of ``split``: (image, label) pairs for classification (PIL image or float tensor (C, H, W))."""
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

    # -- what the data module asks of every source (no source kind is branched on outside the data package) --
    #: what a label is: ``"class"`` (one class index per image), ``"multi_hot"`` (a set of classes per image, a (C,)
    #: 0/1 vector) or ``"dense"`` (boxes or masks). Image-level labels ("class", "multi_hot") let batch-level
    #: augmentation mix images and labels (mixup / cutmix) and allow in-memory batched and repeated augmentation;
    #: dense targets are augmented jointly with their images. The frozen-feature protocols (kNN, linear probe)
    #: score "class" labels.
    label_kind: str = "class"

    def build_transform(self, train: bool, img_size: int, **augment: Any) -> Callable:
        """The per-sample transform of a split (``data.augment`` options): vitlab's classification pipeline."""
        from vitlab.data.transforms import build_transforms

        return build_transforms(train, img_size, self.mean, self.std, **augment)

    def wrap(self, dataset: Dataset, transform: Optional[Callable]) -> Dataset:
        """A split's raw dataset + its transform -> the dataset of batch dicts the loaders read."""
        return DictDataset(dataset, transform)

    #: the loaders' collate function for this data (None: PyTorch's default, which stacks images and labels)
    collate: Optional[Callable[[list], Any]] = None


class ClassificationSource(DataSource):
    """Base for classification sources: datasets of (image, label)."""


class ArrayDataset(Dataset):
    """Images held in memory as an array, with integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, to_image: Callable[[np.ndarray], Any]):
        self.images, self.labels, self.to_image = images, np.asarray(labels, dtype=np.int64), to_image

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.to_image(self.images[i]), int(self.labels[i])


# What a broken image file raises when it is opened or decoded: PIL.UnidentifiedImageError and "image file is
# truncated" are OSErrors; some broken PNG/GIF headers raise SyntaxError; a short read can raise ValueError.
DECODE_ERRORS = (OSError, SyntaxError, ValueError)


def locate(dataset: Dataset, i: int) -> tuple[Dataset, int]:
    """The dataset that holds item ``i`` and its index there, through (nested) ``Subset``s."""
    while isinstance(dataset, Subset):
        i, dataset = int(dataset.indices[i]), dataset.dataset
    return dataset, i


def is_folder(dataset: Dataset) -> bool:
    """A torchvision ``DatasetFolder`` / ``ImageFolder`` (its ``.samples`` hold the file paths and labels)."""
    from torchvision.datasets import DatasetFolder

    return isinstance(dataset, DatasetFolder)


def file_of(dataset: Dataset, i: int) -> Optional[str]:
    """The image file of item ``i`` (``path_of(i)`` or a torchvision ``DatasetFolder``'s ``.samples``), else None."""
    base, j = locate(dataset, i)
    if callable(getattr(base, "path_of", None)):
        path = base.path_of(j)                       # may be None: e.g. a Hugging Face row that holds bytes
        return None if path is None else os.fspath(path)
    if is_folder(base):
        return str(base.samples[j][0])
    return None


def describe_item(dataset: Dataset, i: int) -> str:
    """A human name for item ``i`` of a dataset: its file path when one is known, else its index."""
    path = file_of(dataset, i)
    if path:
        return path
    base, j = locate(dataset, i)
    return f"item {j} of {type(base).__name__}"


class DataConfigError(ValueError):
    """The data settings cannot work together (e.g. fewer shards than ranks x workers); the message says the fix."""


class CorruptDataError(RuntimeError):
    """More of the data is unreadable than ``data.max_corrupt_fraction`` allows."""


class DictDataset(Dataset):
    """(image, label) -> {"image", "label", "index", "corrupt"} after ``transform``.

    An item whose image cannot be read (truncated JPEG, a non-image file, a
    missing file) is skipped: a warning names the file, the next readable
    item takes its place (so batch shapes stay fixed, which DDP, mixup and
    compiled models rely on), and ``"corrupt"`` counts how many were skipped
    to produce this one. The data module sums the counts in the main process
    and stops with :class:`CorruptDataError` past ``data.max_corrupt_fraction``,
    so a bad dataset never ends in an unreadable traceback from a worker.
    """

    def __init__(self, base: Dataset, transform: Optional[Callable] = None, max_skips: int = 100):
        self.base, self.transform, self.max_skips = base, transform, max_skips
        self.warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.base)

    def _read(self, i: int) -> tuple[Any, Any, int, int]:
        n = len(self.base)
        for skipped in range(min(self.max_skips, n)):
            j = (i + skipped) % n
            try:
                image, label = self.base[j]
                return image, label, j, skipped
            except DECODE_ERRORS as e:
                if j not in self.warned:                     # once per file and worker process
                    self.warned.add(j)
                    log.warning("skipping unreadable image %s: %s: %s", describe_item(self.base, j),
                                type(e).__name__, e)
        raise CorruptDataError(
            f"{min(self.max_skips, n)} consecutive items from {describe_item(self.base, i)} on could not be read "
            "(see the warnings above for the files). Check the dataset files (e.g. re-extract or re-download them).")

    def __getitem__(self, i: int) -> dict:
        image, label, j, skipped = self._read(i)             # j: the item actually returned (i unless skipped)
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "label": torch.tensor(label, dtype=torch.long), "index": j, "corrupt": skipped}
