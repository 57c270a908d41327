"""ImageFolder: root/train/<class>/*, optional val/ and test/, seeded val split when val/ is absent."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitlab.data import DatasetNotFoundError, DictDataset, ImageFolder, build_transforms, seeded_split

# created in unsorted order on purpose; each class has its own colour so a label can be read off the pixels
COLOURS = {"zebra": (250, 10, 10), "ant": (10, 250, 10), "moth": (10, 10, 250)}
CLASSES = sorted(COLOURS)


def _make_split(root: Path, split: str, per_class: int, classes=tuple(COLOURS)) -> None:
    for cls in classes:
        d = root / split / cls
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (12 + i, 10), COLOURS[cls]).save(d / f"{cls}_{i}.png")


def _label_of(image: Image.Image) -> int:
    pixel = tuple(np.asarray(image.convert("RGB"))[0, 0].tolist())
    return CLASSES.index(next(c for c, col in COLOURS.items() if col == pixel))


def _paths(ds) -> list[str]:
    """File paths of a torchvision ImageFolder or a Subset of one, in dataset order."""
    if hasattr(ds, "indices"):
        return [ds.dataset.samples[i][0] for i in ds.indices]
    return [p for p, _ in ds.samples]


@pytest.fixture
def no_val(tmp_path):
    _make_split(tmp_path, "train", 5)                                    # 15 images
    return tmp_path


@pytest.fixture
def with_val(tmp_path):
    _make_split(tmp_path, "train", 4)
    _make_split(tmp_path, "val", 2)
    return tmp_path


def test_classes_sorted(no_val):
    src = ImageFolder(str(no_val))
    src.check()
    assert src.class_names == CLASSES == ["ant", "moth", "zebra"]
    assert src.num_classes == 3


def test_seeded_split_without_val(no_val):
    src = ImageFolder(str(no_val), val_fraction=0.2, split_seed=3)
    assert src.splits == ("train", "val") and not src.has_split("test")
    train, val = src.dataset("train"), src.dataset("val")
    assert (len(train), len(val)) == (12, 3)
    tp, vp = _paths(train), _paths(val)
    assert not set(tp) & set(vp)
    assert set(tp) | set(vp) == {str(p) for p in (no_val / "train").rglob("*.png")}
    val_idx, _ = seeded_split(15, [0.2], 3)
    assert list(val.indices) == val_idx.tolist()
    # the same seed gives the same split; another seed another one
    assert _paths(ImageFolder(str(no_val), val_fraction=0.2, split_seed=3).dataset("val")) == vp
    others = [set(_paths(ImageFolder(str(no_val), val_fraction=0.2, split_seed=s).dataset("val"))) for s in range(4, 8)]
    assert any(o != set(vp) for o in others)


def test_items_and_labels(no_val):
    src = ImageFolder(str(no_val))
    train = src.dataset("train")
    for i in range(len(train)):
        image, label = train[i]
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert label == _label_of(image)
        assert CLASSES[label] == Path(_paths(train)[i]).parent.name
    ds = DictDataset(train, build_transforms(False, 8, src.mean, src.std))
    item = ds[0]
    assert item["image"].shape == (3, 8, 8) and int(item["label"]) == train[0][1] and item["index"] == 0


def test_uses_val_folder_when_present(with_val):
    src = ImageFolder(str(with_val))
    assert src.splits == ("train", "val")
    train, val = src.dataset("train"), src.dataset("val")
    assert len(train) == 12 and len(val) == 6                           # all of train/, all of val/
    assert all("/val/" in p for p in _paths(val))
    assert all("/train/" in p for p in _paths(train))
    for i in range(len(val)):
        image, label = val[i]
        assert label == _label_of(image)


def test_test_split_only_with_test_folder(no_val):
    src = ImageFolder(str(no_val))
    with pytest.raises(DatasetNotFoundError, match="split=val"):
        src.dataset("test")
    _make_split(no_val, "test", 1)
    assert src.splits == ("train", "val", "test") and src.has_split("test")
    test = src.dataset("test")
    assert len(test) == 3 and all("/test/" in p for p in _paths(test))
    assert sorted(label for _, label in test) == [0, 1, 2]


def test_missing_root(tmp_path):
    root = tmp_path / "absent"
    src = ImageFolder(str(root))
    with pytest.raises(DatasetNotFoundError) as info:
        src.check()
    msg = str(info.value)
    assert str(root / "train") in msg and "train/<class>/<image>" in msg and "data.root" in msg
    with pytest.raises(DatasetNotFoundError):
        src.dataset("train")


def test_train_without_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "loose.png")     # images not in class folders
    with pytest.raises(DatasetNotFoundError, match="train/<class>"):
        ImageFolder(str(tmp_path)).check()


def test_val_with_other_classes(tmp_path):
    _make_split(tmp_path, "train", 2)
    _make_split(tmp_path, "val", 1, classes=("ant", "zebra"))
    with pytest.raises(DatasetNotFoundError, match="differ"):
        ImageFolder(str(tmp_path)).dataset("val")


def test_name_is_configurable(no_val):
    assert ImageFolder(str(no_val), name="pets").name == "pets"
