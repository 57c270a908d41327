"""CIFAR-10/100 from the official python batches: the shared real subset, missing data, download, CIFAR-100."""

import hashlib
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from vitlab.data import CIFAR, DatasetNotFoundError, DictDataset, build_transforms, seeded_split

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def to_hwc(rows: np.ndarray) -> np.ndarray:
    """Official CIFAR rows (n, 3072), channel-major, -> (n, 32, 32, 3)."""
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


# ---------------------------------------------------------------- the shared real subset (train/val only)

@pytest.fixture(scope="module")
def subset(cifar10_subset_root):
    return CIFAR(str(cifar10_subset_root))


def test_subset_splits_and_sizes(subset):
    subset.check()
    assert subset.splits == ("train", "val")
    assert subset.has_split("val") and not subset.has_split("test")
    train, val = subset.dataset("train"), subset.dataset("val")
    assert len(train) + len(val) == 5085
    assert len(val) == round(0.1 * 5085)
    assert 0.09 < len(val) / 5085 < 0.11


def test_subset_metadata(subset):
    assert subset.name == "cifar10" and subset.num_classes == 10 and subset.in_chans == 3
    assert subset.class_names == CIFAR10_CLASSES
    assert len(subset.mean) == len(subset.std) == 3


def test_subset_images_are_pil_rgb_32(subset):
    val = subset.dataset("val")
    for i in (0, len(val) - 1):
        image, label = val[i]
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)
        assert isinstance(label, int) and 0 <= label <= 9
    assert set(np.unique(val.labels).tolist()) == set(range(10))


