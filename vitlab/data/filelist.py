"""Lists of (image path, label): CSV, TSV, JSON, JSON Lines or plain-text files naming the images of each split.

Formats, chosen by the list file's suffix:

- ``.csv`` / ``.tsv``: a header row naming ``path_column`` and ``label_column``
  (default ``path,label``; other columns are ignored), or no header: the first
  two columns are the path and the label.
- ``.json``: a list of ``{"path": ..., "label": ...}`` objects (keys
  ``path_column``/``label_column``) or a list of ``[path, label]`` pairs.
- ``.jsonl`` / ``.ndjson``: one such object or pair per line.
- ``.txt``: ``path label`` per line, split at the last whitespace (Caffe style).

Relative image paths resolve against ``root`` (default: the folder of the list
file). Labels are ints, or class names: the sorted unique names of the train
list define the indices unless ``classes`` (a list, or a file with one name a
line or a JSON list) fixes them. Without ``val_list``, val is a seeded split
of the train list, as in :class:`~vitlab.data.imagefolder.ImageFolder`.

:class:`FileDataset` (also used by the ImageNet source) opens images lazily and
exposes ``path_of(i)`` / ``label_of(i)`` so the shard writer can copy the
original encoded bytes.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from vitlab.data.base import ClassificationSource, DatasetNotFoundError, seeded_split

FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "txt"}
_INT = re.compile(r"[+-]?\d+")
_SHOW = 5                                   # how many offending entries an error message lists


def pil_rgb_loader(path: str) -> Image.Image:
    """Open an image file as RGB. A corrupt file raises PIL's error (an ``OSError``) unchanged."""
    with open(path, "rb") as f:             # open via a handle: no ResourceWarning (Pillow issue 835)
        return Image.open(f).convert("RGB")


class FileDataset(Dataset):
    """Image files with integer labels; images are opened lazily in ``__getitem__`` -> (PIL RGB, int).

    Paths are held in one numpy bytes array, not a list of Python strings, so that
    DataLoader workers forked from the main process do not copy 1M refcounted
    objects page by page (the copy-on-read problem of large Python lists).
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int], loader: Callable[[str], Any] = pil_rgb_loader):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self._paths = np.array([os.fsencode(p) for p in paths], dtype=bytes) if len(paths) else np.array([], "S1")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.loader = loader

    def __len__(self) -> int:
        return len(self.labels)

    def path_of(self, i: int) -> str:
        return os.fsdecode(self._paths[i])

    def label_of(self, i: int) -> int:
        return int(self.labels[i])

    @property
    def samples(self) -> list[tuple[str, int]]:
        """(path, label) pairs in dataset order, like torchvision's ``DatasetFolder.samples``."""
        return [(self.path_of(i), self.label_of(i)) for i in range(len(self))]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.loader(self.path_of(i)), self.label_of(i)


# ------------------------------------------------------------------ reading ---

def _is_int(v: Any) -> bool:
    return (isinstance(v, (int, np.integer)) and not isinstance(v, bool)) or (
        isinstance(v, str) and _INT.fullmatch(v.strip()) is not None) or (isinstance(v, float) and v.is_integer())


def _as_int(v: Any) -> int:
    return int(v.strip()) if isinstance(v, str) else int(v)


def _missing_column(file: Path, column: str, found: Sequence[str], option: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{file} has no column {column!r} (columns found: {', '.join(map(str, found)) or 'none'}). "
        f"Set data.source.{option} to the column that holds it.")


def _read_delimited(file: Path, delimiter: str, path_column: str, label_column: str,
                    resolve: Callable[[str], Path]) -> list[tuple[str, Any]]:
    with open(file, newline="", encoding="utf-8") as f:
        rows = [(n, r) for n, r in enumerate(csv.reader(f, delimiter=delimiter), 1) if any(c.strip() for c in r)]
    if not rows:
        return []
    first = [c.strip() for c in rows[0][1]]
    if path_column in first:                               # a header row naming the columns
        if label_column not in first:
            raise _missing_column(file, label_column, first, "label_column")
        ip, il = first.index(path_column), first.index(label_column)
        rows = rows[1:]
    else:
        default = (path_column, label_column) == ("path", "label")
        # no `path` column: a header with other names (the first row's "path" is no file but the next row's is)
        looks_like_header = len(rows) > 1 and len(first) >= 2 and not resolve(first[0]).exists() and \
            resolve(rows[1][1][0].strip()).exists()
        if not default or looks_like_header:
            raise _missing_column(file, path_column, first, "path_column")
        ip, il = 0, 1
    out = []
    for n, row in rows:
        if len(row) <= max(ip, il):
            raise DatasetNotFoundError(f"{file} line {n} has {len(row)} column(s), expected a path and a label: "
                                       f"{delimiter.join(row)!r}")
        out.append((row[ip].strip(), row[il].strip()))
    return out


