"""fault.nonfinite: a NaN / inf loss or gradient stops the run with a report (step, rank(s), the batch's sample
indices, the first layer backward reached with a non-finite gradient; also nonfinite_report.json), or, with
``skip``, drops the step without touching the weights, the optimizer state or the EMA. Under DDP (2 CPU processes,
gloo, through vitlab-train) the ranks stop together, or skip together."""

from __future__ import annotations

import copy
import functools
import json
import logging

import pytest
import pytorch_lightning as pl
import torch

from tests.conftest import REPO, run_cli
from tests.lit.nonfinite_inject import InfGradientAt, PoisonSample
from vitlab.backbones import vit
from vitlab.data import Digits
from vitlab.tasks import ClassificationTask
from vitlab.lit.datamodule import VitlabDataModule
from vitlab.lit.module import REPORT_NAME, VitlabModule
from vitlab.optim import build_optimizer, cosine_schedule
from vitlab.recipes import Supervised

BATCH = 16


class NanTermAt(Supervised):
    """Adds a NaN constant to the loss on its ``bad``-th call: the loss is NaN, its gradients stay finite."""

    bad = 1

    def training_step(self, batch: dict) -> dict:
        out = super().training_step(batch)
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.bad + 1:
            out["loss"] = out["loss"] + torch.tensor(float("nan"))
        return out


def fit(tmp_path, callbacks=(), recipe_cls=Supervised, optimizer_factory=None, run=True, module_kwargs=None,
        **trainer_kwargs):
    """A 2-block ViT (width 32) on 16x16 digits, 4 steps of 16 images; returns (trainer, module, dm)."""
    pl.seed_everything(0, verbose=False)
    recipe = recipe_cls(vit("Ti", patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=16, in_chans=1),
                        ClassificationTask(32, 10))
    module = VitlabModule(recipe, optimizer_factory=optimizer_factory or functools.partial(build_optimizer, lr=1e-3),
                          scheduler_factory=functools.partial(cosine_schedule, warmup_epochs=0), config={},
                          data_info={"num_classes": 10, "in_chans": 1}, **(module_kwargs or {}))
    dm = VitlabDataModule(Digits(), img_size=16, batch_size=BATCH, augment={"policy": "none"})
    kwargs = dict(max_epochs=1, limit_train_batches=4, limit_val_batches=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                  num_sanity_val_steps=0, accelerator="cpu", devices=1, log_every_n_steps=50,
                  default_root_dir=str(tmp_path))
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=list(callbacks), **kwargs)
    if run:
        trainer.fit(module, datamodule=dm)
    return trainer, module, dm


def names(module: VitlabModule) -> list[str]:
    return [n for n, _ in module.recipe.named_parameters()]


def report_of(tmp_path) -> dict:
    return json.loads((tmp_path / REPORT_NAME).read_text())


def all_finite(module: VitlabModule) -> bool:
    return all(torch.isfinite(p).all() for p in module.parameters())


# ------------------------------------------------------------------ stop ---

@pytest.mark.parametrize("interval", [None, 1], ids=["checked_at_epoch_end", "checked_every_step"])
def test_stop_names_the_step_rank_batch_and_gradients(tmp_path, interval):
    """A NaN pixel in one sample of batch 2: its loss is NaN, backward makes every gradient NaN. With
    loss_check_interval=1 the run stops in that step, after its backward and before its update."""
    poison = PoisonSample(batches=[2], position=5)
    with pytest.raises(FloatingPointError) as e:
        fit(tmp_path, callbacks=[poison], module_kwargs={"loss_check_interval": interval})
    msg = str(e.value)
    seen = poison.seen[2]
    assert seen["step"] == 2 and len(seen["indices"]) == BATCH and seen["poisoned"] in seen["indices"]
    assert "the training loss is nan at step 2 (epoch 0)" in msg, msg
    assert "Rank with a non-finite loss: 0 (of 1)" in msg, msg
    assert f"Batch on rank 0: {BATCH} samples, indices {seen['indices']}." in msg, msg       # exactly that batch
    expected_names = names(fit(tmp_path, run=False)[1])
    # a NaN loss reaches every gradient: the report says so, and names the first layer backward reached
    assert (f"First layer with a non-finite gradient (the first backward reached): {expected_names[-1]} "
            f"(all {len(expected_names)} gradients are non-finite" in msg), msg
    assert "optim.lr" in msg and "gradient_clip" in msg and "fault.nonfinite=skip" in msg
    assert f"Report: {tmp_path / REPORT_NAME}" in msg

    report = report_of(tmp_path)
    assert report["policy"] == "stop" and report["kind"] == "loss"
    assert (report["step"], report["epoch"], report["ranks"], report["world_size"]) == (2, 0, [0], 1)
    assert report["loss"] == {"0": "nan"}                              # strict JSON: no NaN literal
    assert report["batches"] == {"0": {"samples": BATCH, "indices": seen["indices"]}}
    assert report["gradient"] == {"status": "non-finite", "first_layer": expected_names[-1],
                                  "non_finite": len(expected_names), "with_gradient": len(expected_names)}
    assert report["message"].startswith("the training loss is nan at step 2")
    if interval == 1:
        assert "by the check at step 2 (every 1 steps, loss_check_interval)" in msg
        assert report["checked_at_step"] == {"0": 2}
    else:
        assert "at the end of epoch 0" in msg and report["checked_at_step"] == {"0": 4}


