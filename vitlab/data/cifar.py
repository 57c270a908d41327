"""CIFAR-10 / CIFAR-100 from the official python-format batches.

``root`` holds ``cifar-10-batches-py/`` (or ``cifar-100-python/``). Train and
val come from a seeded split of the training batches; test is the official
test batch. With ``download=True`` a missing folder is fetched from the
official archive, its md5 verified, and extracted (torchvision's utilities).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from vitlab.data.base import ArrayDataset, ClassificationSource, DatasetNotFoundError, seeded_split

# name: (folder in the archive, archive url, archive md5, train files, test files, label key, meta file, names key)
_SPECS = {
    "cifar10": ("cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "labels", "batches.meta", "label_names"),
    "cifar100": ("cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 "eb9058c3a382ffc7106e4002c42a8d85", ["train"], ["test"], "fine_labels", "meta",
                 "fine_label_names"),
}


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _to_pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray(img)


class CIFAR(ClassificationSource):
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    def __init__(self, root: str, variant: Literal["cifar10", "cifar100"] = "cifar10", download: bool = False,
                 val_fraction: float = 0.1, split_seed: int = 0, url: str | None = None, md5: str | None = None):
        if variant not in _SPECS:
            raise ValueError(f"unknown CIFAR variant {variant!r}; choose cifar10 or cifar100")
        self.name = variant
        self.root = Path(root).expanduser()
        self.download = download
        self.val_fraction, self.split_seed = val_fraction, split_seed
        (self.folder, default_url, default_md5, self.train_files, self.test_files,
         self.label_key, self.meta_file, self.names_key) = _SPECS[variant]
        self.url, self.md5 = url or default_url, md5 or default_md5
        self.num_classes = 10 if variant == "cifar10" else 100
        if variant == "cifar100":
            self.mean, self.std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

    @property
    def base_dir(self) -> Path:
        return self.root / self.folder

    @property
    def splits(self) -> tuple[str, ...]:
        has_test = all((self.base_dir / f).is_file() for f in self.test_files)
        return ("train", "val", "test") if has_test else ("train", "val")

    @property
    def class_names(self) -> list[str]:
        return list(_unpickle(self.base_dir / self.meta_file)[self.names_key])

    def missing_split_message(self, split: str) -> str:
        if split == "test":
            return (f"{self.name} at {self.base_dir} has no test batch ({', '.join(self.test_files)} missing). "
                    "Put the official test batch there, or evaluate with split=val.")
        return super().missing_split_message(split)

    def check(self) -> None:
        missing = [f for f in self.train_files + [self.meta_file] if not (self.base_dir / f).is_file()]
        if not missing:
            return
        if self.download:
            self.fetch()
            return
        raise DatasetNotFoundError(
            f"{self.name} not found: {self.base_dir} lacks {', '.join(missing)}. Put the official python-format "
            f"batches there (extract {self.url.rsplit('/', 1)[-1]} into {self.root}), point data.root at "
            "the folder that holds them, or set data.source.download=true when online.")

    def fetch(self) -> None:
        """Download the official archive, verify its md5 and extract it into ``root``."""
        from torchvision.datasets.utils import check_integrity, download_url, extract_archive

        self.root.mkdir(parents=True, exist_ok=True)
        filename = self.url.rsplit("/", 1)[-1]
        archive = self.root / filename
        if not check_integrity(str(archive), self.md5):          # absent, or a stale/partial earlier download
            archive.unlink(missing_ok=True)
            try:
                # md5 checked below: torchvision raises on a mismatch but leaves the bad file behind
                download_url(self.url, str(self.root), filename=filename)
            except Exception as e:                               # URLError, HTTPError, OSError
                archive.unlink(missing_ok=True)
                raise DatasetNotFoundError(
                    f"could not download {self.name} from {self.url}: {e}. Offline? Put the extracted "
                    f"{self.folder}/ under {self.root} yourself.") from e
            if not check_integrity(str(archive), self.md5):
                archive.unlink(missing_ok=True)
                raise DatasetNotFoundError(f"{archive} from {self.url} failed its md5 check (expected {self.md5}; "
                                           "corrupted or changed download); it was deleted. Download it again.")
        extract_archive(str(archive), str(self.root))
        if not (self.base_dir / self.train_files[0]).is_file():
            raise DatasetNotFoundError(f"the archive {archive} did not contain {self.folder}/{self.train_files[0]}")

    def _read(self, files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        data, labels = [], []
        for f in files:
            d = _unpickle(self.base_dir / f)
            data.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.extend(d[self.label_key])
        return np.concatenate(data), np.asarray(labels, dtype=np.int64)

    def _load(self, split: str) -> ArrayDataset:
        self.check()
        if split == "test":
            images, labels = self._read(self.test_files)
            return ArrayDataset(images, labels, _to_pil)
        images, labels = self._read(self.train_files)
        val, train = seeded_split(len(labels), [self.val_fraction], self.split_seed)
        idx = train if split == "train" else val
        return ArrayDataset(images[idx], labels[idx], _to_pil)
