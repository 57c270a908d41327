"""The shard writer (vitlab/data/shards.py) against the vitlab-shards/1 format, read back with plain tarfile."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from vitlab.data import CIFAR, ClassificationSource, DatasetNotFoundError, Digits, ImageFolder
from vitlab.data.shards import CorruptDataError, raw_sample, write_shards

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of one shard, in member order (insertion order of the dict)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def read_split(out: Path, info: dict, split: str) -> dict[str, dict[str, bytes]]:
    """All samples of ``split`` across its shards; checks each shard's count in info.json against its tar."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in info["splits"][split]["shards"]:
        part = read_tar(out / shard["name"])
        assert len(part) == shard["num_samples"], shard
        samples.update(part)
    assert len(samples) == info["splits"][split]["num_samples"]
    return samples


def pixels(data: bytes) -> tuple[str, np.ndarray]:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        return im.mode, np.asarray(im)


@pytest.fixture(scope="module")
def cifar_shards(cifar10_subset_root: Path, tmp_path_factory) -> tuple[CIFAR, Path, dict]:
    source = CIFAR(root=str(cifar10_subset_root))
    out = tmp_path_factory.mktemp("cifar_shards")
    info = write_shards(source, out, max_count=1000, progress=False)
    return source, out, info


def test_cifar_shard_names_counts_and_info(cifar_shards):
    source, out, info = cifar_shards
    on_disk = json.loads((out / "info.json").read_text())
    assert on_disk == info
    assert info["format"] == "vitlab-shards/1" and info["source"] == "cifar10"
    assert info["num_classes"] == 10 and info["in_chans"] == 3
    assert info["mean"] == pytest.approx(list(source.mean)) and info["std"] == pytest.approx(list(source.std))
    assert set(info["splits"]) == {"train", "val"}          # the subset has no test batch: skipped
    train = info["splits"]["train"]
    assert train["num_samples"] == 4577 and train["num_corrupt_skipped"] == 0
    assert [s["name"] for s in train["shards"]] == [f"train-{k:06d}.tar" for k in range(5)]
    assert [s["num_samples"] for s in train["shards"]] == [1000, 1000, 1000, 1000, 577]
    assert [s["name"] for s in info["splits"]["val"]["shards"]] == ["val-000000.tar"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["classes.json", "info.json", "val-000000.tar"] + [f"train-{k:06d}.tar" for k in range(5)])
    assert json.loads((out / "classes.json").read_text()) == CIFAR10_CLASSES


@pytest.mark.parametrize("split", ["train", "val"])
def test_cifar_samples_equal_the_source_exactly(cifar_shards, split):
    source, out, info = cifar_shards
    ds = source.dataset(split)
    samples = read_split(out, info, split)
    assert list(samples) == [f"{i:09d}" for i in range(len(ds))]   # dataset order, 9-digit keys
    for i, (key, sample) in enumerate(samples.items()):
        assert set(sample) == {"png", "cls"}
        assert sample["cls"] == str(int(ds.labels[i])).encode()
        mode, arr = pixels(sample["png"])
        assert mode == "RGB"
        np.testing.assert_array_equal(arr, ds.images[i])            # lossless: (32, 32, 3) uint8