def test_subset_pixels_and_labels_match_the_batches(subset, cifar10_subset_root):
    """The dataset's i-th val image is the raw row chosen by the seeded split, decoded channel-major."""
    folder = cifar10_subset_root / "cifar-10-batches-py"
    with open(folder / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    n1 = len(raw["labels"])
    val_idx, train_idx = seeded_split(5085, [0.1], 0)
    val, train = subset.dataset("val"), subset.dataset("train")
    for ds, idx in ((val, val_idx), (train, train_idx)):
        pos = int(np.flatnonzero(idx < n1)[0])              # first sample of this split from data_batch_1
        j = int(idx[pos])
        image, label = ds[pos]
        assert label == raw["labels"][j]
        np.testing.assert_array_equal(np.asarray(image), to_hwc(np.asarray(raw["data"][j:j + 1]))[0])


def test_subset_train_val_disjoint_and_seeded(cifar10_subset_root):
    a, b = CIFAR(str(cifar10_subset_root)).dataset("val"), CIFAR(str(cifar10_subset_root)).dataset("val")
    np.testing.assert_array_equal(a.images, b.images)
    train = CIFAR(str(cifar10_subset_root)).dataset("train")
    val_rows = {img.tobytes() for img in a.images}
    assert not any(img.tobytes() in val_rows for img in train.images[:500])
    other = CIFAR(str(cifar10_subset_root), split_seed=1).dataset("val")
    assert not np.array_equal(other.images, a.images)


def test_subset_test_split_is_missing(subset):
    with pytest.raises(DatasetNotFoundError) as info:
        subset.dataset("test")
    msg = str(info.value)
    assert "test_batch" in msg and "split=val" in msg


def test_subset_with_eval_transform(subset):
    ds = DictDataset(subset.dataset("val"), build_transforms(False, 32, subset.mean, subset.std))
    item = ds[0]
    assert item["image"].shape == (3, 32, 32)
    assert int(item["label"]) == subset.dataset("val")[0][1]


# ---------------------------------------------------------------- missing data

def test_missing_root_without_download(tmp_path):
    src = CIFAR(str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError) as info:
        src.check()
    msg = str(info.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in msg
    assert "download=true" in msg and "cifar-10-python.tar.gz" in msg and "data_batch_1" in msg
    assert not (tmp_path / "nowhere").exists()                           # nothing created
    with pytest.raises(DatasetNotFoundError):                            # loading checks too
        src.dataset("train")


def test_missing_one_batch_is_named(tmp_path, write_fake_cifar10):
    write_fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3"):
        CIFAR(str(tmp_path)).check()


def test_unknown_variant():
    with pytest.raises(ValueError, match="cifar10 or cifar100"):
        CIFAR("x", variant="cifar1000")


# ---------------------------------------------------------------- download

def test_download_verifies_extracts_and_loads(tmp_path, fake_cifar10_archive, http_serve):
    fake = fake_cifar10_archive
    url = http_serve(fake["dir"]) + "/cifar-10-python.tar.gz"
    root = tmp_path / "dl"
    src = CIFAR(str(root), download=True, url=url, md5=fake["md5"], val_fraction=0.2)
    src.check()
    assert (root / "cifar-10-batches-py" / "test_batch").is_file()
    assert src.splits == ("train", "val", "test")
    assert src.class_names == CIFAR10_CLASSES

    train, val, test = src.dataset("train"), src.dataset("val"), src.dataset("test")
    assert len(val) == 4 and len(train) == 16 and len(test) == 5
    val_idx, train_idx = seeded_split(20, [0.2], 0)
    expected = to_hwc(fake["train_data"])
    for ds, idx in ((train, train_idx), (val, val_idx)):
        for pos, j in enumerate(idx):
            image, label = ds[pos]
            np.testing.assert_array_equal(np.asarray(image), expected[j])
            assert label == fake["train_labels"][j]
    test_expected = to_hwc(fake["test_data"])
    for i in range(len(test)):
        image, label = test[i]
        np.testing.assert_array_equal(np.asarray(image), test_expected[i])
        assert label == fake["test_labels"][i]


def test_download_is_skipped_when_present(tmp_path, fake_cifar10_archive, http_serve, closed_port):
    fake = fake_cifar10_archive
    root = tmp_path / "dl"
    CIFAR(str(root), download=True, url=http_serve(fake["dir"]) + "/cifar-10-python.tar.gz", md5=fake["md5"]).check()
    # a second source with an unreachable url must not need the network
    again = CIFAR(str(root), download=True, url=f"http://127.0.0.1:{closed_port}/cifar-10-python.tar.gz")
    again.check()
    assert len(again.dataset("test")) == 5


def test_download_with_wrong_md5(tmp_path, fake_cifar10_archive, http_serve):
    fake = fake_cifar10_archive
    url = http_serve(fake["dir"]) + "/cifar-10-python.tar.gz"
    root = tmp_path / "dl"
    src = CIFAR(str(root), download=True, url=url, md5="0" * 32)
    with pytest.raises(DatasetNotFoundError) as info:
        src.check()
    msg = str(info.value).lower()
    assert "md5" in msg or "corrupt" in msg
    assert not (root / "cifar-10-python.tar.gz").exists()                # the bad archive is not left behind
    assert not (root / "cifar-10-batches-py").exists()                   # nor extracted
    # a later attempt with the right md5 succeeds
    CIFAR(str(root), download=True, url=url, md5=fake["md5"]).check()
    assert (root / "cifar-10-batches-py" / "data_batch_5").is_file()


def test_stale_corrupt_archive_is_replaced(tmp_path, fake_cifar10_archive, http_serve):
    fake = fake_cifar10_archive
    root = tmp_path / "dl"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(b"truncated download")
    CIFAR(str(root), download=True, url=http_serve(fake["dir"]) + "/cifar-10-python.tar.gz", md5=fake["md5"]).check()
    assert (root / "cifar-10-batches-py" / "data_batch_1").is_file()


def test_download_unreachable_url(tmp_path, closed_port):
    url = f"http://127.0.0.1:{closed_port}/cifar-10-python.tar.gz"
    root = tmp_path / "dl"
    with pytest.raises(DatasetNotFoundError) as info:
        CIFAR(str(root), download=True, url=url, md5="0" * 32).check()
    msg = str(info.value)
    assert url in msg and "cifar-10-batches-py" in msg
    assert not (root / "cifar-10-python.tar.gz").exists()


def test_download_missing_file_on_server(tmp_path, fake_cifar10_archive, http_serve):
    url = http_serve(fake_cifar10_archive["dir"]) + "/nothing-here.tar.gz"
    with pytest.raises(DatasetNotFoundError, match="nothing-here.tar.gz"):
        CIFAR(str(tmp_path / "dl"), download=True, url=url, md5=fake_cifar10_archive["md5"]).check()


def test_archive_without_the_folder(tmp_path, http_serve):
    (tmp_path / "src" / "wrong").mkdir(parents=True)
    (tmp_path / "src" / "wrong" / "x.txt").write_text("x")
    serve = tmp_path / "serve"
    serve.mkdir()
    with tarfile.open(serve / "a.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "wrong", arcname="wrong")
    md5 = hashlib.md5((serve / "a.tar.gz").read_bytes()).hexdigest()
    with pytest.raises(DatasetNotFoundError, match="data_batch_1"):
        CIFAR(str(tmp_path / "dl"), download=True, url=http_serve(serve) + "/a.tar.gz", md5=md5).check()


# ---------------------------------------------------------------- CIFAR-100

def test_cifar100_reading(tmp_path, write_fake_cifar100):
    fake = write_fake_cifar100(tmp_path)
    src = CIFAR(str(tmp_path), variant="cifar100", val_fraction=0.25, split_seed=5)
    src.check()
    assert src.name == "cifar100" and src.num_classes == 100
    assert src.splits == ("train", "val", "test")
    assert src.class_names == fake["names"]
    assert src.mean != CIFAR.mean
    train, val, test = src.dataset("train"), src.dataset("val"), src.dataset("test")
    assert (len(train), len(val), len(test)) == (15, 5, 6)
    val_idx, train_idx = seeded_split(20, [0.25], 5)
    expected = to_hwc(fake["train_data"])
    for pos, j in enumerate(val_idx):
        image, label = val[pos]
        np.testing.assert_array_equal(np.asarray(image), expected[j])
        assert label == fake["train_labels"][j]                           # fine labels, not coarse
    image, label = test[2]
    assert image.size == (32, 32) and image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), to_hwc(fake["test_data"])[2])
    assert label == fake["test_labels"][2]


def test_cifar100_missing_message(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        CIFAR(str(tmp_path), variant="cifar100").check()
    msg = str(info.value)
    assert "cifar-100-python" in msg and "cifar-100-python.tar.gz" in msg and "download=true" in msg


def test_cifar100_without_test(tmp_path, write_fake_cifar100):
    write_fake_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "test").unlink()
    src = CIFAR(str(tmp_path), variant="cifar100")
    assert src.splits == ("train", "val")
    with pytest.raises(DatasetNotFoundError, match="split=val"):
        src.dataset("test")
