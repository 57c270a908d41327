"""data=multilabel: lists whose rows name several classes (CSV / TSV / JSON / JSON Lines / TXT), read into multi-hot
rows; bad lists stop with the fix. Images are written by the test."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.data import DatasetNotFoundError, MultiLabelFileList
from vitlab.data.base import DataInfo


def _images(folder, n: int = 6) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        Image.fromarray(np.full((6, 6, 3), 20 * i, np.uint8)).save(folder / f"im{i}.png")
        names.append(f"im{i}.png")
    return names


ROWS = [("im0.png", "cat dog"), ("im1.png", "dog"), ("im2.png", ""), ("im3.png", "bird cat"), ("im4.png", "bird"),
        ("im5.png", "dog cat bird")]
EXPECTED = np.array([[0, 1, 1], [0, 0, 1], [0, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1]], np.float32)  # bird cat dog


def _write(root, fmt: str) -> str:
    if fmt == "csv":
        (root / "train.csv").write_text("path,labels\n" + "".join(f"{p},{lab}\n" for p, lab in ROWS))
    elif fmt == "tsv":
        (root / "train.tsv").write_text("path\tlabels\n" + "".join(f"{p}\t{lab}\n" for p, lab in ROWS))
    elif fmt == "json":
        (root / "train.json").write_text(json.dumps([{"path": p, "labels": lab.split()} for p, lab in ROWS]))
    elif fmt == "jsonl":
        (root / "train.jsonl").write_text("".join(json.dumps({"path": p, "labels": lab.split()}) + "\n"
                                                  for p, lab in ROWS))
    else:                                       # any whitespace between the path and the labels
        (root / "train.txt").write_text("".join(f"{p}\t{lab}\n" if i % 2 else f"{p} {lab}\n"
                                                for i, (p, lab) in enumerate(ROWS)))
    return str(root / f"train.{fmt}")


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "txt"])
def test_every_format_gives_the_same_multi_hot_rows(tmp_path, fmt):
    _images(tmp_path)
    src = MultiLabelFileList(_write(tmp_path, fmt), val_list=_write(tmp_path, fmt), root=str(tmp_path))
    src.check()
    assert (src.task, src.label_kind, src.num_classes, src.class_names) == ("multilabel", "multi_hot", 3,
                                                                            ["bird", "cat", "dog"])
    ds = src.dataset("train")
    assert np.array_equal(np.stack([ds[i][1] for i in range(len(ds))]), EXPECTED)
    image, label = ds[0]
    assert image.size == (6, 6) and label.dtype == np.float32
    info = DataInfo.from_source(src, 8)
    assert (info.task, info.num_classes, info.class_names) == ("multilabel", 3, ("bird", "cat", "dog"))


def test_batches_hold_multi_hot_labels_and_the_split_is_seeded(tmp_path):
    from vitlab.lit.datamodule import VitlabDataModule

    _images(tmp_path, 6)
    src = MultiLabelFileList(_write(tmp_path, "csv"), root=str(tmp_path), val_fraction=0.34, split_seed=1)
    assert len(src.dataset("train")) == 4 and len(src.dataset("val")) == 2
    dm = VitlabDataModule(src, img_size=8, batch_size=2, augment={"policy": "none"},
                          mixup={"mixup_alpha": 0.8, "label_smoothing": 0.0})
    batch = next(iter(dm.loader("train")))
    assert batch["label"].shape == (2, 3) and batch["label"].dtype == torch.long
    mixed = dm.mixup(batch["image"].clone(), batch["label"])[1]   # mixup blends multi-hot rows
    assert mixed.shape == (2, 3) and mixed.dtype == torch.float32


def test_integer_labels_a_separator_and_a_fixed_class_list(tmp_path):
    _images(tmp_path, 3)
    (tmp_path / "train.csv").write_text("file,tags\nim0.png,0|2\nim1.png,1\nim2.png,\n")
    src = MultiLabelFileList(str(tmp_path / "train.csv"), val_list=str(tmp_path / "train.csv"), root=str(tmp_path),
                             path_column="file", label_column="tags", label_separator="|", num_classes=4)
    assert src.num_classes == 4
    assert np.array_equal(src.dataset("val").labels, [[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    (tmp_path / "named.csv").write_text("path,labels\nim0.png,dog\nim1.png,cat\n")
    fixed = MultiLabelFileList(str(tmp_path / "named.csv"), val_list=str(tmp_path / "named.csv"),
                               root=str(tmp_path), classes=["dog", "cat", "fish"])
    assert fixed.class_names == ["dog", "cat", "fish"] and fixed.dataset("val").labels[0].tolist() == [1, 0, 0]


@pytest.mark.parametrize("rows, needle", [
    ("path,labels\nim0.png,cat\nmissing.png,dog\n", "do not exist"),
    ("path,labels\nim0.png,\nim1.png,\n", "names no class at all"),
    ("file,labels\nim0.png,cat\n", "has no column 'path'"),
])
def test_bad_lists_stop_with_the_fix(tmp_path, rows, needle):
    _images(tmp_path, 2)
    (tmp_path / "train.csv").write_text(rows)
    with pytest.raises(DatasetNotFoundError, match=needle):
        MultiLabelFileList(str(tmp_path / "train.csv"), root=str(tmp_path)).check()


def test_a_val_label_unknown_to_the_train_list_is_named(tmp_path):
    _images(tmp_path, 2)
    (tmp_path / "train.csv").write_text("path,labels\nim0.png,cat\n")
    (tmp_path / "val.csv").write_text("path,labels\nim1.png,cat zebra\n")
    with pytest.raises(DatasetNotFoundError, match="'zebra'.*data.source.classes"):
        MultiLabelFileList(str(tmp_path / "train.csv"), val_list=str(tmp_path / "val.csv"), root=str(tmp_path)).check()
