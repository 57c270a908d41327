"""Hugging Face ``datasets``: a Hub dataset name or a folder written by ``save_to_disk``.

Needs the optional extra: ``pip install 'vitlab[hf]'``. Splits:

- train: ``train_split``;
- val: ``val_split``, or when it is null the first of validation/val/valid the
  dataset has, else a seeded split (``val_fraction``, ``split_seed``) of train;
- test: ``test_split``, or when it is null ``test`` if the dataset has it.

Columns: ``image_column`` (null: ``image`` or ``img``, else the first Image
feature) and ``label_column`` (null: ``label``, ``labels`` or ``fine_label``,
else the first ClassLabel feature). Class names come from the ClassLabel
feature; plain int labels give ``max + 1`` classes named "0", "1", ...;
string labels are indexed by their sorted unique values over train.

Items are ``(PIL RGB image, int label)``; the Image feature decodes to PIL,
and dicts of ``bytes``/``path``, raw bytes, file paths and arrays are
accepted too. ``path_of(i)`` returns the image's file when the row refers to
an existing file and holds no bytes, else None (most Hub data embeds the
bytes): a shard writer then uses ``bytes_of(i)`` (the stored encoded bytes)
or re-encodes the decoded image.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from vitlab.data.base import ClassificationSource, DatasetNotFoundError, seeded_split

IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels", "fine_label")
VAL_SPLITS = ("validation", "val", "valid")
INSTALL = "pip install 'vitlab[hf]'"


def _import_datasets():
    try:
        import datasets
    except ImportError as e:
        raise DatasetNotFoundError(
            f"data=hf needs the Hugging Face `datasets` package, which is not installed ({e}). "
            f"Install it with: {INSTALL}") from e
    return datasets


def to_pil(value: Any) -> Image.Image:
    """An image cell as stored by ``datasets`` -> RGB PIL image. Decode errors propagate unchanged."""
    if isinstance(value, dict):                            # Image(decode=False): {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        value = Image.open(io.BytesIO(value))
    elif isinstance(value, (str, os.PathLike)):
        value = Image.open(value)
    elif isinstance(value, np.ndarray):
        value = Image.fromarray(value)
    if not isinstance(value, Image.Image):
        raise TypeError(f"cannot read an image from a {type(value).__name__}; the image column must hold images, "
                        "encoded bytes or file paths")
    return value.convert("RGB")


class HFImageDataset(Dataset):
    """Rows ``indices`` of one ``datasets.Dataset`` split -> (PIL RGB, int label); images decode lazily."""

    def __init__(self, split: Any, image_column: str, labels: np.ndarray, indices: np.ndarray | None = None):
        self.split = split.select_columns([image_column])  # read only the image column per item
        self.image_column = image_column
        self.indices = np.arange(len(split)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)   # already restricted to `indices`
        self._raw = None                                   # the image column undecoded, built on first use

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return to_pil(self.split[int(self.indices[i])][self.image_column]), int(self.labels[i])

    def label_of(self, i: int) -> int:
        return int(self.labels[i])

    def _raw_cell(self, i: int) -> Any:
        if self._raw is None:
            import datasets

            feature = self.split.features[self.image_column]
            self._raw = self.split.cast_column(self.image_column, datasets.Image(decode=False)) \
                if isinstance(feature, datasets.Image) else self.split
        return self._raw[int(self.indices[i])][self.image_column]

    def path_of(self, i: int) -> str | None:
        """The image's file when the row names an existing file and stores no bytes; else None."""
        cell = self._raw_cell(i)
        if isinstance(cell, dict) and not cell.get("bytes"):
            cell = cell.get("path")
        if isinstance(cell, (str, os.PathLike)) and os.path.isfile(cell):
            return os.fspath(cell)
        return None

    def bytes_of(self, i: int) -> bytes | None:
        """The encoded image bytes as stored in the dataset (JPEG/PNG/...), or None when it stores none."""
        cell = self._raw_cell(i)
        if isinstance(cell, dict):
            cell = cell.get("bytes")
        return bytes(cell) if isinstance(cell, (bytes, bytearray)) else None


