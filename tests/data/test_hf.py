"""HFDataset: save_to_disk folders (one split or a DatasetDict), column/split detection, the missing-package error."""

from __future__ import annotations

import builtins
import io
import logging
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image as PILImage

from tests.conftest import CONF
from vitlab.data.base import DatasetNotFoundError, DictDataset, seeded_split
from vitlab.data.hf import HFDataset, HFImageDataset
from vitlab.data.transforms import build_transforms

datasets = pytest.importorskip("datasets")

NAMES = ["cat", "dog", "eel"]
COLOURS = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]


@pytest.fixture(autouse=True)
def _quiet_datasets():
    datasets.disable_progress_bars()
    logging.getLogger("datasets").setLevel(logging.ERROR)


def _split(labels: list[int], image_column: str = "image", label_column: str = "label", mode: str = "L"):
    # grey-scale ("L") images on purpose: items must come out RGB
    images = [PILImage.new("RGB", (7, 5), COLOURS[y]).convert(mode) if mode != "RGB" else
              PILImage.new("RGB", (7, 5), COLOURS[y]) for y in labels]
    features = datasets.Features({image_column: datasets.Image(), label_column: datasets.ClassLabel(names=NAMES)})
    return datasets.Dataset.from_dict({image_column: images, label_column: labels}, features=features)


def _colour_label(image: PILImage.Image) -> int:
    """The class whose colour (or its grey level, for the "L" images) the RGB image shows."""
    pixel = tuple(np.asarray(image)[0, 0].tolist())
    greys = [tuple(np.asarray(PILImage.new("RGB", (1, 1), c).convert("L").convert("RGB"))[0, 0].tolist())
             for c in COLOURS]
    return COLOURS.index(pixel) if pixel in COLOURS else greys.index(pixel)


TRAIN = [0, 1, 2, 0, 1, 2, 0, 1, 2, 2]


def test_single_saved_split_is_train_with_seeded_val(tmp_path):
    _split(TRAIN, mode="RGB").save_to_disk(str(tmp_path / "ds"))
    src = HFDataset(str(tmp_path / "ds"), val_fraction=0.2, split_seed=1)
    src.check()
    assert src.class_names == NAMES and src.num_classes == 3 and src.splits == ("train", "val")
    train, val = src.dataset("train"), src.dataset("val")
    val_idx, train_idx = seeded_split(10, [0.2], 1)
    assert isinstance(val, HFImageDataset) and (len(train), len(val)) == (8, 2)
    assert [val.label_of(i) for i in range(2)] == [TRAIN[k] for k in val_idx]
    assert [train.label_of(i) for i in range(8)] == [TRAIN[k] for k in train_idx]
    for ds in (train, val):
        for i in range(len(ds)):
            image, label = ds[i]
            assert isinstance(image, PILImage.Image) and image.mode == "RGB" and image.size == (7, 5)
            assert label == _colour_label(image)
    item = DictDataset(train, build_transforms(False, 4, src.mean, src.std))[0]
    assert item["image"].shape == (3, 4, 4) and int(item["label"]) == train.label_of(0)
    # bytes are embedded: no file to copy, but the encoded bytes are there for a shard writer
    assert train.path_of(0) is None
    assert _colour_label(PILImage.open(io.BytesIO(train.bytes_of(0)))) == train.label_of(0)
    with pytest.raises(DatasetNotFoundError, match="no test split.*test_split"):
        src.dataset("test")


def test_dataset_dict_with_validation_and_test(tmp_path):
    dd = datasets.DatasetDict(train=_split(TRAIN), validation=_split([2, 1]), test=_split([0, 0, 1]))
    dd.save_to_disk(str(tmp_path / "dd"))
    src = HFDataset(str(tmp_path / "dd"))
    assert src.splits == ("train", "val", "test")
    lengths = {s: len(src.dataset(s)) for s in src.splits}
    assert lengths == {"train": 10, "val": 2, "test": 3}           # val is the validation split, not a split of train
    val = src.dataset("val")
    assert [val[i][1] for i in range(2)] == [2, 1] and val[0][0].mode == "RGB"
    assert [_colour_label(val[i][0]) for i in range(2)] == [2, 1]
    # explicit split names; a wrong one lists the splits there are
    assert len(HFDataset(str(tmp_path / "dd"), val_split="test").dataset("val")) == 3
    with pytest.raises(DatasetNotFoundError, match="no split 'valid' .*splits: train, validation, test"):
        HFDataset(str(tmp_path / "dd"), val_split="valid").check()


def test_column_detection_and_unlabelled_test(tmp_path):
    train = _split(TRAIN, image_column="img", label_column="fine_label")
    test = _split([0, 1], image_column="img", label_column="fine_label").cast_column(
        "fine_label", datasets.Value("int64")).map(lambda r: {"fine_label": -1})
    datasets.DatasetDict(train=train, test=test).save_to_disk(str(tmp_path / "dd"))
    src = HFDataset(str(tmp_path / "dd"))
    src.check()                                                    # the unlabelled test split does not stop training
    assert src.class_names == NAMES and src.dataset("train")[3][1] == 0
    with pytest.raises(DatasetNotFoundError, match="split 'test' .* 2 row\\(s\\) with labels outside"):
        src.dataset("test")
    with pytest.raises(DatasetNotFoundError, match="no column 'picture' \\(columns: img, fine_label\\)"):
        HFDataset(str(tmp_path / "dd"), image_column="picture").check()


def test_string_labels_and_path_images(tmp_path):
    files = []
    for k, y in enumerate(TRAIN):
        files.append(str(tmp_path / f"{k}.png"))
        PILImage.new("RGB", (3, 3), COLOURS[y]).save(files[-1])
    ds = datasets.Dataset.from_dict({"image": files, "label": [NAMES[y] for y in TRAIN]})
    ds.save_to_disk(str(tmp_path / "ds"))                          # plain strings: paths and class names
    src = HFDataset(str(tmp_path / "ds"), val_fraction=0.0)
    assert src.class_names == NAMES
    train = src.dataset("train")
    assert [train.label_of(i) for i in range(10)] == TRAIN
    assert train.path_of(4) == files[4] and _colour_label(train[4][0]) == TRAIN[4]


def test_missing_saved_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="no dataset at .*save_to_disk.*Hub dataset name"):
        HFDataset(str(tmp_path / "absent")).check()


def test_missing_package_error(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    src = HFDataset(str(tmp_path))                                 # constructing needs no package
    assert src.has_split("train") and src.has_split("val")
    with pytest.raises(DatasetNotFoundError, match=r"pip install 'vitlab\[hf\]'"):
        src.check()


def test_conf_composes_and_instantiates(tmp_path):
    datasets.DatasetDict(train=_split(TRAIN), validation=_split([1])).save_to_disk(str(tmp_path / "dd"))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["data=hf", f"data.root={tmp_path / 'dd'}"])
    assert cfg.data.mixup.cutmix_alpha == 0.0 and cfg.data.repeated_aug == 0
    src = instantiate(cfg.data.source, _convert_="all")
    assert isinstance(src, HFDataset) and Path(src.name_or_path) == tmp_path / "dd"
    src.check()
    assert src.class_names == NAMES and len(src.dataset("val")) == 1
