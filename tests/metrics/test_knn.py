"""DINO's weighted kNN classifier (vitlab.metrics.knn) and feature extraction (vitlab.metrics.features)."""

from __future__ import annotations

import math

import pytest
import torch

from vitlab.metrics import extract_features, knn_accuracy, knn_classify


def _angle(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_two_separated_clusters_are_classified_perfectly():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    train_y = torch.arange(40) % 2
    test_y = torch.arange(20) % 2
    train = centers[train_y] + 0.3 * torch.randn(40, 2, generator=g)
    test = centers[test_y] + 0.3 * torch.randn(20, 2, generator=g)
    res = knn_accuracy(train, train_y, test, test_y, num_classes=2, k=5)
    assert res == {"knn_top1": 1.0}                                   # 2 classes: no top-5


def test_exp_weighting_overrules_the_plain_majority_as_computed_by_hand():
    # the test point at 0 deg; one class-0 neighbour at 0 deg (cos 1), two class-1 neighbours at +-60 deg (cos 0.5)
    train = torch.tensor([_angle(0), _angle(60), _angle(-60)]) * torch.tensor([[2.0], [3.0], [0.5]])  # norms ignored
    train_y = torch.tensor([0, 1, 1])
    test = torch.tensor([_angle(0)])
    t = 0.07
    w0, w1 = math.exp(1.0 / t), 2 * math.exp(0.5 / t)                 # the summed vote weights exp(sim / T)
    probs = knn_classify(train, train_y, test, num_classes=2, k=3, temperature=t)
    assert probs[0].tolist() == pytest.approx([w0 / (w0 + w1), w1 / (w0 + w1)], rel=1e-5)
    assert probs.argmax(1).item() == 0                                # weighted: the closer class wins
    # a very high temperature weights every neighbour ~equally: the 2-vs-1 majority wins
    assert knn_classify(train, train_y, test, num_classes=2, k=3, temperature=100.0).argmax(1).item() == 1
    # and k=1 is the nearest neighbour
    assert knn_classify(train, train_y, test, num_classes=2, k=1).argmax(1).item() == 0


def test_chunking_gives_the_same_answer():
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(50, 8, generator=g), torch.randn(23, 8, generator=g)
    train_y = torch.randint(0, 6, (50,), generator=g)
    whole = knn_classify(train, train_y, test, 6, k=7, chunk_size=10_000)
    chunked = knn_classify(train, train_y, test, 6, k=7, chunk_size=4)
    assert chunked.shape == (23, 6)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(whole.sum(1), torch.ones(23))          # probabilities


def test_k_larger_than_the_train_set_is_clipped():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])
    train_y = torch.tensor([0, 1, 0])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    big = knn_classify(train, train_y, test, 2, k=20)
    torch.testing.assert_close(big, knn_classify(train, train_y, test, 2, k=3))
    assert knn_accuracy(train, train_y, test, torch.tensor([0, 1]), 2, k=20)["knn_top1"] == 1.0


def test_top5_is_reported_from_five_classes_on():
    g = torch.Generator().manual_seed(2)
    train, test = torch.randn(30, 4, generator=g), torch.randn(10, 4, generator=g)
    train_y, test_y = torch.arange(30) % 6, torch.arange(10) % 6
    res = knn_accuracy(train, train_y, test, test_y, 6, k=30)
    assert set(res) == {"knn_top1", "knn_top5"} and 0.0 <= res["knn_top1"] <= res["knn_top5"] <= 1.0
    assert "knn_top5" not in knn_accuracy(train, train_y % 4, test, test_y % 4, 4, k=3)


def test_labels_outside_num_classes_are_refused():
    with pytest.raises(ValueError, match="num_classes"):
        knn_classify(torch.randn(4, 2), torch.tensor([0, 1, 2, 3]), torch.randn(1, 2), num_classes=3)


def test_extract_features_runs_the_function_over_dict_batches():
    g = torch.Generator().manual_seed(3)
    images = torch.randn(10, 1, 2, 2, generator=g)
    loader = [{"image": images[i:i + 4], "label": torch.arange(i, min(i + 4, 10)), "index": torch.arange(4)}
              for i in range(0, 10, 4)]                               # batches of 4, 4, 2
    w = torch.randn(4, 3, generator=g)

    def fn(x: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled()
        return x.flatten(1) @ w

    feats, labels = extract_features(fn, loader, "cpu")
    assert feats.dtype == torch.float32 and labels.dtype == torch.long
    torch.testing.assert_close(feats, images.flatten(1) @ w)
    assert labels.tolist() == list(range(10))
    feats6, labels6 = extract_features(fn, loader, "cpu", max_samples=6)   # cuts the second batch
    torch.testing.assert_close(feats6, feats[:6])
    assert labels6.tolist() == list(range(6))
    with pytest.raises(ValueError, match="no images"):
        extract_features(fn, [], "cpu")
