"""The linear probe on frozen features (vitlab.metrics.linear_probe): accuracy, lr choice on a holdout, seeding."""

from __future__ import annotations

import math

import pytest
import torch

from vitlab.metrics import DEFAULT_LRS, linear_probe
from vitlab.metrics.linear_probe import _train_heads


def _blobs(n: int, num_classes: int, dim: int, seed: int, noise: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around fixed class centres (linearly separable for small noise), with an offset and scale
    the standardisation has to undo."""
    g = torch.Generator().manual_seed(100)                            # the same centres for train and test
    centres = 3.0 * torch.randn(num_classes, dim, generator=g)
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = centres[y] + noise * torch.randn(n, dim, generator=g)
    return 50.0 + 10.0 * x, y


def test_linearly_separable_features_are_learned():
    x, y = _blobs(400, 5, 16, seed=0)
    xt, yt = _blobs(200, 5, 16, seed=1)
    res = linear_probe(x, y, xt, yt, num_classes=5, epochs=20, batch_size=64)
    assert res["linear_top1"] > 0.95
    assert res["linear_top5"] == pytest.approx(1.0)
    assert res["linear_holdout_top1"] > 0.95
    assert res["linear_lr"] in DEFAULT_LRS


def test_random_labels_give_about_chance():
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(400, 16, generator=g), torch.randn(800, 16, generator=g)
    y, yt = torch.randint(0, 4, (400,), generator=g), torch.randint(0, 4, (800,), generator=g)
    res = linear_probe(x, y, xt, yt, num_classes=4, epochs=10, batch_size=64)
    assert abs(res["linear_top1"] - 0.25) < 0.07                      # chance; 3 sigma ~ 0.046 for 800 samples
    assert "linear_top5" not in res                                   # fewer than 5 classes


def test_the_lr_is_chosen_on_the_holdout_never_on_the_test_labels():
    x, y = _blobs(300, 4, 8, seed=0, noise=2.0)                       # overlapping: the lrs do differ
    xt, yt = _blobs(200, 4, 8, seed=1, noise=2.0)
    kw = {"num_classes": 4, "epochs": 5, "batch_size": 32, "lrs": (1e-4, 1e-2, 1.0)}
    real = linear_probe(x, y, xt, yt, **kw)
    shuffled = linear_probe(x, y, xt, yt[torch.randperm(len(yt), generator=torch.Generator().manual_seed(0))], **kw)
    # the choice and the held-out score do not depend on the test labels; only the reported accuracy does
    assert shuffled["linear_lr"] == real["linear_lr"]
    assert shuffled["linear_holdout_top1"] == real["linear_holdout_top1"]
    assert shuffled["linear_top1"] < real["linear_top1"] - 0.2


def test_deterministic_with_the_seed():
    x, y = _blobs(200, 3, 8, seed=0, noise=2.0)
    xt, yt = _blobs(100, 3, 8, seed=1, noise=2.0)
    kw = {"num_classes": 3, "epochs": 5, "batch_size": 32, "lrs": (1e-3, 0.1)}
    assert linear_probe(x, y, xt, yt, seed=7, **kw) == linear_probe(x, y, xt, yt, seed=7, **kw)


def test_the_grid_trains_each_head_as_if_alone():
    # one batched module for all lrs must give each head exactly the weights of a separate run with its lr
    x, y = _blobs(100, 3, 6, seed=0, noise=2.0)
    x = (x - x.mean(0)) / x.std(0)
    grid = _train_heads(x, y, 3, [0.01, 0.5], 3, 16, 1e-4, torch.Generator().manual_seed(0))
    alone = _train_heads(x, y, 3, [0.5], 3, 16, 1e-4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(grid.weight[1], alone.weight[0])
    torch.testing.assert_close(grid.bias[1], alone.bias[0])
    assert not torch.allclose(grid.weight[0], grid.weight[1])


def test_holdout_settings():
    x, y = _blobs(60, 3, 4, seed=0)
    with pytest.raises(ValueError, match="holdout_fraction"):
        linear_probe(x, y, x, y, 3, epochs=1, holdout_fraction=0.0)   # several lrs need a holdout to choose
    res = linear_probe(x, y, x, y, 3, epochs=2, lrs=[0.1], holdout_fraction=0.0)
    assert res["linear_lr"] == 0.1 and math.isnan(res["linear_holdout_top1"])
