"""ClassificationHead / ClassificationTask / soft_target_cross_entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitlab.backbones import vit
from vitlab.tasks import ClassificationHead, ClassificationTask, soft_target_cross_entropy

B, C, D = 6, 10, 32


@pytest.fixture
def logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, C, generator=g) * 3


@pytest.fixture
def labels() -> torch.Tensor:
    return torch.tensor([0, 3, 9, 3, 5, 1])


def smoothed(labels: torch.Tensor, eps: float, num_classes: int = C) -> torch.Tensor:
    return F.one_hot(labels, num_classes).float() * (1 - eps) + eps / num_classes


# -------------------------------------------------------------------- loss ---

@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_hard_label_loss_is_cross_entropy_with_label_smoothing(logits, labels, eps):
    task = ClassificationTask(D, C, label_smoothing=eps)
    torch.testing.assert_close(task.loss(logits, labels), F.cross_entropy(logits, labels, label_smoothing=eps))


def test_label_smoothing_changes_the_loss(logits, labels):
    """Guard: the smoothing value is actually used (the cases above would pass vacuously otherwise)."""
    a = ClassificationTask(D, C, label_smoothing=0.0).loss(logits, labels)
    b = ClassificationTask(D, C, label_smoothing=0.2).loss(logits, labels)
    assert not torch.allclose(a, b)


def test_soft_ce_with_one_hot_targets_is_hard_ce(logits, labels):
    soft = soft_target_cross_entropy(logits, F.one_hot(labels, C).float())
    torch.testing.assert_close(soft, F.cross_entropy(logits, labels))


@pytest.mark.parametrize("eps", [0.1, 0.25])
def test_soft_ce_with_smoothed_targets_is_ce_with_label_smoothing(logits, labels, eps):
    soft = soft_target_cross_entropy(logits, smoothed(labels, eps))
    torch.testing.assert_close(soft, F.cross_entropy(logits, labels, label_smoothing=eps))


def test_soft_ce_with_mixed_targets_is_the_mix_of_two_ces(logits, labels):
    """Mixup: a lam / (1 - lam) mix of two one-hots gives lam * CE(a) + (1 - lam) * CE(b)."""
    lam = 0.7
    other = labels.flip(0)
    target = lam * F.one_hot(labels, C).float() + (1 - lam) * F.one_hot(other, C).float()
    expected = lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, other)
    torch.testing.assert_close(soft_target_cross_entropy(logits, target), expected)


def test_soft_ce_gradient_is_softmax_minus_target(logits, labels):
    x = logits.clone().requires_grad_(True)
    target = smoothed(labels, 0.1)
    soft_target_cross_entropy(x, target).backward()
    torch.testing.assert_close(x.grad, (logits.softmax(-1) - target) / B)


def test_soft_ce_computes_in_float32_for_low_precision_logits(logits, labels):
    target = smoothed(labels, 0.1)
    out = soft_target_cross_entropy(logits.bfloat16(), target)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, soft_target_cross_entropy(logits.bfloat16().float(), target))


def test_task_loss_uses_soft_targets_as_given(logits, labels):
    """(B, C) targets go to soft CE; the task's own smoothing is not applied a second time."""
    task = ClassificationTask(D, C, label_smoothing=0.3)
    torch.testing.assert_close(task.loss(logits, F.one_hot(labels, C).float()), F.cross_entropy(logits, labels))
    torch.testing.assert_close(task.loss(logits, smoothed(labels, 0.1)),
                               F.cross_entropy(logits, labels, label_smoothing=0.1))


def test_hard_loss_is_float32_for_bf16_logits(logits, labels):
    out = ClassificationTask(D, C).loss(logits.bfloat16(), labels)
    assert out.dtype == torch.float32


# ----------------------------------------------------------------- metrics ---

def test_metrics_keys_top1_top5():
    assert set(ClassificationTask(D, 10).metrics().keys()) == {"top1", "top5"}


@pytest.mark.parametrize("num_classes", [2, 3, 4])
def test_top5_dropped_with_fewer_than_five_classes(num_classes):
    m = ClassificationTask(D, num_classes).metrics()
    assert set(m.keys()) == {"top1"}
    # and it still works
    m.update(torch.eye(num_classes), torch.arange(num_classes))
    assert m.compute()["top1"].item() == pytest.approx(1.0)


def test_custom_top_k():
    assert set(ClassificationTask(D, 100, top_k=(1, 3, 10)).metrics().keys()) == {"top1", "top3", "top10"}


