"""GenerativeMetrics (vitlab.metrics.generative): sample accuracy under a classifier, FID / KID via torchmetrics."""

from __future__ import annotations

import copy
import logging
import sys

import pytest
import torch
from torch import nn

from vitlab.metrics import GenerativeMetrics
from vitlab.metrics.generative import MissingInceptionWeightsError, NotEnoughSamplesError, check_fid_setup


def _images_of_class(classes: list[int], size: int = 8) -> torch.Tensor:
    """Grey images whose constant value encodes a class: class c -> (c + 0.5) / 4."""
    return ((torch.tensor(classes, dtype=torch.float) + 0.5) / 4).view(-1, 1, 1, 1).expand(-1, 1, size, size)


def _value_classifier(images: torch.Tensor) -> torch.Tensor:
    """Reads the class an image shows back from its mean (one-hot logits over 3 classes)."""
    cls = (images.mean(dim=(1, 2, 3)) * 4).floor().long()                      # (B,)
    return nn.functional.one_hot(cls, 3).float()                             # (B, 3)


def _projection(channels: int = 1, size: int = 8, dim: int = 8, seed: int = 0):
    w = torch.randn(channels * size * size, dim, generator=torch.Generator().manual_seed(seed)) / size
    return lambda images: images.flatten(1) @ w, w                          # (B, D)


def test_sample_accuracy_per_class_as_computed_by_hand():
    m = GenerativeMetrics(3, class_names=["cat", "dog", "bird cage"], classifier=_value_classifier)
    # asked for cat, cat, dog; drawn cat, dog, dog -> cat 1/2, dog 1/1
    m.update({"samples": _images_of_class([0, 1, 1]), "real": None}, torch.tensor([0, 0, 1]))
    # asked for cat, dog; drawn cat, cat -> cat 2/3 overall, dog 1/2 overall; bird cage never asked for
    m.update({"samples": _images_of_class([0, 0]), "real": None}, torch.tensor([0, 1]))
    out = m.compute()
    assert set(out) == {"samples", "sample_acc", "sample_acc_cat", "sample_acc_dog"}     # no bird cage (no samples)
    assert out["samples"].item() == 5
    assert out["sample_acc"].item() == pytest.approx(3 / 5)
    assert out["sample_acc_cat"].item() == pytest.approx(2 / 3)
    assert out["sample_acc_dog"].item() == pytest.approx(1 / 2)
    m.reset()
    m.update({"samples": _images_of_class([2]), "real": None}, torch.tensor([2]))
    out = m.compute()
    assert out["samples"].item() == 1 and set(out) == {"samples", "sample_acc", "sample_acc_bird_cage"}
    assert out["sample_acc_bird_cage"].item() == 1.0


def test_indices_name_classes_without_names_and_no_classifier_gives_only_the_count():
    m = GenerativeMetrics(3, classifier=_value_classifier)
    m.update({"samples": _images_of_class([2, 1]), "real": None}, torch.tensor([2, 2]))
    out = m.compute()
    assert out["sample_acc_2"].item() == 0.5 and "sample_acc_0" not in out and "sample_acc_1" not in out
    bare = GenerativeMetrics(3)
    bare.update({"samples": _images_of_class([2, 1])}, torch.tensor([2, 2]))
    assert bare.compute() == {"samples": torch.tensor(2)}


def test_classifier_fid_equals_the_hand_computed_mean_shift():
    feats, w = _projection()
    m = GenerativeMetrics(3, fid={"features": "classifier", "kid_subset_size": 32}, classifier_features=feats)
    g = torch.Generator().manual_seed(1)
    real = torch.rand(48, 1, 8, 8, generator=g) * 0.5                        # (B, 1, H, W): grey images work
    m.update({"samples": real.clone(), "real": real}, None)
    same = m.compute()
    assert abs(same["fid"].item()) < 1e-3                                    # identical sets: FID ~ 0
    # shifting every pixel by d shifts every feature by d * column sums of w and keeps the covariance, so
    # FID = ||mu_r - mu_g||^2 + Tr(S + S - 2 (S S)^1/2) = ||d * 1^T w||^2
    d = 0.3
    m.reset()
    m.update({"samples": real + d, "real": real}, None)
    shifted = m.compute()
    expected = (d * w.sum(dim=0)).square().sum().item()
    assert expected > 1.0
    assert shifted["fid"].item() == pytest.approx(expected, rel=1e-3)