def test_digits_float_images_round_trip_as_mode_L_png(tmp_path):
    source = Digits()
    info = write_shards(source, tmp_path, max_count=500, progress=False)
    assert info["in_chans"] == 1 and set(info["splits"]) == {"train", "val", "test"}
    for split in ("train", "val", "test"):
        ds = source.dataset(split)
        samples = read_split(tmp_path, info, split)
        assert len(samples) == len(ds)
        for i in (0, len(ds) // 2, len(ds) - 1):
            image, label = ds[i]                                    # (1, 8, 8) float in [0, 1]
            mode, arr = pixels(samples[f"{i:09d}"]["png"])
            assert mode == "L" and arr.shape == (8, 8)
            np.testing.assert_array_equal(arr, (image[0] * 255).round().to(torch.uint8).numpy())
            assert int(samples[f"{i:09d}"]["cls"]) == label


def _cifar_images(cifar10_subset_root: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    ds = CIFAR(root=str(cifar10_subset_root)).dataset("val")
    return ds.images[:n], ds.labels[:n]


def _image_folder(root: Path, images: np.ndarray, labels: np.ndarray, exts=("png", "jpg", "JPEG")) -> list[Path]:
    """Save real CIFAR images as root/<class>/<i>.<ext> (cycling through ``exts``); return the paths."""
    paths = []
    for i, (img, label) in enumerate(zip(images, labels)):
        ext = exts[i % len(exts)]
        path = root / CIFAR10_CLASSES[label] / f"{i:03d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, format="PNG" if ext == "png" else "JPEG", quality=90)
        paths.append(path)
    return paths


def test_imagefolder_keeps_the_original_file_bytes(cifar10_subset_root, tmp_path):
    images, labels = _cifar_images(cifar10_subset_root, 24)
    _image_folder(tmp_path / "data" / "train", images, labels)          # no val/: train and val are Subsets
    source = ImageFolder(root=str(tmp_path / "data"), val_fraction=0.25)
    out = tmp_path / "shards"
    info = write_shards(source, out, max_count=5, progress=False)
    assert json.loads((out / "classes.json").read_text()) == source.class_names
    for split in ("train", "val"):
        ds = source.dataset(split)                                       # a Subset of a torchvision ImageFolder
        samples = read_split(out, info, split)
        assert len(samples) == len(ds) > 0
        for i in range(len(ds)):
            path, label = ds.dataset.samples[ds.indices[i]]
            sample = samples[f"{i:09d}"]
            ext = {"png": "png", "jpg": "jpg", "jpeg": "jpg"}[Path(path).suffix.lower().lstrip(".")]
            assert set(sample) == {ext, "cls"}
            assert sample[ext] == Path(path).read_bytes()                 # not re-encoded
            assert sample["cls"] == str(label).encode()
            assert raw_sample(ds, i) == (Path(path).read_bytes(), ext, label, path)


class _OneSplit(ClassificationSource):
    """A source with one split, whose dataset is given."""

    name = "custom"
    num_classes = 10
    class_names = CIFAR10_CLASSES
    splits = ("train",)

    def __init__(self, dataset: Dataset):
        self.ds = dataset

    def _load(self, split: str) -> Dataset:
        return self.ds


class _Reader(Dataset):
    """A reader-style dataset: ``path_of``/``label_of`` (file lists, ImageNet) or ``bytes_of`` (Hugging Face)
    per item. ``__getitem__`` fails: the writer must take bytes and labels without decoding an image."""

    def __init__(self, items: list[tuple[Path | bytes, int]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        raise AssertionError("the writer decoded an image to get a label that label_of gives")

    def path_of(self, i: int) -> str | None:
        item = self.items[i][0]
        return str(item) if isinstance(item, Path) else None

    def bytes_of(self, i: int) -> bytes | None:
        item = self.items[i][0]
        return item if isinstance(item, bytes) else None

    def label_of(self, i: int) -> int:
        return self.items[i][1]


def test_path_of_label_of_datasets_are_written_without_loading(cifar10_subset_root, tmp_path):
    images, labels = _cifar_images(cifar10_subset_root, 6)
    paths = _image_folder(tmp_path / "imgs", images, labels, exts=("jpeg", "webp"))
    info = write_shards(_OneSplit(_Reader(list(zip(paths, labels.tolist())))), tmp_path / "out",
                        splits=["train", "val"], progress=False)
    assert set(info["splits"]) == {"train"}                               # val absent from the source: skipped
    samples = read_split(tmp_path / "out", info, "train")
    for i, (path, label) in enumerate(zip(paths, labels)):
        ext = "jpg" if path.suffix == ".jpeg" else "webp"
        assert samples[f"{i:09d}"] == {ext: path.read_bytes(), "cls": str(label).encode()}


def test_stored_bytes_are_written_as_is_and_broken_ones_named(cifar10_subset_root, tmp_path, caplog):
    images, labels = _cifar_images(cifar10_subset_root, 12)
    encoded = []
    for i, img in enumerate(images):                   # what a Hugging Face image column stores: encoded bytes
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG" if i % 2 else "PNG")
        encoded.append(buf.getvalue())
    items = list(zip(encoded, labels.tolist())) + [(b"not an image", 3)]       # 1 broken of 13: under 10 %
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        info = write_shards(_OneSplit(_Reader(items)), tmp_path, splits=["train"], progress=False)
    assert info["splits"]["train"]["num_samples"] == 12 and info["splits"]["train"]["num_corrupt_skipped"] == 1
    assert "item 12 of the train split" in caplog.text
    samples = read_split(tmp_path, info, "train")
    for i, (data, label) in enumerate(zip(encoded, labels)):
        ext = "jpg" if i % 2 else "png"
        assert samples[f"{i:09d}"] == {ext: data, "cls": str(label).encode()}


def _val_like(root: Path, train: Path, images: np.ndarray) -> int:
    """One image in root/<class>/ for each class folder of ``train`` (ImageFolder needs the same classes)."""
    classes = sorted(p.name for p in train.iterdir())
    _image_folder(root, images[: len(classes)], np.array([CIFAR10_CLASSES.index(c) for c in classes]), ("png",))
    return len(classes)


def test_corrupt_files_are_skipped_counted_and_named(cifar10_subset_root, tmp_path, caplog):
    images, labels = _cifar_images(cifar10_subset_root, 30)
    root = tmp_path / "data"
    _image_folder(root / "train", images[:20], labels[:20], exts=("jpg",))
    good = (root / "train" / CIFAR10_CLASSES[labels[0]] / "000.jpg").read_bytes()
    truncated = root / "train" / "cat" / "truncated.jpg"
    truncated.parent.mkdir(exist_ok=True)
    truncated.write_bytes(good[:-200])                                   # headers intact, scan data cut short
    with Image.open(truncated) as im:                                    # opens: only a full decode notices
        assert im.size == (32, 32)
    not_an_image = root / "train" / "dog" / "notes.jpg"
    not_an_image.parent.mkdir(exist_ok=True)
    not_an_image.write_text("this is not a JPEG\n")
    n_val = _val_like(root / "val", root / "train", images[20:])
    source = ImageFolder(root=str(root))
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        info = write_shards(source, tmp_path / "out", progress=False)
    assert info["splits"]["train"]["num_corrupt_skipped"] == 2 and info["splits"]["train"]["num_samples"] == 20
    assert info["splits"]["val"] == {"num_samples": n_val, "num_corrupt_skipped": 0,
                                     "shards": [{"name": "val-000000.tar", "num_samples": n_val}]}
    warned = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert str(truncated) in warned and str(not_an_image) in warned
    ds = source.dataset("train")
    samples = read_split(tmp_path / "out", info, "train")
    written = {ds.samples[int(k)][0] for k in samples}
    assert str(truncated) not in written and str(not_an_image) not in written and len(written) == 20


def test_too_many_corrupt_files_is_an_error_and_leaves_nothing(cifar10_subset_root, tmp_path):
    images, labels = _cifar_images(cifar10_subset_root, 16)
    root = tmp_path / "data"
    _image_folder(root / "train", images[:8], labels[:8], exts=("png",))
    n_val = _val_like(root / "val", root / "train", images[8:])
    (root / "val" / CIFAR10_CLASSES[labels[0]] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "out"
    with pytest.raises(CorruptDataError, match="broken.png"):
        write_shards(ImageFolder(root=str(root)), out, progress=False)   # 1 of n_val + 1 <= 9: over 10 %
    assert n_val <= 8
    assert list(out.iterdir()) == []                                      # train's finished shards removed too


def test_refuses_to_overwrite_unless_asked(tmp_path):
    source = Digits()
    first = write_shards(source, tmp_path, splits=["test"], max_count=100, progress=False)
    assert len(first["splits"]["test"]["shards"]) == 4
    tars = {p.name: p.read_bytes() for p in tmp_path.glob("*.tar")}
    with pytest.raises(FileExistsError, match="overwrite"):
        write_shards(source, tmp_path, splits=["test"], progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.tar")} == tars   # untouched
    second = write_shards(source, tmp_path, splits=["test"], max_count=200, overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["test-000000.tar", "test-000001.tar"]
    assert json.loads((tmp_path / "info.json").read_text()) == second
    assert (tmp_path / "test-000000.tar").read_bytes()[:512 * 10] == tars["test-000000.tar"][:512 * 10]  # same data


def test_no_requested_split_present_is_an_error(cifar10_subset_root, tmp_path):
    with pytest.raises(DatasetNotFoundError, match="train, val"):
        write_shards(CIFAR(root=str(cifar10_subset_root)), tmp_path / "out", splits=["test"], progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
