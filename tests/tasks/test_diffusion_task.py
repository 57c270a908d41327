"""The diffusion task: spaces, label dropout, fixed evaluation noise, seeded sampling, the builder's wiring, and the
issue's overfit test (a tiny DiT learns four images well enough that its samples reproduce them)."""

from __future__ import annotations

import copy

import pytest
import torch

from vitlab.backbones.dit import dit
from vitlab.tasks import DiffusionTask

MEAN, STD = (0.1307,), (0.3081,)


def tiny_dit(num_classes: int = 4, learn_sigma: bool = False, size: int = 8, chans: int = 1, **kw):
    return dit("S/2", embed_dim=32, depth=2, num_heads=2, img_size=size, in_chans=chans, num_classes=num_classes,
               learn_sigma=learn_sigma, **kw)


def task(**kw) -> DiffusionTask:
    kw.setdefault("num_classes", 4)
    kw.setdefault("img_size", 8)
    return DiffusionTask(mean=kw.pop("mean", MEAN), std=kw.pop("std", STD), **kw)


def normalised(x01: torch.Tensor) -> torch.Tensor:
    return (x01 - torch.tensor(MEAN).view(1, -1, 1, 1)) / torch.tensor(STD).view(1, -1, 1, 1)


def test_spaces_round_trip():
    t = task()
    x01 = torch.rand(3, 1, 8, 8)
    x = t.to_model_space(normalised(x01))
    assert x.min() >= -1 - 1e-6 and x.max() <= 1 + 1e-6
    torch.testing.assert_close(x, x01 * 2 - 1, atol=1e-6, rtol=0)
    torch.testing.assert_close(t.to_pixels(x), x01, atol=1e-6, rtol=0)


def test_options_are_checked():
    with pytest.raises(ValueError, match="learn_sigma=false or auto"):
        task(objective="flow", learn_sigma=True)
    with pytest.raises(ValueError, match="sampler=euler"):
        task(objective="flow", sampler="ddim")
    with pytest.raises(ValueError, match="sampler=ddim or ddpm"):
        task(objective="ddpm", sampler="euler")
    with pytest.raises(ValueError, match="objective must be ddpm"):
        task(objective="edm")
    with pytest.raises(ValueError, match="features=classifier.*task.classifier"):
        task(fid={"features": "classifier"})
    assert task(objective="ddpm").learn_sigma and not task(objective="flow").learn_sigma
    assert task(objective="flow").sampler == "euler" and task().sampler == "ddim"


def test_denoiser_options_follow_data_and_objective():
    opts = DiffusionTask.denoiser_options(28, 1, 10, objective="ddpm", learn_sigma="auto")
    assert opts == {"img_size": 28, "in_chans": 1, "num_classes": 10, "learn_sigma": True}
    assert DiffusionTask.denoiser_options(32, 3, 10, objective="flow")["learn_sigma"] is False


def test_label_dropout_replaces_labels_by_the_null_label():
    seen = []

    def model(x, t, y):
        seen.append(y.clone())
        return torch.zeros_like(x)

    t = task(objective="flow", label_dropout=0.5)
    batch = {"image": torch.zeros(4000, 1, 8, 8), "label": torch.randint(0, 4, (4000,))}
    torch.manual_seed(0)
    t.training_step(model, batch)
    y = seen[0]
    dropped = (y == t.null_label)
    assert t.null_label == 4 and 0.45 < dropped.float().mean() < 0.55
    assert torch.equal(y[~dropped], batch["label"][~dropped])        # the others keep their label
    seen.clear()
    task(objective="flow", label_dropout=0.0).training_step(model, batch)
    assert torch.equal(seen[0], batch["label"])


def test_soft_labels_are_refused():
    t = task(objective="flow")
    with pytest.raises(ValueError, match="mixup_alpha=0"):
        t.training_step(tiny_dit(), {"image": torch.zeros(2, 1, 8, 8), "label": torch.rand(2, 4)})


def test_evaluation_loss_uses_fixed_noise_per_epoch():
    torch.manual_seed(0)
    model = tiny_dit(learn_sigma=True)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)       # a non-zero prediction
    t = task(eval_samples=0)
    batch = {"image": normalised(torch.rand(6, 1, 8, 8)), "label": torch.arange(6) % 4}
    with torch.no_grad():
        first = [t.evaluation_step(model, batch)["loss"] for _ in range(2)]
        t.compute_metrics(t.metrics())                                   # the epoch ends: the noise repeats
        again = [t.evaluation_step(model, batch)["loss"] for _ in range(2)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], first[1])                           # batch positions get their own noise