def _from_json_item(file: Path, where: str, item: Any, path_column: str, label_column: str) -> tuple[str, Any]:
    if isinstance(item, dict):
        for col, opt in ((path_column, "path_column"), (label_column, "label_column")):
            if col not in item:
                raise _missing_column(file, col, list(item), opt)
        return str(item[path_column]), item[label_column]
    if isinstance(item, (list, tuple)) and len(item) >= 2:
        return str(item[0]), item[1]
    raise DatasetNotFoundError(f"{file} {where}: expected an object with {path_column!r} and {label_column!r} or a "
                               f"[path, label] pair, got {item!r}")


def read_list(file: Path, path_column: str = "path", label_column: str = "label",
              resolve: Callable[[str], Path] | None = None) -> list[tuple[str, Any]]:
    """(path as written, raw label) pairs from a list file; the format follows the suffix (see the module doc)."""
    fmt = FORMATS.get(file.suffix.lower())
    if fmt is None:
        raise DatasetNotFoundError(f"{file}: unknown list format {file.suffix!r}; use one of "
                                   f"{', '.join(FORMATS)} (see vitlab/data/filelist.py)")
    resolve = resolve or (lambda p: file.parent / p)
    if fmt in ("csv", "tsv"):
        return _read_delimited(file, "," if fmt == "csv" else "\t", path_column, label_column, resolve)
    text = file.read_text(encoding="utf-8")
    if fmt == "txt":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.strip().rsplit(None, 1)
            if len(parts) != 2:
                raise DatasetNotFoundError(f"{file} line {n}: expected 'path label', got {line!r}")
            out.append((parts[0], parts[1]))
        return out
    try:
        if fmt == "json":
            items = json.loads(text)
            if not isinstance(items, list):
                raise DatasetNotFoundError(f"{file} holds a JSON {type(items).__name__}; expected a list of "
                                           f"{{{path_column!r}: ..., {label_column!r}: ...}} objects or [path, label] pairs")
            return [_from_json_item(file, f"item {k}", it, path_column, label_column) for k, it in enumerate(items)]
        return [_from_json_item(file, f"line {n}", json.loads(line), path_column, label_column)
                for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    except json.JSONDecodeError as e:
        raise DatasetNotFoundError(f"{file} is not valid {'JSON' if fmt == 'json' else 'JSON Lines'}: {e}") from e


def _read_classes(classes: str | Sequence[str]) -> list[str]:
    if not isinstance(classes, (str, os.PathLike)):
        return [str(c) for c in classes]
    file = Path(classes).expanduser()
    if not file.is_file():
        raise DatasetNotFoundError(f"classes file {file} does not exist; give data.source.classes as a list of "
                                   "names or a file with one name a line (or a JSON list)")
    text = file.read_text(encoding="utf-8")
    if file.suffix.lower() == ".json":
        return [str(c) for c in json.loads(text)]
    return [line.strip() for line in text.splitlines() if line.strip()]


# ------------------------------------------------------------------ source ---

class FileList(ClassificationSource):
    """Splits given as list files of (image path, label); see the module docstring for the formats."""

    dataset_class: Callable[..., Dataset] = FileDataset       # (paths, labels) -> the split's dataset

    def __init__(self, train_list: str, val_list: str | None = None, test_list: str | None = None,
                 root: str | None = None, path_column: str = "path", label_column: str = "label",
                 classes: str | Sequence[str] | None = None, num_classes: int | None = None,
                 val_fraction: float = 0.1, split_seed: int = 0, name: str = "filelist"):
        self.lists = {"train": train_list, "val": val_list, "test": test_list}
        self.root = Path(root).expanduser() if root else None
        self.path_column, self.label_column = path_column, label_column
        self.classes_arg, self.num_classes_arg = classes, num_classes
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.name = name
        self._parsed: dict[str, tuple[list[str], np.ndarray]] | None = None
        self._class_names: list[str] = []

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", "val") + (("test",) if self.lists["test"] else ())

    def _file(self, split: str) -> Path:
        return Path(self.lists[split]).expanduser()

    def _resolver(self, file: Path) -> Callable[[str], Path]:
        base = self.root if self.root is not None else file.parent
        return lambda p: (base / Path(p).expanduser()) if not Path(p).expanduser().is_absolute() else Path(p)

    def missing_split_message(self, split: str) -> str:
        if split == "test":
            return f"{self.name} has no test list; set data.source.test_list to one, or evaluate with split=val"
        return super().missing_split_message(split)

    # labels: raw values of the train list fix the class space, then every split maps through it
    def _label_space(self, raw: list[Any]) -> Callable[[Any], int | None]:
        if self.classes_arg is not None:
            names = _read_classes(self.classes_arg)
            index = {n: i for i, n in enumerate(names)}
            n_cls = len(names)

            def to_index(v: Any) -> int | None:
                if str(v).strip() in index:
                    return index[str(v).strip()]
                return _as_int(v) if _is_int(v) and 0 <= _as_int(v) < n_cls else None
        elif raw and all(_is_int(v) for v in raw):
            ints = [_as_int(v) for v in raw]
            if min(ints) < 0:
                raise DatasetNotFoundError(f"{self._file('train')} has negative labels (e.g. {min(ints)}); "
                                           "integer labels must be class indices 0..num_classes-1")
            n_cls = self.num_classes_arg if self.num_classes_arg is not None else max(ints) + 1
            if n_cls <= max(ints):
                raise DatasetNotFoundError(f"data.source.num_classes={n_cls} but {self._file('train')} has "
                                           f"label {max(ints)}; raise num_classes or leave it null (max label + 1)")
            names = [str(i) for i in range(n_cls)]

            def to_index(v: Any) -> int | None:
                return _as_int(v) if _is_int(v) and 0 <= _as_int(v) < n_cls else None
        else:
            names = sorted({str(v).strip() for v in raw})
            if self.num_classes_arg is not None and self.num_classes_arg != len(names):
                raise DatasetNotFoundError(f"data.source.num_classes={self.num_classes_arg} but the train list "
                                           f"names {len(names)} classes; leave num_classes null")
            index = {n: i for i, n in enumerate(names)}

            def to_index(v: Any) -> int | None:
                return index.get(str(v).strip())
        self._class_names = names
        return to_index

    # -- reading the lists: each step a method, so a reader of other labels (vitlab.data.multilabel) reuses them --
    def _read(self, split: str) -> list[tuple[str, Any]]:
        """(path as written, raw label) rows of a split's list."""
        file = self._file(split)
        return read_list(file, self.path_column, self.label_column, self._resolver(file))

    def _raw_lists(self) -> dict[str, list[tuple[str, Any]]]:
        """Every given list's rows; a missing list file or an empty train list stops with the fix."""
        raw: dict[str, list[tuple[str, Any]]] = {}
        for split in ("train", "val", "test"):
            if not self.lists[split]:
                continue
            file = self._file(split)
            if not file.is_file():
                raise DatasetNotFoundError(
                    f"the {split} list {file} does not exist. Point data.source.{split}_list at a CSV/JSON/JSONL/TXT "
                    f"file of (path, label) rows" + (" (or set data.root to the folder that holds train.csv)"
                                                     if split == "train" else "") + ".")
            raw[split] = self._read(split)
        if not raw["train"]:
            raise DatasetNotFoundError(f"the train list {self._file('train')} lists no images")
        return raw

    def _label_values(self, rows: list[tuple[str, Any]]) -> list[Any]:
        """The raw label values of rows (one per row here), from which the train list fixes the class space."""
        return [v for _, v in rows]

    def _unknown_labels(self, split: str, bad: list[Any]) -> DatasetNotFoundError:
        known = ", ".join(self._class_names[:10]) + (" ..." if len(self._class_names) > 10 else "")
        return DatasetNotFoundError(
            f"{len(bad)} label(s) in the {split} list {self._file(split)} are unknown to the train list, e.g. "
            f"{', '.join(map(repr, bad[:_SHOW]))} (classes: {known}). Fix the labels, or give all classes "
            "with data.source.classes.")

    def _encode(self, split: str, rows: list[tuple[str, Any]], to_index: Callable[[Any], int | None]) -> np.ndarray:
        """The split's labels as class indices (N,)."""
        labels = [to_index(v) for _, v in rows]
        bad = [v for (_, v), i in zip(rows, labels) if i is None]
        if bad:
            raise self._unknown_labels(split, bad)
        return np.asarray(labels, dtype=np.int64)

    def _paths(self, split: str, rows: list[tuple[str, Any]]) -> list[str]:
        """The rows' image files, resolved; every one must exist."""
        file, resolve = self._file(split), self._resolver(self._file(split))
        paths = [str(resolve(p)) for p, _ in rows]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            base = self.root if self.root is not None else file.parent
            raise DatasetNotFoundError(
                f"{len(missing)} of {len(paths)} images listed in {file} do not exist, e.g. "
                f"{', '.join(missing[:_SHOW])} (relative paths resolve against {base}). Fix the list, or set "
                "data.root (data.source.root) to the folder the paths are relative to.")
        return paths

    def _parse(self) -> dict[str, tuple[list[str], np.ndarray]]:
        """Read every given list, map labels, and check that every listed file exists. Cached."""
        if self._parsed is not None:
            return self._parsed
        raw = self._raw_lists()
        to_index = self._label_space(self._label_values(raw["train"]))
        parsed = {}
        for split, rows in raw.items():
            labels = self._encode(split, rows, to_index)
            parsed[split] = (self._paths(split, rows), labels)
        self._parsed = parsed
        return parsed

    def check(self) -> None:
        self._parse()

    @property
    def class_names(self) -> list[str]:
        self._parse()
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _load(self, split: str) -> Dataset:
        parsed = self._parse()
        if split == "test" or self.lists["val"]:
            return self.dataset_class(*parsed[split])
        paths, labels = parsed["train"]                    # no val list: a seeded split of train
        val, train = seeded_split(len(paths), [self.val_fraction], self.split_seed)
        idx = train if split == "train" else val
        return self.dataset_class([paths[i] for i in idx], labels[idx])
