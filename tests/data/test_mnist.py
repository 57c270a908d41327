"""MNIST / Fashion-MNIST from IDX files: the shared real copy, the split, damaged files, download with md5."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SHARED_DATA
from vitlab.data import MNIST, DatasetNotFoundError, seeded_split
from vitlab.data.mnist import read_idx

MNIST_ROOT = SHARED_DATA / "mnist"


def _idx_bytes(array: np.ndarray) -> bytes:
    magic = 2051 if array.ndim == 3 else 2049
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fake_mnist(folder: Path, n_train: int = 20, n_test: int = 5, gz: bool = True, seed: int = 0) -> dict:
    """Four IDX files (random 28x28 images, labels 0..9) in ``folder``; returns the arrays and the files' md5s."""
    rng = np.random.default_rng(seed)
    arrays = {"train_images": rng.integers(0, 256, (n_train, 28, 28)), "train_labels": np.arange(n_train) % 10,
              "test_images": rng.integers(0, 256, (n_test, 28, 28)), "test_labels": (np.arange(n_test) + 3) % 10}
    names = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
    folder.mkdir(parents=True, exist_ok=True)
    md5s = {}
    for key, arr in arrays.items():
        data = _idx_bytes(np.asarray(arr))
        path = folder / (names[key] + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
        md5s[key] = hashlib.md5(path.read_bytes()).hexdigest()
    return {"arrays": arrays, "md5s": md5s}


@pytest.fixture
def mnist_root() -> Path:
    if not (MNIST_ROOT / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"the shared MNIST is not at {MNIST_ROOT} (set VITLAB_SHARED_DATA)")
    return MNIST_ROOT


def test_shared_mnist_splits_and_statistics(mnist_root):
    src = MNIST(str(mnist_root))
    src.check()
    assert src.splits == ("train", "val", "test") and src.in_chans == 1 and src.num_classes == 10
    train, val, test = src.dataset("train"), src.dataset("val"), src.dataset("test")
    assert (len(train), len(val), len(test)) == (54000, 6000, 10000)
    image, label = train[0]
    assert image.mode == "L" and image.size == (28, 28) and 0 <= label < 10
    images, labels = src._arrays("train")
    # the declared normalisation is the training set's own statistics
    assert abs(images.mean() / 255 - src.mean[0]) < 1e-3 and abs(images.std() / 255 - src.std[0]) < 1e-3
    assert np.bincount(labels).min() > 5000                          # every digit well represented


def test_split_is_seeded_and_disjoint(tmp_path):
    fake = write_fake_mnist(tmp_path / "MNIST" / "raw", n_train=30)
    a = MNIST(str(tmp_path), val_fraction=0.2, split_seed=1)
    val_idx, train_idx = seeded_split(30, [0.2], 1)
    for ds, idx in ((a.dataset("train"), train_idx), (a.dataset("val"), val_idx)):
        assert len(ds) == len(idx)
        for pos, j in enumerate(idx):
            image, label = ds[pos]
            np.testing.assert_array_equal(np.asarray(image), fake["arrays"]["train_images"][j])
            assert label == fake["arrays"]["train_labels"][j]
    b = MNIST(str(tmp_path), val_fraction=0.2, split_seed=2)
    assert [b.dataset("val")[i][1] for i in range(6)] != [a.dataset("val")[i][1] for i in range(6)] or \
        not np.array_equal(np.asarray(b.dataset("val")[0][0]), np.asarray(a.dataset("val")[0][0]))


def test_uncompressed_files_and_fashion_variant(tmp_path):
    fake = write_fake_mnist(tmp_path / "FashionMNIST" / "raw", gz=False)
    src = MNIST(str(tmp_path), variant="fashion_mnist")
    assert src.class_names[9] == "Ankle boot"
    image, label = src.dataset("test")[2]
    np.testing.assert_array_equal(np.asarray(image), fake["arrays"]["test_images"][2])
    assert label == fake["arrays"]["test_labels"][2]


def test_missing_data_names_the_folder_and_the_fix(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        MNIST(str(tmp_path / "nowhere")).check()
    msg = str(info.value)
    assert "MNIST/raw" in msg and "train-images-idx3-ubyte.gz" in msg and "download=true" in msg
    assert not (tmp_path / "nowhere").exists()


def test_no_test_files_means_no_test_split(tmp_path):
    write_fake_mnist(tmp_path / "MNIST" / "raw")
    for f in (tmp_path / "MNIST" / "raw").glob("t10k-*"):
        f.unlink()
    src = MNIST(str(tmp_path))
    assert src.splits == ("train", "val")
    assert "split=val" in src.missing_split_message("test")


def test_damaged_files_are_named(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_fake_mnist(raw)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"not a gzip file")
    with pytest.raises(DatasetNotFoundError, match="train-images-idx3-ubyte.gz.*download it again"):
        MNIST(str(tmp_path)).dataset("train")
    bad = tmp_path / "bad"
    bad.write_bytes(_idx_bytes(np.zeros((3, 28, 28)))[:-10])         # truncated body
    with pytest.raises(DatasetNotFoundError, match="truncated"):
        read_idx(bad, 3)
    with pytest.raises(DatasetNotFoundError, match="magic number"):
        read_idx(bad, 1)                                             # an image file read as labels


def test_download_checks_md5_and_loads(tmp_path, http_serve):
    served = tmp_path / "mirror"
    fake = write_fake_mnist(served)
    root = tmp_path / "dl"
    src = MNIST(str(root), download=True, mirror=http_serve(served), md5s=fake["md5s"])
    src.check()
    assert sorted(p.name for p in (root / "MNIST" / "raw").iterdir()) == sorted(p.name for p in served.iterdir())
    assert len(src.dataset("test")) == 5


def test_download_with_wrong_md5_deletes_the_file(tmp_path, http_serve):
    served = tmp_path / "mirror"
    fake = write_fake_mnist(served)
    root = tmp_path / "dl"
    bad = {**fake["md5s"], "train_labels": "0" * 32}
    with pytest.raises(DatasetNotFoundError, match="md5"):
        MNIST(str(root), download=True, mirror=http_serve(served), md5s=bad).check()
    assert not (root / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz").exists()


def test_download_unreachable(tmp_path, closed_port):
    with pytest.raises(DatasetNotFoundError, match="could not download.*Offline"):
        MNIST(str(tmp_path), download=True, mirror=f"http://127.0.0.1:{closed_port}/").check()