def test_seeded_generation_is_deterministic_and_per_sample():
    torch.manual_seed(0)
    model = tiny_dit(learn_sigma=True).eval()
    for p in model.parameters():                                        # a non-trivial model
        torch.nn.init.normal_(p, std=0.05)
    for objective, sampler in (("ddpm", "ddim"), ("ddpm", "ddpm"), ("flow", "euler")):
        t = task(objective=objective, sampler=sampler, sample_steps=4, learn_sigma=objective == "ddpm")
        model_ = model if objective == "ddpm" else tiny_dit().eval()
        labels = torch.tensor([0, 1, 2, 3])
        a = t.generate(model_, labels, seeds=[10, 11, 12, 13])
        b = t.generate(model_, labels, seeds=[10, 11, 12, 13])
        assert a.shape == (4, 1, 8, 8) and a.min() >= 0 and a.max() <= 1
        assert torch.equal(a, b), sampler
        c = t.generate(model_, labels, seeds=[20, 21, 22, 23])
        assert not torch.equal(a, c), sampler
        if sampler != "ddpm":                          # deterministic samplers: sample i depends on seed i only
            alone = t.generate(model_, labels[2:3], seeds=[12])
            torch.testing.assert_close(alone[0], a[2], atol=1e-5, rtol=0)


def test_ema_copy_shares_the_judge():
    calls = []

    def factory():
        calls.append(1)
        return lambda images: torch.zeros(images.shape[0], 4)

    t = task(classifier="judge.ckpt", classifier_factory=factory)
    assert t.monitor == "val/sample_acc" and t.monitor_mode == "max"
    t2 = copy.deepcopy(t)
    assert t2._classifier is t._classifier
    assert "judge" not in " ".join(t.state_dict())


def test_evaluation_generates_balanced_samples_and_scores_them():
    """The judge says "class 1" for every image: only class 1's samples are right."""
    def factory():
        def judge(images):
            logits = torch.zeros(images.shape[0], 4)
            logits[:, 1] = 1.0
            return logits
        return judge

    t = task(objective="flow", sample_steps=2, eval_samples=10, classifier="judge.ckpt", classifier_factory=factory)
    metric = t.metrics()
    model = tiny_dit().eval()
    batch = {"image": normalised(torch.rand(6, 1, 8, 8)), "label": torch.zeros(6, dtype=torch.long)}
    with torch.no_grad():
        for _ in range(3):                                               # 6 + 4 + 0 samples
            out = t.evaluation_step(model, batch)
            if "preds" in out:
                metric.update(out["preds"], out["target"])
    values = t.compute_metrics(metric)
    assert int(values["samples"]) == 10
    # labels 0, 1, 2, 3, 0, 1, ...: class 1 has 3 samples, all right; the others none
    assert float(values["sample_acc_1"]) == 1.0 and float(values["sample_acc_0"]) == 0.0
    assert abs(float(values["sample_acc"]) - 0.3) < 1e-6


@pytest.mark.parametrize("objective, schedule, steps, lr", [
    ("flow", "linear", 250, 2e-3),
    pytest.param("ddpm", "cosine", 400, 5e-3, marks=pytest.mark.slow),     # eps-prediction learns more slowly
])
def test_tiny_model_overfits_four_images(objective, schedule, steps, lr):
    """The issue's overfit test: four 8x8 images, one per class; after training, each class's sample (from fresh
    noise, guidance 1) is its own image, far closer to it than to the other three."""
    torch.manual_seed(0)
    images01 = torch.zeros(4, 1, 8, 8)
    images01[0, :, :, 1:3] = 1            # a vertical bar
    images01[1, :, 5:7, :] = 1            # a horizontal bar
    images01[2, :, 2:6, 2:6] = 1          # a square
    images01[3] = torch.eye(8)            # a diagonal
    labels = torch.arange(4)
    t = task(objective=objective, schedule=schedule, label_dropout=0.0, sample_steps=25, guidance=1.0)
    model = tiny_dit(learn_sigma=t.learn_sigma)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    batch = {"image": normalised(images01.repeat(8, 1, 1, 1)), "label": labels.repeat(8)}
    losses = []
    for step in range(steps):
        loss = t.training_step(model, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.35 * sum(losses[:20]) / 20
    model.eval()
    samples = t.generate(model, labels, seeds=[100, 101, 102, 103])          # (4, 1, 8, 8) in [0, 1]
    dist = ((samples[:, None] - images01[None]) ** 2).mean(dim=(2, 3, 4))    # (4 samples, 4 images)
    assert torch.equal(dist.argmin(dim=1), labels), dist
    assert dist.diagonal().max() < 0.05, dist


def test_no_samples_are_drawn_when_nothing_scores_them():
    t = task(objective="flow", eval_samples=100)                       # no classifier, no FID
    out = t.evaluation_step(tiny_dit(), {"image": normalised(torch.rand(4, 1, 8, 8)), "label": torch.arange(4)})
    assert "preds" not in out and "loss" in out


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_a_bf16_model_trains_and_samples(objective):
    """bf16-true training: the objectives keep float32 schedules; the DiT runs in its weights' dtype."""
    t = task(objective=objective, sample_steps=2)
    model = tiny_dit(learn_sigma=t.learn_sigma).to(torch.bfloat16)
    batch = {"image": normalised(torch.rand(4, 1, 8, 8)).to(torch.bfloat16), "label": torch.arange(4)}
    loss = t.training_step(model, batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and model.final_layer.linear.weight.grad is not None
    samples = t.generate(model, torch.arange(4), seeds=[0, 1, 2, 3])
    assert samples.dtype == torch.float32 and samples.shape == (4, 1, 8, 8)
