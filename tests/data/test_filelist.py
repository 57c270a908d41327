"""FileList: (path, label) lists in CSV/TSV/JSON/JSONL/TXT, names or int labels, seeded val split, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from tests.conftest import CONF
from vitlab.data.base import DatasetNotFoundError, DictDataset, seeded_split
from vitlab.data.filelist import FileDataset, FileList
from vitlab.data.transforms import build_transforms

COLOURS = {"zebra": (250, 10, 10), "ant": (10, 250, 10), "moth": (10, 10, 250)}
CLASSES = sorted(COLOURS)                                       # ant, moth, zebra


def _colour_class(image: Image.Image) -> str:
    pixel = tuple(np.asarray(image)[0, 0].tolist())
    return next(c for c, col in COLOURS.items() if col == pixel)


@pytest.fixture
def images(tmp_path) -> list[tuple[str, str]]:
    """12 tiny PNGs under tmp_path/img/<class>_<i>.png, 4 per class: (relative path, class name)."""
    rows = []
    (tmp_path / "img").mkdir()
    for cls, colour in COLOURS.items():                         # unsorted on purpose
        for i in range(4):
            rel = f"img/{cls}_{i}.png"
            Image.new("RGB", (6 + i, 5), colour).save(tmp_path / rel)
            rows.append((rel, cls))
    return rows


def _write(path: Path, fmt: str, rows: list[tuple[str, object]], header: bool = True) -> Path:
    if fmt == "csv":
        lines = (["path,label"] if header else []) + [f"{p},{label}" for p, label in rows]
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "tsv":
        path.write_text("".join(f"{p}\t{label}\n" for p, label in rows))
    elif fmt == "json-objects":
        path.write_text(json.dumps([{"path": p, "label": label} for p, label in rows]))
    elif fmt == "json-pairs":
        path.write_text(json.dumps([[p, label] for p, label in rows]))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"label": label, "path": p}) + "\n" for p, label in rows))
    elif fmt == "txt":
        path.write_text("".join(f"{p} {label}\n" for p, label in rows))
    return path


SUFFIX = {"csv": ".csv", "tsv": ".tsv", "json-objects": ".json", "json-pairs": ".json", "jsonl": ".jsonl",
          "txt": ".txt"}


def _check_items(ds, names: list[str]) -> None:
    assert isinstance(ds, FileDataset)
    for i in range(len(ds)):
        image, label = ds[i]
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert names[label] == _colour_class(image) and ds.label_of(i) == label
        assert Path(ds.path_of(i)).is_file()


@pytest.mark.parametrize("fmt", list(SUFFIX))
def test_every_format_with_class_names(tmp_path, images, fmt):
    train = _write(tmp_path / f"train{SUFFIX[fmt]}", fmt, images[::2])
    val = _write(tmp_path / f"val{SUFFIX[fmt]}", fmt, images[1::2])
    src = FileList(str(train), val_list=str(val))
    src.check()
    assert src.class_names == CLASSES and src.num_classes == 3 and src.splits == ("train", "val")
    tr, va = src.dataset("train"), src.dataset("val")
    assert (len(tr), len(va)) == (6, 6)
    _check_items(tr, CLASSES)
    _check_items(va, CLASSES)
    assert va.path_of(0) == str(tmp_path / images[1][0])           # relative to the list's folder, in list order


def test_int_labels_csv_without_header_and_json_ints(tmp_path, images):
    rows = [(p, CLASSES.index(c)) for p, c in images]
    src = FileList(str(_write(tmp_path / "train.csv", "csv", rows, header=False)))
    assert src.class_names == ["0", "1", "2"] and src.num_classes == 3
    _check_items(src.dataset("train"), CLASSES)
    src = FileList(str(_write(tmp_path / "train.json", "json-objects", rows)), num_classes=5)
    assert src.num_classes == 5                                    # given: more classes than the max label needs
    _check_items(src.dataset("val"), CLASSES)
    with pytest.raises(DatasetNotFoundError, match="num_classes=2 but .* has label 2"):
        FileList(str(tmp_path / "train.json"), num_classes=2).check()


def test_custom_columns_root_and_classes(tmp_path, images):
    lists = tmp_path / "lists"
    lists.mkdir()
    train = lists / "train.csv"
    train.write_text("id,file,cls\n" + "".join(f"{k},{p},{c}\n" for k, (p, c) in enumerate(images)))
    order = ["zebra", "moth", "ant"]                               # an explicit class order, not sorted
    (lists / "classes.txt").write_text("\n".join(order) + "\n")
    src = FileList(str(train), root=str(tmp_path), path_column="file", label_column="cls",
                   classes=str(lists / "classes.txt"))
    assert src.class_names == order
    _check_items(src.dataset("train"), order)
    src = FileList(str(train), root=str(tmp_path), path_column="file", label_column="cls", classes=order)
    assert src.class_names == order


def test_seeded_val_split_and_test_list(tmp_path, images):
    train = _write(tmp_path / "train.jsonl", "jsonl", images)
    src = FileList(str(train), val_fraction=0.25, split_seed=3)
    assert not src.has_split("test")
    with pytest.raises(DatasetNotFoundError, match="no test list.*test_list"):
        src.dataset("test")
    tr, va = src.dataset("train"), src.dataset("val")
    assert (len(tr), len(va)) == (9, 3)
    val_idx, _ = seeded_split(12, [0.25], 3)
    assert [va.path_of(i) for i in range(3)] == [str(tmp_path / images[k][0]) for k in val_idx]
    assert not {tr.path_of(i) for i in range(9)} & {va.path_of(i) for i in range(3)}
    test = _write(tmp_path / "test.txt", "txt", images[:2])
    src = FileList(str(train), test_list=str(test))
    assert src.splits == ("train", "val", "test")
    _check_items(src.dataset("test"), CLASSES)
    item = DictDataset(src.dataset("test"), build_transforms(False, 4, src.mean, src.std))[1]
    assert item["image"].shape == (3, 4, 4) and CLASSES[int(item["label"])] == images[1][1]


def test_missing_list_file(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="the train list .*nope.csv does not exist.*train_list"):
        FileList(str(tmp_path / "nope.csv")).check()
    train = _write(tmp_path / "train.csv", "csv", [])
    with pytest.raises(DatasetNotFoundError, match="the val list .*val.csv does not exist"):
        FileList(str(train), val_list=str(tmp_path / "val.csv")).check()


def test_missing_column_lists_columns_found(tmp_path, images):
    train = tmp_path / "train.csv"
    train.write_text("filename,class\n" + "".join(f"{p},{c}\n" for p, c in images))
    with pytest.raises(DatasetNotFoundError, match=r"no column 'path' \(columns found: filename, class\).*path_column"):
        FileList(str(train)).check()
    with pytest.raises(DatasetNotFoundError, match=r"no column 'label' \(columns found: filename, class\)"):
        FileList(str(train), path_column="filename").check()
    assert FileList(str(train), path_column="filename", label_column="class").class_names == CLASSES
    objects = tmp_path / "train.json"
    objects.write_text(json.dumps([{"file": p, "label": c} for p, c in images]))
    with pytest.raises(DatasetNotFoundError, match=r"no column 'path' \(columns found: file, label\)"):
        FileList(str(objects)).check()


def test_missing_images_reported_up_front(tmp_path, images):
    rows = images + [(f"img/gone_{k}.png", "ant") for k in range(7)]
    train = _write(tmp_path / "train.csv", "csv", rows)
    with pytest.raises(DatasetNotFoundError) as info:
        FileList(str(train)).check()
    msg = str(info.value)
    assert "7 of 19 images listed in" in msg and "gone_0.png" in msg and "gone_4.png" in msg
    assert "gone_5.png" not in msg and "data.root" in msg


def test_val_label_unknown_to_train(tmp_path, images):
    train = _write(tmp_path / "train.csv", "csv", [r for r in images if r[1] != "moth"])
    val = _write(tmp_path / "val.csv", "csv", images)
    with pytest.raises(DatasetNotFoundError, match=r"4 label\(s\) in the val list .* unknown to the train list.*'moth'"):
        FileList(str(train), val_list=str(val)).check()


def test_corrupt_image_raises_unchanged(tmp_path, images):
    (tmp_path / images[0][0]).write_bytes(b"not an image")
    ds = FileList(str(_write(tmp_path / "train.csv", "csv", images)), val_list=str(tmp_path / "train.csv"))
    with pytest.raises(OSError):
        ds.dataset("train")[0]


def test_conf_composes_and_instantiates(tmp_path, images):
    _write(tmp_path / "train.csv", "csv", images)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["data=filelist", f"data.root={tmp_path}"])
    assert cfg.data.source.train_list == f"{tmp_path}/train.csv" and cfg.data.repeated_aug == 0
    src = instantiate(cfg.data.source, _convert_="all")
    assert isinstance(src, FileList)
    src.check()
    assert src.class_names == CLASSES and len(src.dataset("train")) + len(src.dataset("val")) == 12
