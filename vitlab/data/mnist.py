"""MNIST (LeCun et al. 1998) and Fashion-MNIST (Xiao et al. 2017) from their IDX files, in torchvision's layout.

``root`` holds ``MNIST/raw/`` (or ``FashionMNIST/raw/``) with the four files
``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (gzipped or not), as
``torchvision.datasets.MNIST(root, download=True)`` leaves them. Train and val
are a seeded split of the 60,000 training images; test is the official 10,000.
With ``download=True`` missing files are fetched from ``mirror`` and their md5
checked (torchvision's utilities). Images are 28x28, one channel, served as
PIL images of mode ``L`` so every augmentation option applies.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from PIL import Image

from vitlab.data.base import ArrayDataset, ClassificationSource, DatasetNotFoundError, seeded_split

Variant = Literal["mnist", "fashion_mnist"]

_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
          "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
# variant: (folder, mirror, md5 of each .gz as published, class names, mean, std); md5s as in torchvision
_SPECS = {
    "mnist": ("MNIST", "https://ossci-datasets.s3.amazonaws.com/mnist/",
              {"train_images": "f68b3c2dcbeaaa9fbdd348bbdeb94873", "train_labels": "d53e105ee54ea40749a09fcbcd1e9432",
               "test_images": "9fb629c4189551a2d022fa330f9573f3", "test_labels": "ec29112dd5afa0611ce80d1b7f02629c"},
              [str(i) for i in range(10)], (0.1307,), (0.3081,)),
    "fashion_mnist": ("FashionMNIST", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                      {"train_images": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                       "train_labels": "25c81989df183df01b3e8a0aad5dffbe",
                       "test_images": "bef4ecab320f06d8554ea6380940ec79",
                       "test_labels": "bb300cfdad3c16e7a12a480ee83cd310"},
                      ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                       "Ankle boot"], (0.2860,), (0.3530,)),
}
_MAGIC = {3: 2051, 1: 2049}          # IDX magic numbers: unsigned bytes, 3 dimensions (images) or 1 (labels)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (gzipped or not) -> uint8 array; a bad header names the file."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:             # a truncated / non-gzip file
        raise DatasetNotFoundError(f"cannot read {path}: {e}. The file is damaged: delete it and download it again "
                                   "(data.source.download=true when online)") from e
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else -1
    if magic != _MAGIC[ndim]:
        raise DatasetNotFoundError(f"{path} is not an IDX file of {ndim}-d unsigned bytes (magic number {magic}, "
                                   f"expected {_MAGIC[ndim]}); delete it and download it again")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DatasetNotFoundError(f"{path} is truncated: its header promises {dims} values, it holds {body.size}; "
                                   "delete it and download it again")
    return body.reshape(dims)


def _to_pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray(img, mode="L")


class MNIST(ClassificationSource):
    in_chans = 1
    num_classes = 10

    def __init__(self, root: str, variant: Variant = "mnist", download: bool = False, val_fraction: float = 0.1,
                 split_seed: int = 0, mirror: Optional[str] = None, md5s: Optional[dict[str, str]] = None):
        if variant not in _SPECS:
            raise ValueError(f"unknown MNIST variant {variant!r}; choose {' or '.join(_SPECS)}")
        self.name = variant
        self.root = Path(root).expanduser()
        self.download = download
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.folder, default_mirror, default_md5s, names, self.mean, self.std = _SPECS[variant]
        self.md5s = {**default_md5s, **(md5s or {})}       # a mirror of re-packed files has its own md5s
        self.class_names = list(names)
        self.mirror = (mirror or default_mirror).rstrip("/") + "/"
        self._cache: dict[str, np.ndarray] = {}

    @property
    def raw_dir(self) -> Path:
        return self.root / self.folder / "raw"

    def _path(self, key: str) -> Optional[Path]:
        """The file for ``key`` (gzipped or not), or None."""
        for name in (_FILES[key] + ".gz", _FILES[key]):
            if (self.raw_dir / name).is_file():
                return self.raw_dir / name
        return None

    @property
    def splits(self) -> tuple[str, ...]:
        has_test = self._path("test_images") is not None and self._path("test_labels") is not None
        return ("train", "val", "test") if has_test else ("train", "val")

    def missing_split_message(self, split: str) -> str:
        if split == "test":
            return (f"{self.name} at {self.raw_dir} has no test files ({_FILES['test_images']}.gz, "
                    f"{_FILES['test_labels']}.gz); put them there, or evaluate with split=val")
        return super().missing_split_message(split)

    def check(self) -> None:
        missing = [_FILES[k] + ".gz" for k in ("train_images", "train_labels") if self._path(k) is None]
        if not missing:
            return
        if self.download:
            self.fetch()
            return
        raise DatasetNotFoundError(
            f"{self.name} not found: {self.raw_dir} lacks {', '.join(missing)}. Point data.root at the folder that "
            f"holds {self.folder}/raw/ (torchvision's layout, e.g. ../shared/data/mnist), or set "
            "data.source.download=true when online.")

    def fetch(self) -> None:
        """Download the missing files from the mirror and check their md5 (a failed check deletes the file)."""
        from torchvision.datasets.utils import check_integrity, download_url

        self.raw_dir.mkdir(parents=True, exist_ok=True)
        for key, stem in _FILES.items():
            if self._path(key) is not None:
                continue
            filename = stem + ".gz"
            target = self.raw_dir / filename
            url = self.mirror + filename
            try:
                download_url(url, str(self.raw_dir), filename=filename)
            except Exception as e:                               # URLError, HTTPError, OSError, md5 errors
                target.unlink(missing_ok=True)
                raise DatasetNotFoundError(f"could not download {self.name} from {url}: {e}. Offline? Put the "
                                           f"four files of {self.folder}/raw/ under {self.root} yourself.") from e
            if not check_integrity(str(target), self.md5s[key]):
                target.unlink(missing_ok=True)
                raise DatasetNotFoundError(f"{filename} from {url} failed its md5 check (expected {self.md5s[key]}; "
                                           "a corrupted or changed download); it was deleted. Download it again.")

    def _arrays(self, part: Literal["train", "test"]) -> tuple[np.ndarray, np.ndarray]:
        if part not in self._cache:
            images = read_idx(self._path(f"{part}_images"), 3)                   # (N, 28, 28) uint8
            labels = read_idx(self._path(f"{part}_labels"), 1).astype(np.int64)   # (N,)
            if len(images) != len(labels):
                raise DatasetNotFoundError(f"{self.raw_dir}: {len(images)} {part} images but {len(labels)} labels; "
                                           "the files are from different datasets or damaged")
            self._cache[part] = (images, labels)
        return self._cache[part]

    def _load(self, split: str) -> ArrayDataset:
        self.check()
        if split == "test":
            return ArrayDataset(*self._arrays("test"), _to_pil)
        images, labels = self._arrays("train")
        val, train = seeded_split(len(labels), [self.val_fraction], self.split_seed)
        idx = train if split == "train" else val
        return ArrayDataset(images[idx], labels[idx], _to_pil)