def test_metric_values_on_a_constructed_example():
    """Four samples over 10 classes whose logits rank class c at position 9 - c (class 9 first).

    label 9 -> rank 1 (top1 and top5 hit); label 6 -> rank 4 (top5 hit); label 5 -> rank 5 (top5 hit);
    label 0 -> rank 10 (miss). So top1 = 1/4 and top5 = 3/4.
    """
    logits = torch.arange(10, dtype=torch.float32).repeat(4, 1)
    target = torch.tensor([9, 6, 5, 0])
    m = ClassificationTask(D, 10).metrics()
    m.update(logits, target)
    out = m.compute()
    assert out["top1"].item() == pytest.approx(0.25)
    assert out["top5"].item() == pytest.approx(0.75)


def test_metric_values_accumulate_over_batches_like_topk():
    g = torch.Generator().manual_seed(1)
    m = ClassificationTask(D, 10).metrics()
    hits1 = hits5 = n = 0
    for _ in range(3):
        x = torch.randn(16, 10, generator=g)
        y = torch.randint(0, 10, (16,), generator=g)
        m.update(x, y)
        top = x.topk(5, dim=1).indices
        hits1 += (top[:, 0] == y).sum().item()
        hits5 += (top == y[:, None]).any(1).sum().item()
        n += 16
    out = m.compute()
    assert out["top1"].item() == pytest.approx(hits1 / n)
    assert out["top5"].item() == pytest.approx(hits5 / n)


def test_metrics_returns_fresh_collections():
    task = ClassificationTask(D, 10)
    a, b = task.metrics(), task.metrics()
    a.update(torch.eye(10), torch.arange(10))
    b.update(torch.eye(10), torch.arange(10).roll(1))
    assert a.compute()["top1"].item() == pytest.approx(1.0)
    assert b.compute()["top1"].item() == pytest.approx(0.0)


def test_metrics_without_argument_validation_give_the_same_values():
    """validate_args=False (the train split) skips torchmetrics' input checks, never changes the numbers."""
    task = ClassificationTask(D, 10)
    checked, unchecked = task.metrics(), task.metrics(validate_args=False)
    assert all(m.validate_args for m in checked.values())
    assert not any(m.validate_args for m in unchecked.values())
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        x, y = torch.randn(8, 10, generator=g), torch.randint(0, 10, (8,), generator=g)
        checked.update(x, y)
        unchecked.update(x, y)
    for k, v in checked.compute().items():
        assert unchecked.compute()[k].item() == pytest.approx(v.item())


def test_metrics_validation_is_what_catches_bad_integer_predictions():
    """The check that validate_args turns off (a torch.unique over the values: a host sync on a GPU)."""
    target = torch.tensor([0, 1, 2, 3, 0])
    bad = torch.tensor([0, 1, 2, 3, 7])                              # 5 distinct predicted values for 4 classes
    with pytest.raises(RuntimeError, match="unique values"):
        ClassificationTask(D, 4, top_k=(1,)).metrics()["top1"].update(bad, target)
    m = ClassificationTask(D, 4, top_k=(1,)).metrics(validate_args=False)["top1"]
    m.update(torch.tensor([0, 1, 2, 3, 1]), target)                  # not checked: the train split's labels are valid
    assert m.compute().item() == pytest.approx(0.8)


# ----------------------------------------------------------------- feature ---

@pytest.fixture
def features() -> dict:
    g = torch.Generator().manual_seed(2)
    return {"cls": torch.randn(B, D, generator=g), "pooled": torch.randn(B, D, generator=g),
            "patch": torch.randn(B, 5, D, generator=g)}


@pytest.mark.parametrize("feature,pick", [
    ("cls", lambda f: f["cls"]),
    ("pooled", lambda f: f["pooled"]),
    ("avg", lambda f: f["patch"].mean(dim=1)),
])
def test_head_reads_the_named_feature(features, feature, pick):
    head = ClassificationHead(D, C, feature=feature)
    out = head(features)
    assert out.shape == (B, C)
    torch.testing.assert_close(out, F.linear(pick(features), head.fc.weight, head.fc.bias))


def test_task_forward_goes_through_its_head(features):
    task = ClassificationTask(D, C, feature="cls")
    torch.testing.assert_close(task(features), task.head(features))
    torch.testing.assert_close(task(features), F.linear(features["cls"], task.head.fc.weight, task.head.fc.bias))


def test_default_feature_is_pooled(features):
    task = ClassificationTask(D, C)
    torch.testing.assert_close(task(features), F.linear(features["pooled"], task.head.fc.weight, task.head.fc.bias))


def test_head_on_a_real_backbone_with_average_pooling():
    torch.manual_seed(0)
    backbone = vit("Ti", patch_size=8, embed_dim=D, depth=1, num_heads=2, img_size=16, global_pool="avg",
                   class_token=False).eval()
    feats = backbone(torch.randn(2, 3, 16, 16))
    pooled = ClassificationHead(D, C, feature="pooled")
    avg = ClassificationHead(D, C, feature="avg")
    avg.load_state_dict(pooled.state_dict())
    torch.testing.assert_close(pooled(feats), F.linear(feats["pooled"], pooled.fc.weight, pooled.fc.bias))
    torch.testing.assert_close(avg(feats), F.linear(feats["patch"].mean(1), avg.fc.weight, avg.fc.bias))