class HFDataset(ClassificationSource):
    """A classification dataset loaded with ``datasets.load_dataset`` or ``datasets.load_from_disk``."""

    def __init__(self, name_or_path: str, train_split: str = "train", val_split: str | None = None,
                 test_split: str | None = None, image_column: str | None = None, label_column: str | None = None,
                 val_fraction: float = 0.1, split_seed: int = 0, cache_dir: str | None = None, **load_kwargs: Any):
        self.name_or_path = str(name_or_path)
        self.name = f"hf:{self.name_or_path}"
        self.train_split, self.val_split_arg, self.test_split_arg = train_split, val_split, test_split
        self.image_column_arg, self.label_column_arg = image_column, label_column
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.cache_dir = cache_dir
        self.load_kwargs = load_kwargs
        self._state: dict[str, Any] | None = None          # filled by _resolve(): loaded splits, columns, labels

    # ------------------------------------------------------------ loading ---
    def _local_path(self) -> Path | None:
        p = Path(self.name_or_path).expanduser()
        if p.exists():
            return p
        if p.is_absolute() or self.name_or_path.startswith((".", "~")):
            raise DatasetNotFoundError(
                f"no dataset at {p}. Set data.root to a folder written by Dataset.save_to_disk / "
                "DatasetDict.save_to_disk, or to a Hub dataset name such as uoft-cs/cifar10.")
        return None

    def _open(self) -> Any:
        datasets = _import_datasets()
        local = self._local_path()
        saved = local is not None and local.is_dir() and any(
            (local / f).is_file() for f in ("dataset_dict.json", "state.json"))
        try:
            if saved:
                return datasets.load_from_disk(str(local))
            kwargs = {"cache_dir": self.cache_dir, **self.load_kwargs} if self.cache_dir else dict(self.load_kwargs)
            return datasets.load_dataset(str(local) if local is not None else self.name_or_path, **kwargs)
        except Exception as e:                             # Hub/network/format errors of many types
            how = "load_from_disk" if saved else "load_dataset"
            raise DatasetNotFoundError(
                f"could not load the Hugging Face dataset {self.name_or_path!r} ({how}): {type(e).__name__}: {e}. "
                "Check the name (and +data.source.name=CONFIG for datasets with configs); offline, use a dataset "
                "already in the cache (HF_DATASETS_OFFLINE=1) or a folder written by save_to_disk.") from e

    def _pick_split(self, available: list[str], arg: str | None, defaults: tuple[str, ...], option: str) -> str | None:
        if arg is not None:
            if arg not in available:
                raise DatasetNotFoundError(f"{self.name_or_path} has no split {arg!r} (splits: "
                                           f"{', '.join(available)}); set data.source.{option} to one of them")
            return arg
        return next((s for s in defaults if s in available), None)

    def _pick_column(self, features: Any, arg: str | None, defaults: tuple[str, ...], kind: type,
                     option: str) -> str:
        columns = list(features)
        if arg is not None:
            if arg not in columns:
                raise DatasetNotFoundError(f"{self.name_or_path} has no column {arg!r} (columns: {', '.join(columns)}); "
                                           f"set data.source.{option} to one of them")
            return arg
        found = next((c for c in defaults if c in columns), None) or \
            next((c for c in columns if isinstance(features[c], kind)), None)
        if found is None:
            raise DatasetNotFoundError(f"{self.name_or_path}: no {option.split('_')[0]} column found among "
                                       f"{', '.join(columns)} (looked for {', '.join(defaults)}); set "
                                       f"data.source.{option}")
        return found

    def _resolve(self) -> dict[str, Any]:
        """Load the dataset once; pick splits and columns; read the label column of every split used."""
        if self._state is not None:
            return self._state
        datasets = _import_datasets()
        loaded = self._open()
        if isinstance(loaded, (datasets.IterableDataset, datasets.IterableDatasetDict)):
            raise DatasetNotFoundError(f"{self.name_or_path} was loaded as a streaming dataset; vitlab needs random "
                                       "access: drop streaming=true (or write WebDataset shards with vitlab-shards)")
        if isinstance(loaded, datasets.Dataset):           # one split on disk: it is the train split
            loaded = datasets.DatasetDict({self.train_split: loaded})
        available = list(loaded)
        if self.train_split not in available:
            raise DatasetNotFoundError(f"{self.name_or_path} has no split {self.train_split!r} (splits: "
                                       f"{', '.join(available)}); set data.source.train_split to one of them")
        val = self._pick_split(available, self.val_split_arg, VAL_SPLITS, "val_split")
        test = self._pick_split(available, self.test_split_arg, ("test",), "test_split")
        train = loaded[self.train_split]
        features = train.features
        image_col = self._pick_column(features, self.image_column_arg, IMAGE_COLUMNS, datasets.Image, "image_column")
        label_col = self._pick_column(features, self.label_column_arg, LABEL_COLUMNS, datasets.ClassLabel,
                                      "label_column")
        names, to_int = self._label_space(features[label_col], train[label_col], datasets)
        self._state = {"splits": loaded, "val": val, "test": test, "image": image_col, "label": label_col,
                       "names": names, "to_int": to_int, "labels": {}}
        try:
            for s in (self.train_split, val):              # test is read when used: often it is unlabelled (-1)
                if s is not None:
                    self._labels(s)
        except DatasetNotFoundError:
            self._state = None                             # a later check() must fail the same way
            raise
        return self._state

    def _labels(self, split: str) -> np.ndarray:
        """The int64 labels of a split, checked to lie in the train classes; cached."""
        st = self._state
        if split not in st["labels"]:
            column = st["splits"][split][st["label"]]
            labels = st["to_int"](column)
            if (labels < 0).any():
                bad = sorted({v for v, i in zip(column, labels) if i < 0}, key=str)
                raise DatasetNotFoundError(
                    f"split {split!r} of {self.name_or_path} has {int((labels < 0).sum())} row(s) with labels "
                    f"outside the train classes, e.g. {bad[:5]} (unlabelled rows are -1, as in many test splits); "
                    "use a labelled split (data.source.val_split / test_split).")
            st["labels"][split] = labels
        return st["labels"][split]

    @staticmethod
    def _label_space(feature: Any, train_labels: Any, datasets: Any):
        """(class names, column -> int64 array with -1 for labels outside the classes)."""
        if isinstance(feature, datasets.ClassLabel):
            names = list(feature.names)
            n = len(names)
            return names, lambda col: np.where((a := np.asarray(col, dtype=np.int64)) < n, a, -1)
        train = np.asarray(train_labels)
        if train.dtype.kind in "iu":                       # plain ints: classes 0..max
            n = int(train.max()) + 1
            return [str(i) for i in range(n)], lambda col: np.where((a := np.asarray(col, dtype=np.int64)) < n, a, -1)
        names = sorted({str(v) for v in train})            # strings: sorted unique values over train
        index = {v: i for i, v in enumerate(names)}
        return names, lambda col: np.asarray([index.get(str(v), -1) for v in col], dtype=np.int64)

    # ------------------------------------------------------------ source ---
    def check(self) -> None:
        self._resolve()

    def has_split(self, split: str) -> bool:
        if split in ("train", "val"):                      # always (val falls back to a split of train): no loading
            return True
        return split in self.splits

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", "val") + (("test",) if self._resolve()["test"] else ())

    def missing_split_message(self, split: str) -> str:
        if split == "test":
            return (f"{self.name_or_path} has no test split; name one with data.source.test_split=NAME, "
                    "or evaluate with split=val")
        return super().missing_split_message(split)

    @property
    def class_names(self) -> list[str]:
        return list(self._resolve()["names"])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _load(self, split: str) -> HFImageDataset:
        st = self._resolve()
        name = {"train": self.train_split, "val": st["val"], "test": st["test"]}[split]
        if name is None:                                   # val without a val split: a seeded split of train
            name = self.train_split
        data, labels = st["splits"][name], self._labels(name)
        if split in ("train", "val") and st["val"] is None:
            val_idx, train_idx = seeded_split(len(data), [self.val_fraction], self.split_seed)
            idx = train_idx if split == "train" else val_idx
            return HFImageDataset(data, st["image"], labels[idx], idx)
        return HFImageDataset(data, st["image"], labels)