def test_stop_in_the_bad_step_leaves_the_weights_finite(tmp_path):
    poison = PoisonSample(batches=[1])
    trainer, module, dm = fit(tmp_path, callbacks=[poison], run=False, module_kwargs={"loss_check_interval": 1})
    with pytest.raises(FloatingPointError, match="nan at step 1"):
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 1 and all_finite(module)            # step 1's NaN gradients never reached them


def test_the_named_layer_is_where_the_non_finite_gradient_started(tmp_path):
    """Finite loss, an inf gradient made at blocks.1.mlp.fc1's output: fc1 and everything before it in the forward
    pass get non-finite gradients, fc2 / norm / head keep finite ones. The report names fc1 (its bias: the last of
    its parameters), not the class token that comes first in module order."""
    trainer, module, dm = fit(tmp_path, callbacks=[InfGradientAt("backbone.blocks.1.mlp.fc1", batch=1)], run=False)
    with pytest.raises(FloatingPointError) as e:
        trainer.fit(module, datamodule=dm)
    msg = str(e.value)
    order = names(module)
    culprit = order.index("backbone.blocks.1.mlp.fc1.bias")
    assert "the gradients are non-finite at step 1 (epoch 0) while the training loss was finite" in msg, msg
    assert (f"First layer with a non-finite gradient (the first backward reached): backbone.blocks.1.mlp.fc1.bias "
            f"({culprit + 1} of {len(order)} gradients non-finite)" in msg), msg
    report = report_of(tmp_path)
    assert report["kind"] == "gradient" and report["ranks"] == [] and report["step"] == 1
    assert report["gradient"]["first_layer"] == "backbone.blocks.1.mlp.fc1.bias"
    assert report["gradient"]["non_finite"] == culprit + 1            # every parameter up to it in forward order
    assert report["batches"]["0"]["samples"] == BATCH and len(report["batches"]["0"]["indices"]) == BATCH


def test_a_loss_non_finite_by_itself_is_reported_with_finite_gradients(tmp_path):
    with pytest.raises(FloatingPointError) as e:
        fit(tmp_path, recipe_cls=NanTermAt)
    msg = str(e.value)
    assert "the training loss is nan at step 1 (epoch 0)" in msg and "The gradients were finite" in msg, msg
    assert report_of(tmp_path)["gradient"] == {"status": "finite", "first_layer": None}


def test_without_a_trainer_the_check_is_immediate_and_says_the_gradients_were_not_computed():
    torch.manual_seed(0)
    m = VitlabModule(Supervised(vit("Ti", patch_size=8, embed_dim=32, depth=1, num_heads=2, img_size=16, in_chans=1),
                                ClassificationTask(32, 10)))
    m.log = lambda *a, **k: None
    batch = {"image": torch.full((3, 1, 16, 16), float("nan")), "label": torch.tensor([0, 1, 2]),
             "index": torch.tensor([7, 3, 11])}
    with pytest.raises(FloatingPointError) as e:
        m.training_step(batch, 0)
    msg = str(e.value)
    assert "Batch on rank 0: 3 samples, indices [7, 3, 11]." in msg and "were not computed" in msg, msg
    no_index = {"image": batch["image"], "label": batch["label"]}
    m2 = VitlabModule(m.recipe)
    m2.log = m.log
    with pytest.raises(FloatingPointError, match=r"3 samples, indices unknown \(the batch has no 'index'\)"):
        m2.training_step(no_index, 0)


# ------------------------------------------------------------------ skip ---

