"""Multi-label file lists: every image names a set of classes (``task=multilabel``; data=multilabel).

The list formats of :mod:`vitlab.data.filelist` (CSV / TSV with a header, JSON, JSON Lines, TXT), with a label
cell that names several classes:

- CSV / TSV: ``path,labels`` rows whose label cell joins the classes with ``label_separator`` (default: a space,
  as the Kaggle "Planet" and "Human Protein Atlas" lists: ``img01.jpg,cat dog``; an empty cell: no class);
- JSON / JSON Lines: a list of names or indices (``{"path": "img01.jpg", "labels": ["cat", "dog"]}``), or a string
  split as above;
- TXT: ``path label1 label2 ...`` (the path is the first whitespace-free field; paths with spaces need CSV).

Classes are names or integer indices; the sorted names of the train list define the indices unless ``classes``
(a list, or a file with one name a line or a JSON list) fixes them; integer labels give ``num_classes`` as the
largest + 1 unless set. Each item is (image, multi-hot ``float32`` vector of ``num_classes``): the batch's
``label`` is (B, C). Without ``val_list``, val is a seeded split of the train list.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np
from torch.utils.data import Dataset

from vitlab.data.base import DatasetNotFoundError
from vitlab.data.filelist import FileList, pil_rgb_loader


class MultiHotDataset(Dataset):
    """Image files with multi-hot labels; images opened lazily -> (PIL RGB, (C,) float32 0/1 vector)."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, loader: Callable[[str], Any] = pil_rgb_loader):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} label rows")
        self._paths = np.array([os.fsencode(p) for p in paths], dtype=bytes) if len(paths) else np.array([], "S1")
        self.labels = np.asarray(labels, dtype=np.float32)                 # (N, C)
        self.loader = loader

    def __len__(self) -> int:
        return len(self.labels)

    def path_of(self, i: int) -> str:
        return os.fsdecode(self._paths[i])

    def __getitem__(self, i: int) -> tuple[Any, np.ndarray]:
        return self.loader(self.path_of(i)), self.labels[i]


class MultiLabelFileList(FileList):
    """Splits given as list files of (image path, several labels); see the module docstring."""

    task = "multilabel"
    label_kind = "multi_hot"

    def __init__(self, train_list: str, val_list: str | None = None, test_list: str | None = None,
                 root: str | None = None, path_column: str = "path", label_column: str = "labels",
                 label_separator: str = " ", classes: str | Sequence[str] | None = None,
                 num_classes: int | None = None, val_fraction: float = 0.1, split_seed: int = 0,
                 name: str = "multilabel"):
        super().__init__(train_list, val_list, test_list, root, path_column, label_column, classes, num_classes,
                         val_fraction, split_seed, name)
        if not isinstance(label_separator, str) or not label_separator:
            raise ValueError(f"data.source.label_separator must be a non-empty string (e.g. ' ', '|' or ';'), got "
                             f"{label_separator!r}")
        self.label_separator = label_separator

    dataset_class = MultiHotDataset

    # ------------------------------------------------------------ labels ---
    def _split_labels(self, raw: Any) -> list[Any]:
        """One row's label cell -> its list of raw labels (names or ints); an empty cell is no label."""
        if raw is None:
            return []
        if isinstance(raw, (list, tuple)):
            return [v for v in raw if not (isinstance(v, str) and not v.strip())]
        if isinstance(raw, (int, np.integer)) and not isinstance(raw, bool):
            return [int(raw)]
        text = str(raw).strip()
        parts = text.split() if self.label_separator == " " else text.split(self.label_separator)
        return [p.strip() for p in parts if p.strip()]

    def _read(self, split: str) -> list[tuple[str, list[Any]]]:
        """Rows (path, [raw labels]); TXT lines are the path, then every label (split at the first whitespace)."""
        file = self._file(split)
        if file.suffix.lower() == ".txt":
            out = []
            for line in file.read_text(encoding="utf-8").splitlines():
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                path, *labels = line.split()
                out.append((path, labels))
            return out
        return [(p, self._split_labels(v)) for p, v in super()._read(split)]

    def _label_values(self, rows: list[tuple[str, list[Any]]]) -> list[Any]:
        return [v for _, labels in rows for v in labels]

    def _label_space(self, raw: list[Any]) -> Callable[[Any], int | None]:
        to_index = super()._label_space(raw)
        if not self._class_names:
            raise DatasetNotFoundError(f"the train list {self._file('train')} names no class at all; a multi-label "
                                       "list needs a labels column with at least one class somewhere")
        return to_index

    def _encode(self, split: str, rows: list[tuple[str, list[Any]]], to_index: Callable[[Any], int | None]
                ) -> np.ndarray:
        """The split's labels as multi-hot rows (N, C) float32."""
        multi_hot = np.zeros((len(rows), len(self._class_names)), dtype=np.float32)
        bad = []
        for r, (_, labels) in enumerate(rows):
            for v in labels:
                i = to_index(v)
                if i is None:
                    bad.append(v)
                else:
                    multi_hot[r, i] = 1.0
        if bad:
            raise self._unknown_labels(split, bad)
        return multi_hot
