"""Recipe.scaled_lr / describe_lr and Supervised.training_step / evaluation_step."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from vitlab.tasks.base import Task
from vitlab.backbones import vit
from vitlab.tasks import ClassificationTask, soft_target_cross_entropy
from vitlab.optim import build_optimizer
from vitlab.recipes import Recipe, Supervised

C = 10


def tiny_recipe(**kwargs) -> Supervised:
    torch.manual_seed(0)
    backbone = vit("Ti", patch_size=4, embed_dim=32, depth=2, num_heads=2, img_size=16, in_chans=1)
    return Supervised(backbone, ClassificationTask(32, C, label_smoothing=kwargs.pop("label_smoothing", 0.0)),
                      **kwargs)


@pytest.fixture
def recipe() -> Supervised:
    return tiny_recipe().eval()


@pytest.fixture
def batch() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(8, 1, 16, 16, generator=g), "label": torch.randint(0, C, (8,), generator=g)}


# ---------------------------------------------------------- lr scaling ---

class _Dummy(torch.nn.Module):
    pass


class _DummyTask(Task):
    kind = "dummy"
    monitor, monitor_mode, lr_base_batch = "val/top1", "max", 256


def base(rule: str, base_batch: int = 256) -> Recipe:
    return Recipe(_Dummy(), _DummyTask(), lr_scaling=rule, lr_base_batch=base_batch)


@pytest.mark.parametrize("gb", [64, 256, 1024, 4096])
def test_linear_scaling(gb):
    assert base("linear").scaled_lr(5e-4, gb) == pytest.approx(5e-4 * gb / 256)


@pytest.mark.parametrize("gb", [64, 256, 1024, 4096])
def test_sqrt_scaling(gb):
    assert base("sqrt").scaled_lr(5e-4, gb) == pytest.approx(5e-4 * math.sqrt(gb / 256))


@pytest.mark.parametrize("gb", [64, 4096])
def test_no_scaling(gb):
    assert base("none").scaled_lr(5e-4, gb) == 5e-4


def test_lr_base_batch_is_honoured():
    assert base("linear", 512).scaled_lr(1e-3, 1024) == pytest.approx(2e-3)
    assert base("sqrt", 64).scaled_lr(1e-3, 256) == pytest.approx(2e-3)


def test_linear_is_the_default_rule():
    r = Recipe(_Dummy(), _DummyTask())
    assert r.scaled_lr(1e-3, 512) == pytest.approx(2e-3)


def test_unknown_scaling_rule_names_the_choices():
    with pytest.raises(ValueError) as e:
        base("cubic")
    msg = str(e.value)
    assert "'cubic'" in msg and all(c in msg for c in ("linear", "sqrt", "none"))


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?", text)]


@pytest.mark.parametrize("rule", ["linear", "sqrt"])
def test_describe_lr_shows_the_rule_its_inputs_and_the_result(rule):
    r = base(rule)
    text = r.describe_lr(5e-4, 1024)
    assert rule in text
    nums = _numbers(text)
    assert 5e-4 in nums and 1024 in nums and 256 in nums
    assert any(x == pytest.approx(r.scaled_lr(5e-4, 1024), rel=1e-3) for x in nums)
    if rule == "sqrt":
        assert "sqrt" in text


def test_describe_lr_without_scaling():
    text = base("none").describe_lr(5e-4, 1024)
    assert "no scaling" in text
    assert _numbers(text) == [pytest.approx(5e-4)]


def test_base_recipe_steps_are_abstract(batch):
    r = base("none")
    with pytest.raises(NotImplementedError):
        r.training_step(batch)
    with pytest.raises(NotImplementedError):
        r.evaluation_step(batch)


# ------------------------------------------------------------ steps ---

def test_forward_is_task_of_backbone(recipe, batch):
    torch.testing.assert_close(recipe(batch["image"]), recipe.task(recipe.backbone(batch["image"])))


def test_training_step_with_hard_labels(recipe, batch):
    out = recipe.training_step(batch)
    logits = recipe(batch["image"])
    assert out["preds"].shape == (8, C)
    torch.testing.assert_close(out["preds"], logits)
    assert not out["preds"].requires_grad, "logits are returned detached (metrics only)"
    assert out["loss"].ndim == 0 and out["loss"].requires_grad
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits, batch["label"]))
    assert torch.equal(out["target"], batch["label"])


def test_training_step_applies_label_smoothing(batch):
    r = tiny_recipe(label_smoothing=0.2).eval()
    out = r.training_step(batch)
    torch.testing.assert_close(out["loss"], F.cross_entropy(r(batch["image"]), batch["label"], label_smoothing=0.2))


def test_training_step_with_soft_labels(recipe, batch):
    g = torch.Generator().manual_seed(3)
    soft = torch.softmax(torch.randn(8, C, generator=g), dim=-1)
    out = recipe.training_step({"image": batch["image"], "label": soft})
    assert "target" not in out, "soft targets have no class index for top-1"
    logits = recipe(batch["image"])
    torch.testing.assert_close(out["loss"], soft_target_cross_entropy(logits, soft))
    torch.testing.assert_close(out["loss"], -(soft * logits.log_softmax(-1)).sum(-1).mean())


def test_training_step_loss_backpropagates_to_backbone_and_head(recipe, batch):
    recipe.train()
    recipe.training_step(batch)["loss"].backward()
    for name in ("backbone.patch_embed.proj.weight", "backbone.blocks.0.attn.qkv.weight", "task.head.fc.weight"):
        p = dict(recipe.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_evaluation_step_with_hard_labels(recipe, batch):
    with torch.no_grad():
        out = recipe.evaluation_step(batch)
        logits = recipe(batch["image"])
    assert set(out) >= {"loss", "preds", "target"}
    torch.testing.assert_close(out["preds"], logits)
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits, batch["label"]))
    assert torch.equal(out["target"], batch["label"])


def test_evaluation_step_with_soft_labels(recipe, batch):
    soft = F.one_hot(batch["label"], C).float() * 0.9 + 0.01
    with torch.no_grad():
        out = recipe.evaluation_step({"image": batch["image"], "label": soft})
        logits = recipe(batch["image"])
    torch.testing.assert_close(out["loss"], soft_target_cross_entropy(logits, soft))
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits, batch["label"], label_smoothing=0.1))


def test_recipe_registers_backbone_and_task_as_submodules():
    r = tiny_recipe()
    names = dict(r.named_children())
    assert names["backbone"] is r.backbone and names["task"] is r.task
    n_params = sum(p.numel() for p in r.parameters())
    assert n_params == sum(p.numel() for p in r.backbone.parameters()) + sum(p.numel() for p in r.task.parameters())


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_a_few_steps_overfit_a_fixed_batch(batch, soft):
    """Sanity: AdamW on one fixed batch drives the training loss down by a wide margin."""
    r = tiny_recipe().train()
    if soft:
        batch = {"image": batch["image"], "label": F.one_hot(batch["label"], C).float() * 0.9 + 0.01}
    opt = build_optimizer(r, "adamw", lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(25):
        loss = r.training_step(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    r.eval()
    with torch.no_grad():
        out = r.evaluation_step(batch)
    target = batch["label"] if not soft else batch["label"].argmax(-1)
    assert (out["preds"].argmax(-1) == target).float().mean() >= 0.75
