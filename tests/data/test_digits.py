"""Digits: scikit-learn's bundled 8x8 digits with a seeded train/val/test split."""

import numpy as np
import pytest
import torch

from vitlab.data import DictDataset, Digits, build_transforms


@pytest.fixture(scope="module")
def source():
    return Digits()


@pytest.fixture(scope="module")
def splits(source):
    return {s: source.dataset(s) for s in ("train", "val", "test")}


def _as_keys(ds):
    """Each image's bytes, to compare splits by content."""
    return {ds.images[i].tobytes() + bytes([int(ds.labels[i])]) for i in range(len(ds))}


def test_metadata(source):
    assert source.num_classes == 10 and source.in_chans == 1
    assert source.class_names == [str(i) for i in range(10)]
    assert source.splits == ("train", "val", "test") and source.has_split("test")
    assert len(source.mean) == len(source.std) == 1
    source.check()                                                       # bundled: nothing to check


def test_sizes(splits):
    n = {s: len(d) for s, d in splits.items()}
    assert sum(n.values()) == 1797
    assert n["test"] == round(0.2 * 1797) and n["val"] == round(0.1 * 1797)
    assert n["train"] == 1797 - n["test"] - n["val"]


def test_splits_disjoint_and_cover_all(source, splits):
    images, labels = source._arrays()
    ids = {s: set() for s in splits}
    all_rows = {images[i].tobytes(): i for i in range(len(labels))}
    # sklearn digits contain no exact duplicates, so matching rows identifies the sample
    assert len(all_rows) == 1797
    for s, d in splits.items():
        ids[s] = {all_rows[d.images[i].tobytes()] for i in range(len(d))}
        assert len(ids[s]) == len(d)
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    assert ids["train"] | ids["val"] | ids["test"] == set(range(1797))


def test_split_is_seeded(source, splits):
    again = Digits().dataset("val")
    np.testing.assert_array_equal(again.labels, splits["val"].labels)
    np.testing.assert_array_equal(again.images, splits["val"].images)
    other = Digits(split_seed=1).dataset("val")
    assert _as_keys(other) != _as_keys(splits["val"])


def test_fractions_are_honoured():
    src = Digits(val_fraction=0.25, test_fraction=0.0)
    assert len(src.dataset("test")) == 0
    assert len(src.dataset("val")) == round(0.25 * 1797)


def test_items(splits):
    for s, d in splits.items():
        assert set(np.unique(d.labels).tolist()) <= set(range(10))
        image, label = d[0]
        assert isinstance(label, int) and 0 <= label <= 9
        assert isinstance(image, torch.Tensor) and image.dtype == torch.float32 and image.shape == (1, 8, 8)
    train = splits["train"]
    stack = torch.stack([train[i][0] for i in range(len(train))])
    assert stack.min() >= 0.0 and stack.max() <= 1.0
    assert stack.max() == 1.0                                            # scaled by 16, not by 255
    assert set(np.unique(train.labels).tolist()) == set(range(10))       # every class present in train


def test_images_match_sklearn(source, splits):
    from sklearn.datasets import load_digits

    d = load_digits()
    test = splits["test"]
    row = {d.images[i].astype(np.float32).tobytes(): i for i in range(len(d.target))}
    for i in range(5):
        j = row[test.images[i].tobytes()]
        assert int(test.labels[i]) == int(d.target[j])
        torch.testing.assert_close(test[i][0], torch.from_numpy(d.images[j] / 16.0).float().unsqueeze(0))


def test_mean_std_match_the_data(source):
    images, _ = source._arrays()
    x = images / 16.0
    assert abs(x.mean() - source.mean[0]) < 1e-3 and abs(x.std() - source.std[0]) < 1e-3


def test_dict_dataset_with_transform(source, splits):
    tf = build_transforms(False, 16, source.mean, source.std)
    ds = DictDataset(splits["val"], tf)
    assert len(ds) == len(splits["val"])
    item = ds[3]
    assert set(item) == {"image", "label", "index", "corrupt"} and item["corrupt"] == 0
    assert item["image"].shape == (1, 16, 16) and item["image"].dtype == torch.float32
    assert item["image"].min() < 0                                        # normalised, not in [0, 1]
    assert item["label"].dtype == torch.long and item["label"].ndim == 0
    assert int(item["label"]) == splits["val"][3][1]
    assert item["index"] == 3


def test_dict_dataset_without_transform_and_collate(splits):
    ds = DictDataset(splits["train"])
    item = ds[0]
    assert item["image"].shape == (1, 8, 8)
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    assert batch["image"].shape == (4, 1, 8, 8)
    assert batch["label"].dtype == torch.long and batch["label"].shape == (4,)
    assert batch["index"].tolist() == [0, 1, 2, 3]


def test_unknown_split_raises_value_error(source):
    with pytest.raises(ValueError, match="train, val, test"):
        source.dataset("validation")


def test_repeated_access_returns_the_same_image():
    """Regression: _to_tensor divided the stored array in place, so every access rescaled it by 1/16 again."""
    ds = Digits().dataset("train")
    stored = ds.images[0].copy()
    first, second = ds[0][0].clone(), ds[0][0]
    torch.testing.assert_close(first, second)
    np.testing.assert_array_equal(ds.images[0], stored)                  # the source array is untouched
    assert first.max() > 0.5                                             # still in [0, 1], not shrunk


def test_transform_does_not_mutate_the_dataset():
    ds = DictDataset(Digits().dataset("val"), build_transforms(True, 8, (0.3,), (0.4,), policy="crop_flip"))
    stored = ds.base.images.copy()
    for _ in range(3):
        ds[0]
    np.testing.assert_array_equal(ds.base.images, stored)
