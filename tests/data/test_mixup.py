"""build_mixup: timm's Mixup / CutMix behind checked options; soft targets, CutMix box area, odd batches, and the
soft targets reaching ClassificationTask.loss."""

from __future__ import annotations

import random

import numpy as np
import pytest
import timm.data
import torch
import torch.nn.functional as F

from vitlab.data.mixup import OPTIONS, MixupCutmix, build_mixup
from vitlab.tasks import ClassificationTask, soft_target_cross_entropy

C = 10


def _seed(s: int) -> None:
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _const_batch(b: int = 8, c: int = 3, h: int = 16, w: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is the constant i + 1 (so any pixel tells which image it came from); labels distinct."""
    images = (torch.arange(b, dtype=torch.float32) + 1).view(b, 1, 1, 1).expand(b, c, h, w).clone()
    return images, torch.arange(b) % C


def _smoothed(labels: torch.Tensor, eps: float) -> torch.Tensor:
    return F.one_hot(labels, C).float() * (1 - eps) + eps / C


def test_both_alphas_zero_is_none():
    assert build_mixup(C) is None
    assert build_mixup(C, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.3) is None


@pytest.mark.parametrize("kw", [dict(mixup_alpha=0.8), dict(cutmix_alpha=1.0), dict(cutmix_minmax=[0.2, 0.8]),
                                dict(mixup_alpha=0.8, cutmix_alpha=1.0)])
def test_returns_a_timm_mixup(kw):
    m = build_mixup(C, **kw)
    assert isinstance(m, MixupCutmix) and isinstance(m, timm.data.Mixup)
    assert m.num_classes == C and m.correct_lam


def test_deit_settings_reach_timm():
    m = build_mixup(1000, mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                    label_smoothing=0.1)
    assert (m.mixup_alpha, m.cutmix_alpha, m.mix_prob, m.switch_prob, m.mode, m.label_smoothing) == \
        (0.8, 1.0, 1.0, 0.5, "batch", 0.1)


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_soft_targets_shape_sum_and_device_dtype(mode, eps):
    _seed(0)
    m = build_mixup(C, mixup_alpha=0.8, cutmix_alpha=1.0, mode=mode, label_smoothing=eps)
    images, labels = _const_batch()
    out, target = m(images, labels)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert target.shape == (8, C) and target.dtype == torch.float32
    torch.testing.assert_close(target.sum(1), torch.ones(8))
    assert (target >= 0).all()


def test_label_smoothing_values_without_mixing():
    """prob=0: nothing is mixed, the targets are the smoothed one-hots: off = eps / C, on = 1 - eps + eps / C."""
    _seed(0)
    m = build_mixup(C, mixup_alpha=0.8, prob=0.0, label_smoothing=0.1)
    images, labels = _const_batch()
    before = images.clone()
    out, target = m(images, labels)
    assert torch.equal(out, before)
    torch.testing.assert_close(target, _smoothed(labels, 0.1))
    assert target.max().item() == pytest.approx(1 - 0.1 + 0.01) and target.min().item() == pytest.approx(0.01)


def test_mixup_targets_are_the_lam_mix_of_smoothed_partners():
    """switch_prob=0 picks Mixup: every pixel is lam * x_i + (1 - lam) * x_{B-1-i}, the target the same mix."""
    _seed(1)
    m = build_mixup(C, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.0, label_smoothing=0.1)
    images, labels = _const_batch()
    out, target = m(images, labels)
    a = torch.arange(8, dtype=torch.float32) + 1                            # image i's constant
    lam = ((out[:, 0, 0, 0] - a.flip(0)) / (a - a.flip(0)))[0].item()       # solve for lam from image 0
    assert 0 < lam < 1
    torch.testing.assert_close(out, (lam * a + (1 - lam) * a.flip(0)).view(8, 1, 1, 1).expand_as(out))
    expected = lam * _smoothed(labels, 0.1) + (1 - lam) * _smoothed(labels.flip(0), 0.1)
    torch.testing.assert_close(target, expected)


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_box_area_matches_lam(seed):
    """switch_prob=1 picks CutMix: pixels are x_i or x_{B-1-i}, never a blend, and the share of image i's own
    pixels equals its own target weight (timm's correct_lam: lam from the box area after clipping)."""
    _seed(seed)
    m = build_mixup(C, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=1.0, label_smoothing=0.0)
    images, labels = _const_batch(h=16, w=20)
    own = images.clone()
    out, target = m(images, labels)
    partner = own.flip(0)
    assert ((out == own) | (out == partner)).all()
    kept = (out == own)[:, 0].float().mean(dim=(1, 2))                      # (B,) share of own pixels
    own_weight = target[torch.arange(8), labels]
    torch.testing.assert_close(own_weight, kept)
    assert ((kept > 0) & (kept < 1)).all() or (kept == 1).all()             # one box per batch, same for all


def test_cutmix_minmax_box():
    _seed(0)
    m = build_mixup(C, cutmix_minmax=[0.4, 0.6], label_smoothing=0.0)
    images, labels = _const_batch(h=20, w=20)
    own = images.clone()
    out, target = m(images, labels)
    box = (out != own)[0, 0]
    rows, cols = box.any(1).sum().item(), box.any(0).sum().item()
    assert 8 <= rows < 12 and 8 <= cols < 12                                 # each side in [0.4, 0.6) x 20
    torch.testing.assert_close(target[0, labels[0]], torch.tensor(1 - rows * cols / 400))


def test_odd_batch_names_the_fix():
    m = build_mixup(C, mixup_alpha=0.8)
    images, labels = _const_batch(b=7)
    with pytest.raises(ValueError, match="even") as info:
        m(images, labels)
    assert "data.batch_size" in str(info.value) and "drop_last" in str(info.value)


@pytest.mark.parametrize("images,labels", [
    (torch.zeros(4, 3, 8), torch.zeros(4, dtype=torch.long)),                # not (B, C, H, W)
    (torch.zeros(4, 3, 8, 8), torch.zeros(4, C)),                            # soft labels in
    (torch.zeros(4, 3, 8, 8), torch.zeros(6, dtype=torch.long)),             # length mismatch
])
def test_bad_batches(images, labels):
    with pytest.raises(ValueError, match="mixup / cutmix"):
        build_mixup(C, mixup_alpha=0.8)(images, labels)


@pytest.mark.parametrize("kw,words", [
    (dict(mixup_alpha=-1), ["mixup_alpha"]),
    (dict(cutmix_alpha="big"), ["cutmix_alpha"]),
    (dict(mixup_alpha=0.8, prob=1.5), ["prob"]),
    (dict(mixup_alpha=0.8, switch_prob=-0.1), ["switch_prob"]),
    (dict(mixup_alpha=0.8, mode="pixel"), ["'pixel'", "batch", "pair", "elem"]),
    (dict(mixup_alpha=0.8, label_smoothing=1.0), ["label_smoothing"]),
    (dict(cutmix_minmax=[0.8, 0.2]), ["cutmix_minmax"]),
    (dict(cutmix_minmax=[0.5]), ["cutmix_minmax"]),
    (dict(mixup_alpha=0.8, alpha=1.0), ["unknown mixup option 'alpha'"] + list(OPTIONS)),
])
def test_bad_options(kw, words):
    with pytest.raises(ValueError) as info:
        build_mixup(C, **kw)
    assert all(w in str(info.value) for w in words)


def test_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        build_mixup(1, mixup_alpha=0.8)


def test_mixing_works_on_low_precision_images():
    _seed(0)
    images, labels = _const_batch()
    out, target = build_mixup(C, mixup_alpha=0.8, switch_prob=0.0, mode="elem")(images.bfloat16(), labels)
    assert out.dtype == torch.bfloat16 and target.dtype == torch.float32
    torch.testing.assert_close(target.sum(1), torch.ones(8))


# ------------------------------------------------ soft targets reach the loss ---

def test_mixup_targets_give_the_soft_cross_entropy():
    _seed(3)
    images, labels = _const_batch()
    _, target = build_mixup(C, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)(images, labels)
    logits = torch.randn(8, C, generator=torch.Generator().manual_seed(0)) * 3
    task = ClassificationTask(16, C, label_smoothing=0.1)
    loss = task.loss(logits, target)
    torch.testing.assert_close(loss, soft_target_cross_entropy(logits, target))
    by_hand = -(target * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(loss, by_hand)
    assert not torch.allclose(loss, F.cross_entropy(logits, labels, label_smoothing=0.1))     # not the hard CE


def test_mixup_targets_give_the_binary_cross_entropy():
    _seed(3)
    images, labels = _const_batch()
    _, target = build_mixup(C, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.0)(images, labels)
    logits = torch.randn(8, C, generator=torch.Generator().manual_seed(0)) * 3
    loss = ClassificationTask(16, C, loss="bce").loss(logits, target)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits, target))
    # DeiT III: every class present in the mixed target counts as 1
    binarised = ClassificationTask(16, C, loss="bce", bce_target_threshold=0.0).loss(logits, target)
    torch.testing.assert_close(binarised, F.binary_cross_entropy_with_logits(logits, (target > 0).float()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_mixing_on_the_training_device(mode):
    """The data module calls the mixer after the batch transfer: everything stays on the GPU."""
    _seed(0)
    images, labels = _const_batch()
    images, labels = images.cuda(), labels.cuda()
    out, target = build_mixup(C, mixup_alpha=0.8, cutmix_alpha=1.0, mode=mode)(images, labels)
    assert out.is_cuda and target.is_cuda and target.shape == (8, C)
    torch.testing.assert_close(target.sum(1), torch.ones(8, device="cuda"))


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_multi_hot_targets_mix_with_the_images_lam(mode):
    """Multi-label rows (several 1s) are blended with the same lam as the pixels, and stay unsmoothed: checked
    against the mixed images themselves (constant images per sample make each pixel lam * a + (1 - lam) * b)."""
    B = 4
    np.random.seed(3)
    m = build_mixup(C, mixup_alpha=0.8, mode=mode, label_smoothing=0.1)
    values = torch.arange(1.0, B + 1)                                    # image i is constant i + 1
    images = values.view(B, 1, 1, 1).expand(B, 3, 8, 8).clone()
    y = torch.zeros(B, C, dtype=torch.long)
    y[0, [1, 2]] = 1
    y[1, 3] = 1
    y[2, [0, 5, 7]] = 1
    mixed, target = m(images, y)
    lam = (mixed[:, 0, 0, 0] - values.flip(0)) / (values - values.flip(0))     # solved from the pixels
    expected = lam[:, None] * y.float() + (1 - lam[:, None]) * y.float().flip(0)
    torch.testing.assert_close(target, expected)
    assert target.max() <= 1 and target.min() >= 0