def test_classifier_kid_is_near_zero_for_one_distribution_and_large_for_a_shifted_one(caplog):
    feats, _ = _projection()
    m = GenerativeMetrics(3, fid={"features": "classifier", "kid_subset_size": 1000, "kid_subsets": 20},
                          classifier_features=feats)
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(64, 1, 8, 8, generator=g), torch.rand(64, 1, 8, 8, generator=g)   # independent, same law
    # two updates per side: the states accumulate across batches
    m.update({"samples": a[:32], "real": b[:32]}, None)
    m.update({"samples": a[32:], "real": b[32:]}, None)
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        near = m.compute()
    assert "KID subset size 1000 > 64" in caplog.text                      # clamped, not a crash
    m.reset()
    m.update({"samples": a + 0.5, "real": b}, None)
    far = m.compute()
    assert far["kid_mean"].item() > 20 * abs(near["kid_mean"].item())
    assert far["fid"].item() > 20 * near["fid"].item()
    assert set(near) == {"samples", "fid", "kid_mean", "kid_std"}


def test_fid_with_fewer_than_two_samples_on_a_side_is_a_clear_error():
    feats, _ = _projection()
    m = GenerativeMetrics(3, fid={"features": "classifier"}, classifier_features=feats)
    with pytest.raises(NotEnoughSamplesError, match="before any images"):
        m.compute()
    m.update({"samples": torch.rand(1, 1, 8, 8), "real": torch.rand(5, 1, 8, 8)}, None)
    with pytest.raises(NotEnoughSamplesError, match="1 generated"):
        m.compute()


def test_frozen_extractors_stay_out_of_state_dict_and_are_shared_by_deepcopy():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    feat_net = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    owner = nn.Module()
    owner.metrics = GenerativeMetrics(3, classifier=net, fid={"features": "classifier"},
                                      classifier_features=feat_net)
    owner.metrics.update({"samples": torch.rand(4, 1, 8, 8), "real": torch.rand(4, 1, 8, 8)},
                         torch.tensor([0, 1, 2, 0]))
    assert owner.state_dict() == {}                                           # no frozen weights, no metric states
    twin = copy.deepcopy(owner)
    assert twin.metrics._classifier.fn is net and twin.metrics._features.fn is feat_net
    assert not any(p.requires_grad for p in net.parameters())


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="features=classifier needs classifier_features"):
        GenerativeMetrics(3, fid={"features": "classifier"})
    with pytest.raises(ValueError, match="choose inception or classifier"):
        GenerativeMetrics(3, fid={"features": "clip"})
    with pytest.raises(ValueError, match="unknown task.fid keys"):
        GenerativeMetrics(3, fid={"features": "classifier", "kid_size": 3}, classifier_features=lambda x: x)


def test_missing_inception_weights_name_the_url_and_the_config_key(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))        # an empty hub cache: offline machine
    with pytest.raises(MissingInceptionWeightsError) as err:
        check_fid_setup({"features": "inception"})                           # vitlab-train's check before training
    msg = str(err.value)
    assert "task.fid.inception_weights" in msg
    assert "https://github.com/toshas/torch-fidelity/releases/download/" in msg
    assert str(tmp_path / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth") in msg
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(MissingInceptionWeightsError, match="points at a missing file"):
        check_fid_setup({"features": "inception", "inception_weights": str(tmp_path / "nope.pth")})
    # building the metrics (as loading a checkpoint to sample from it does) never needs the weights; the first
    # update does
    m = GenerativeMetrics(3, fid={"features": "inception", "inception_weights": str(tmp_path / "nope.pth")})
    with pytest.raises(MissingInceptionWeightsError, match="points at a missing file"):
        m.update({"samples": torch.rand(2, 3, 8, 8), "real": None}, None)
    assert check_fid_setup({"features": "classifier"}) is None and check_fid_setup(None) is None


def test_missing_torch_fidelity_names_the_pip_command(monkeypatch, tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")                                                  # the weights are there; the package not
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)                 # `import torch_fidelity` fails
    with pytest.raises(ModuleNotFoundError, match="pip install torch-fidelity"):
        check_fid_setup({"features": "inception", "inception_weights": str(weights)})


def test_inception_weights_path_is_loaded_and_grey_images_are_fed_as_rgb(monkeypatch, tmp_path):
    pytest.importorskip("torch_fidelity", reason="optional: pip install torch-fidelity")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    loaded = []                                                               # the real weights are not here:
    monkeypatch.setattr(FeatureExtractorInceptionV3, "load_state_dict",      # record what would be loaded
                        lambda self, state_dict, *a, **k: loaded.append(state_dict))
    weights = tmp_path / "inception.pth"
    torch.save({"marker": torch.tensor(7)}, weights)
    m = GenerativeMetrics(3, fid={"features": "inception", "inception_weights": str(weights),
                                  "kid_subset_size": 2})
    grey = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    feats = m._features(grey)                                                 # built on first use
    assert len(loaded) == 1 and loaded[0]["marker"].item() == 7               # our file, not a download
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, m._features(grey.expand(-1, 3, -1, -1)))   # 1 channel == repeated to 3
    m.update({"samples": grey, "real": None}, None)
    assert int(m.fid.fake_features_num_samples) == 2 and int(m.fid.real_features_num_samples) == 0
    assert m.fid.fake_features_sum.shape == (2048,)