class Snapshots(pl.Callback):
    """The recipe's weights, the optimizer state and the EMA weights before and after each training batch."""

    def __init__(self):
        self.before: dict[int, dict] = {}
        self.after: dict[int, dict] = {}

    @staticmethod
    def _state(trainer, pl_module) -> dict:
        return {"weights": {k: v.detach().clone() for k, v in pl_module.recipe.state_dict().items()},
                "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()["state"]),
                "ema": {k: v.detach().clone() for k, v in pl_module.ema.module.state_dict().items()}}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before[batch_idx] = self._state(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after[batch_idx] = self._state(trainer, pl_module)


def same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


EMA = {"enabled": True, "decay": 0.9, "warmup": False}


def test_skip_drops_the_bad_step_and_training_goes_on(tmp_path, caplog):
    poison, snaps = PoisonSample(batches=[1], position=3), Snapshots()
    with caplog.at_level(logging.WARNING, logger="vitlab.lit.module"):
        trainer, module, _ = fit(tmp_path, callbacks=[poison, snaps],
                                 module_kwargs={"nonfinite": "skip", "ema": EMA})
    for what in ("weights", "optimizer", "ema"):                      # the bad step changed nothing ...
        assert same(snaps.before[1][what], snaps.after[1][what]), what
        assert not same(snaps.before[2][what], snaps.after[2][what]), what    # ... a good step changes all three
    assert snaps.before[1]["optimizer"][0]["step"] == 1                        # AdamW's step count: still 1
    assert trainer.global_step == 4 and all_finite(module)             # the skipped step counts; training finished
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 1.0
    assert not (tmp_path / REPORT_NAME).exists()
    warned = [r.getMessage() for r in caplog.records if "skipped a training step" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "the training loss is nan at step 1 (epoch 0)" in warned[0]
    assert f"indices {poison.seen[1]['indices']}" in warned[0] and "1 so far, 1 in a row" in warned[0]


def test_skip_stops_after_too_many_steps_in_a_row(tmp_path):
    poison = PoisonSample(batches=[1, 2, 3])
    trainer, module, dm = fit(tmp_path, callbacks=[poison], run=False,
                              module_kwargs={"nonfinite": "skip", "max_skipped_steps": 2}, limit_train_batches=6)
    with pytest.raises(FloatingPointError) as e:
        trainer.fit(module, datamodule=dm)
    msg = str(e.value)
    assert "3 training steps in a row had a non-finite loss or gradients (steps 1 to 3; " \
           "fault.max_skipped_steps=2)" in msg, msg
    assert "The first of them: the training loss is nan at step 1 (epoch 0)" in msg
    assert f"indices {poison.seen[1]['indices']}" in msg and "raise fault.max_skipped_steps" in msg
    report = report_of(tmp_path)
    assert (report["policy"], report["step"], report["last_step"], report["consecutive_skipped"]) == ("skip", 1, 3, 3)
    assert report["batches"]["0"]["indices"] == poison.seen[1]["indices"]
    assert trainer.global_step == 3 and all_finite(module)            # nothing non-finite ever reached the weights


def test_skip_with_accumulation_drops_the_whole_window(tmp_path):
    """accumulate_grad_batches=2: a NaN in the window's first micro-batch (batch 2) drops optimizer step 1."""
    poison, snaps = PoisonSample(batches=[2]), Snapshots()
    trainer, module, _ = fit(tmp_path, callbacks=[poison, snaps], accumulate_grad_batches=2,
                             module_kwargs={"nonfinite": "skip", "ema": EMA})
    assert same(snaps.before[2]["weights"], snaps.after[3]["weights"])
    assert same(snaps.before[2]["optimizer"], snaps.after[3]["optimizer"])
    assert not same(snaps.before[0]["weights"], snaps.after[1]["weights"])
    assert trainer.global_step == 2 and float(trainer.callback_metrics["train/skipped_steps"]) == 1.0


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_under_fp16_gradient_scaling_gradient_overflow_is_left_to_the_scaler(tmp_path, policy):
    """16-mixed's GradScaler (here on the CPU): inf gradients with a finite loss (batch 2) are the scaler's to
    handle (it skips that step and halves the scale), neither a stop nor a skip of ours; with ``skip`` a NaN loss
    (batch 1) is dropped by the module before the scaler sees it (the scale is halved once, for batch 2 only)."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    snaps = Snapshots()
    injected = [InfGradientAt("backbone.blocks.1.mlp.fc1", batch=2), snaps]
    if policy == "skip":
        injected.append(PoisonSample(batches=[1]))
    trainer, module, _ = fit(tmp_path, callbacks=injected, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
                             module_kwargs={"nonfinite": policy, "ema": EMA})
    assert trainer.global_step == 4 and all_finite(module) and scaler.get_scale() == 2.0 ** 9
    assert same(snaps.before[2]["weights"], snaps.after[2]["weights"])        # the scaler's skip
    assert not same(snaps.before[3]["weights"], snaps.after[3]["weights"])
    if policy == "skip":
        assert same(snaps.before[1]["weights"], snaps.after[1]["weights"])    # ours
        assert float(trainer.callback_metrics["train/skipped_steps"]) == 1.0


def test_skip_is_refused_with_sam(tmp_path):
    sam = functools.partial(build_optimizer, name="sam", lr=1e-3)
    trainer, module, dm = fit(tmp_path, optimizer_factory=sam, run=False, module_kwargs={"nonfinite": "skip"})
    with pytest.raises(ValueError, match="fault.nonfinite=skip cannot be used with optim=sam.*fault.nonfinite=stop"):
        trainer.fit(module, datamodule=dm)


# ------------------------------------------------------------ the config ---

@pytest.mark.parametrize("kwargs,key", [({"nonfinite": "ignore"}, "fault.nonfinite"),
                                        ({"max_skipped_steps": 0}, "fault.max_skipped_steps"),
                                        ({"max_skipped_steps": 2.5}, "fault.max_skipped_steps"),
                                        ({"max_skipped_steps": True}, "fault.max_skipped_steps")])
def test_bad_values_name_the_key_and_the_fix(kwargs, key):
    recipe = Supervised(vit("Ti", patch_size=8, embed_dim=32, depth=1, num_heads=2, img_size=16, in_chans=1),
                        ClassificationTask(32, 10))
    with pytest.raises(ValueError, match=rf"{key} must .*; (set|e\.g\.) {key}="):
        VitlabModule(recipe, **kwargs)


def test_the_fault_block_reaches_the_module():
    from hydra import compose, initialize_config_dir

    from vitlab.lit.build import build_module, build_recipe, build_source, data_info, derive

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["backbone.embed_dim=32", "backbone.num_heads=2", "backbone.depth=1",
                                          "fault.nonfinite=skip",
                                          "fault.max_skipped_steps=3"])
    source = build_source(cfg)
    recipe = build_recipe(cfg, data_info(cfg, source))
    module = build_module(cfg, recipe, derive(cfg, recipe), data_info(cfg, source))
    assert (module.guard.policy, module.guard.max_skipped_steps) == ("skip", 3)


# ------------------------------------------------------------------- DDP ---

DDP = ["experiment=digits_vit", "backbone.embed_dim=32", "backbone.depth=1", "backbone.num_heads=2",
       "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.max_epochs=1",
       "trainer.limit_train_batches=4", "trainer.limit_val_batches=1", "run_test=false",
       "trainer.enable_progress_bar=false", "logger=[]", "data.batch_size=16",
       "+callbacks.poison._target_=tests.lit.nonfinite_inject.PoisonSample", "+callbacks.poison.rank=1"]


@pytest.mark.timeout(300)
def test_ddp_ranks_stop_together_and_the_report_names_the_bad_rank(tmp_path):
    out, record = tmp_path / "run", tmp_path / "poisoned"
    p = run_cli("vitlab.cli.train", *DDP, "+callbacks.poison.batches=[2]", f"+callbacks.poison.record={record}",
                f"paths.output_dir={out}", timeout=240, env={"OMP_NUM_THREADS": "1"})
    text = p.stdout + p.stderr
    assert p.returncode != 0, text[-3000:]
    seen = json.loads((tmp_path / "poisoned.rank1.json").read_text())["2"]
    assert "FloatingPointError" in text and "the training loss is nan at step 2 (epoch 0)" in text, text[-3000:]
    assert "Rank with a non-finite loss: 1 (of 2)" in text, text[-3000:]
    report = json.loads((out / REPORT_NAME).read_text())
    assert (report["step"], report["ranks"], report["world_size"]) == (2, [1], 2)
    assert report["batches"] == {"1": {"samples": 16, "indices": seen["indices"]}}
    # every rank took part in the same check (the flag and the records are collectives) and stopped there
    assert report["checked_at_step"]["0"] == report["checked_at_step"]["1"] >= 2
    assert report["gradient"]["status"] == "non-finite"               # all-reduced: rank 0 saw rank 1's NaN too
    assert not (out / "checkpoints" / "last.ckpt").exists()            # no checkpoint after the NaN


@pytest.mark.timeout(300)
def test_ddp_ranks_skip_the_same_step(tmp_path):
    out = tmp_path / "run"
    p = run_cli("vitlab.cli.train", *DDP, "+callbacks.poison.batches=[1]", "fault.nonfinite=skip",
                f"paths.output_dir={out}", timeout=240, env={"OMP_NUM_THREADS": "1"})
    text = p.stdout + p.stderr
    assert p.returncode == 0, text[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ddp/max_param_divergence"] == 0.0                  # both ranks dropped step 1: same weights
    assert metrics["train/skipped_steps"] == 1.0
    assert "skipped a training step" in text and "Rank with a non-finite loss: 1 (of 2)" in text, text[-3000:]
