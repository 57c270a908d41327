"""ImageNet-style class folders: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``.

Without a ``val/`` folder, val is a seeded split of ``train/``. A ``test/``
folder, when present, is the test split.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset, Subset

from vitlab.data.base import ClassificationSource, DatasetNotFoundError, seeded_split


class ImageFolder(ClassificationSource):
    def __init__(self, root: str, val_fraction: float = 0.1, split_seed: int = 0, name: str = "imagefolder"):
        self.root = Path(root).expanduser()
        self.name = name
        self.val_fraction, self.split_seed = val_fraction, split_seed

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", "val") + (("test",) if (self.root / "test").is_dir() else ())

    def check(self) -> None:
        train = self.root / "train"
        if not train.is_dir() or not any(p.is_dir() for p in train.iterdir()):
            raise DatasetNotFoundError(
                f"no image folders found at {train}. Lay the data out as {self.root}/train/<class>/<image> "
                "(and optionally val/ and test/ alike), or set data.root to that folder.")

    @property
    def class_names(self) -> list[str]:
        return sorted(p.name for p in (self.root / "train").iterdir() if p.is_dir())

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _folder(self, split: str):
        from torchvision.datasets import ImageFolder as TVImageFolder

        ds = TVImageFolder(str(self.root / split))
        if ds.classes != self.class_names:
            raise DatasetNotFoundError(f"{self.root / split} has classes {ds.classes[:5]}..., which differ from "
                                       f"train/ ({self.class_names[:5]}...)")
        return ds

    def _load(self, split: str) -> Dataset:
        self.check()
        if split == "train" and not (self.root / "val").is_dir():
            ds = self._folder("train")
            val, train = seeded_split(len(ds), [self.val_fraction], self.split_seed)
            return Subset(ds, train.tolist())
        if split == "val" and not (self.root / "val").is_dir():
            ds = self._folder("train")
            val, train = seeded_split(len(ds), [self.val_fraction], self.split_seed)
            return Subset(ds, val.tolist())
        return self._folder(split)