def test_head_starts_with_zero_bias_and_small_weights():
    head = ClassificationHead(192, 1000)
    assert torch.count_nonzero(head.fc.bias) == 0
    assert head.fc.weight.std().item() < 0.05


def test_head_dropout_only_in_training(features):
    torch.manual_seed(0)
    task = ClassificationTask(D, C, head_dropout=0.5)
    task.train()
    assert not torch.allclose(task(features), task(features))
    task.eval()
    torch.testing.assert_close(task(features), task(features))


# -------------------------------------------------------------- bce loss ---

def _bce_by_hand(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over batch and classes of -(t log sigmoid(x) + (1 - t) log(1 - sigmoid(x)))."""
    p = torch.sigmoid(logits.double())
    t = target.double()
    return (-(t * p.log() + (1 - t) * (1 - p).log())).mean().float()


def test_bce_hard_labels_against_a_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    labels = torch.tensor([0, 2])
    task = ClassificationTask(D, 3, loss="bce", label_smoothing=0.0)
    target = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(task.loss(logits, labels), _bce_by_hand(logits, target))
    # one value written out: mean of softplus(-x) for positives and softplus(x) for negatives
    sp = F.softplus
    by_formula = (sp(-logits[0, 0]) + sp(logits[0, 1]) + sp(logits[0, 2])
                  + sp(logits[1, 0]) + sp(logits[1, 1]) + sp(-logits[1, 2])) / 6
    torch.testing.assert_close(task.loss(logits, labels), by_formula)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_bce_smooths_hard_labels_like_timm(logits, labels, eps):
    """off = eps / C, on = 1 - eps + eps / C (timm's BinaryCrossEntropy)."""
    task = ClassificationTask(D, C, loss="bce", label_smoothing=eps)
    torch.testing.assert_close(task.loss(logits, labels), _bce_by_hand(logits, smoothed(labels, eps)))


def test_bce_soft_targets_used_as_given(logits, labels):
    """(B, C) targets are not smoothed again: the task's smoothing is for hard labels only."""
    target = 0.7 * F.one_hot(labels, C).float() + 0.3 * F.one_hot(labels.flip(0), C).float()
    task = ClassificationTask(D, C, loss="bce", label_smoothing=0.3)
    torch.testing.assert_close(task.loss(logits, target), _bce_by_hand(logits, target))
    torch.testing.assert_close(task.loss(logits, target), F.binary_cross_entropy_with_logits(logits, target))


def test_bce_target_threshold_binarises_mixed_targets(logits, labels):
    """DeiT III: every class with a positive weight in a mixup / cutmix target counts as 1."""
    target = 0.7 * F.one_hot(labels, C).float() + 0.3 * F.one_hot(labels.flip(0), C).float()
    task = ClassificationTask(D, C, loss="bce", bce_target_threshold=0.0)
    binary = (target > 0).float()
    assert (binary.sum(1) == 2).all()
    torch.testing.assert_close(task.loss(logits, target), _bce_by_hand(logits, binary))


def test_bce_differs_from_ce_and_ce_is_unchanged(logits, labels):
    bce = ClassificationTask(D, C, loss="bce", label_smoothing=0.1).loss(logits, labels)
    ce = ClassificationTask(D, C, loss="ce", label_smoothing=0.1).loss(logits, labels)
    assert not torch.allclose(bce, ce)
    torch.testing.assert_close(ce, F.cross_entropy(logits, labels, label_smoothing=0.1))
    torch.testing.assert_close(ce, ClassificationTask(D, C, label_smoothing=0.1).loss(logits, labels))


def test_bce_is_float32_for_bf16_logits_and_has_gradients(logits, labels):
    x = logits.bfloat16().requires_grad_(True)
    out = ClassificationTask(D, C, loss="bce").loss(x, labels)
    assert out.dtype == torch.float32
    out.backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()


def test_bce_adds_nothing_to_the_state_dict():
    assert ClassificationTask(D, C, loss="bce").state_dict().keys() == ClassificationTask(D, C).state_dict().keys()


@pytest.mark.parametrize("kw,words", [
    (dict(loss="focal"), ["'focal'", "ce", "bce"]),
    (dict(loss="bce", bce_target_threshold=1.5), ["bce_target_threshold"]),
    (dict(loss="bce", label_smoothing=0.5, bce_target_threshold=0.0), ["label_smoothing", "bce_target_threshold"]),
])
def test_bad_loss_options(kw, words):
    with pytest.raises(ValueError) as info:
        ClassificationTask(D, C, **kw)
    assert all(w in str(info.value) for w in words)
