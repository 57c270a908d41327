"""task=multilabel: per-class BCE against hand computation, mAP / F1 against scikit-learn on the same scores, the
Task contract, and a tiny model that learns which colours an image holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score

from tests.contracts import check_task
from vitlab.backbones import vit
from vitlab.data.base import DataInfo
from vitlab.tasks import MultiLabelTask

C = 3


def _backbone():
    torch.manual_seed(0)
    return vit("Ti", patch_size=4, embed_dim=16, depth=1, num_heads=2, img_size=8, in_chans=3)


def _colours(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n images, each holding any subset of {red, green, blue} as a lit quarter: (n, 3, 8, 8), (n, 3) multi-hot."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, C, generator=g) < 0.5).long()
    x = torch.zeros(n, 3, 8, 8)
    for c in range(C):
        x[:, c, (c // 2) * 4:(c // 2) * 4 + 4, (c % 2) * 4:(c % 2) * 4 + 4] = y[:, c, None, None].float()
    return x + 0.05 * torch.randn(x.shape, generator=g), y


def test_loss_is_the_mean_binary_cross_entropy_by_hand():
    task = MultiLabelTask(4, C)
    logits = torch.tensor([[2.0, -1.0, 0.0], [0.5, 0.5, -3.0]])
    y = torch.tensor([[1, 0, 1], [0, 1, 0]])
    sig = torch.sigmoid(logits)
    by_hand = -(y * sig.log() + (1 - y) * (1 - sig).log()).mean()
    torch.testing.assert_close(task.loss(logits, y), by_hand)
    smooth = MultiLabelTask(4, C, label_smoothing=0.2)          # targets 0.9 / 0.1
    t = y * 0.8 + 0.1
    torch.testing.assert_close(smooth.loss(logits, y), -(t * sig.log() + (1 - t) * (1 - sig).log()).mean())


def test_single_label_data_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="multi-hot target.*data=multilabel"):
        MultiLabelTask(4, C).loss(torch.zeros(2, C), torch.tensor([0, 2]))


def test_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (40, 5))
    y[:, 4] = 0                                                   # a class without positives in the split
    y[0, 4] = 1
    scores = np.clip(y * 0.3 + rng.random((40, 5)) * 0.7, 0, 1).astype(np.float32)
    task = MultiLabelTask(4, 5, threshold=0.5)
    metrics = task.metrics()
    for part in np.array_split(np.arange(40), 3):               # several batches, as an epoch
        metrics.update(torch.from_numpy(scores[part]), torch.from_numpy(y[part]))
    got = {k: float(v) for k, v in task.compute_metrics(metrics).items()}
    assert got["map_macro"] == pytest.approx(average_precision_score(y, scores, average="macro"), abs=1e-5)
    assert got["map_micro"] == pytest.approx(average_precision_score(y, scores, average="micro"), abs=1e-5)
    pred = (scores > 0.5).astype(int)
    assert got["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-5)
    assert got["f1_micro"] == pytest.approx(f1_score(y, pred, average="micro"), abs=1e-5)


def test_the_task_keeps_the_contract_and_is_built_from_the_data_and_the_backbone():
    backbone = _backbone()
    data = DataInfo(num_classes=C, task="multilabel", img_size=8, class_names=("red", "green", "blue"))
    task = MultiLabelTask.from_data({"head_dropout": 0.1}, data, backbone)
    assert (task.num_classes, task.head.fc.in_features, task.class_names) == (C, 16, ["red", "green", "blue"])
    x, y = _colours(8)
    values = check_task(task, backbone, {"image": x, "label": y})
    assert set(values) == {"map_macro", "map_micro", "f1_macro", "f1_micro"}
    assert task.predict(backbone, x).shape == (8, C)


def test_a_tiny_model_learns_which_colours_an_image_holds():
    backbone, task = _backbone(), MultiLabelTask(16, C)
    params = list(backbone.parameters()) + list(task.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    x, y = _colours(128, seed=1)
    for step in range(60):
        loss = task.training_step(backbone, {"image": x, "label": y})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    xv, yv = _colours(64, seed=2)
    metrics = task.metrics()
    with torch.no_grad():
        out = task.evaluation_step(backbone, {"image": xv, "label": yv})
    metrics.update(out["preds"], out["target"])
    values = task.compute_metrics(metrics)
    assert float(values["map_macro"]) > 0.95 and float(values["f1_micro"]) > 0.9, values
