"""VitlabModule: the non-finite loss guard, checkpoint metadata and RNG restore, optimizer wiring."""

from __future__ import annotations

import functools
import math
import random

import numpy as np
import pytest
import torch

from vitlab.backbones import vit
from vitlab.tasks import ClassificationTask
from vitlab.lit.module import VitlabModule
from vitlab.optim import build_optimizer, cosine_schedule, warmup_cosine_factor
from vitlab.recipes import Supervised


class LossBlowsUpAt(Supervised):
    """Supervised whose loss turns non-finite from a given optimizer step on."""

    bad_step = 2
    bad_value = float("nan")

    def training_step(self, batch: dict) -> dict:
        out = super().training_step(batch)
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls > self.bad_step:
            out["loss"] = out["loss"] * self.bad_value
        return out


class InfAt1(LossBlowsUpAt):
    bad_step = 1
    bad_value = float("inf")


def tiny_module(**kwargs) -> VitlabModule:
    torch.manual_seed(0)
    recipe = Supervised(vit("Ti", patch_size=8, embed_dim=32, depth=1, num_heads=2, img_size=16, in_chans=1),
                        ClassificationTask(32, 10))
    return VitlabModule(recipe, **kwargs)


# ------------------------------------------------------------ nan guard ---

@pytest.mark.parametrize("recipe_cls,step,value", [(LossBlowsUpAt, 2, "nan"), (InfAt1, 1, "inf")],
                         ids=["nan_at_step_2", "inf_at_step_1"])
def test_non_finite_loss_stops_training_with_an_actionable_message(tiny_fit, recipe_cls, step, value):
    with pytest.raises(FloatingPointError) as e:
        tiny_fit(recipe_cls=recipe_cls, max_epochs=2)
    msg = str(e.value)
    assert value in msg.lower(), msg                                  # the problem: the loss value ...
    assert f"step {step}" in msg, msg                                 # ... and where it happened
    assert "optim.lr" in msg, msg                                     # the fixes
    assert "gradient_clip" in msg, msg
    assert "ckpt_path" in msg, msg


def test_finite_loss_passes_the_guard_directly():
    m = tiny_module()
    m.log = lambda *a, **k: None                                      # no trainer attached: skip logging
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(4, 1, 16, 16, generator=g), "label": torch.tensor([0, 1, 2, 3])}
    loss = m.training_step(batch, 0)
    assert torch.isfinite(loss) and loss.requires_grad
    bad = {"image": torch.full((4, 1, 16, 16), float("nan")), "label": batch["label"]}
    with pytest.raises(FloatingPointError, match="nan"):
        m.training_step(bad, 0)


def test_the_first_non_finite_loss_is_kept_on_the_device_until_checked():
    m = tiny_module()
    m.guard.note_loss(m, torch.tensor(2.0))
    m.guard.check(m, "here")                                          # all finite: nothing to report
    m.guard.note_loss(m, torch.tensor(float("inf")))
    m.guard.note_loss(m, torch.tensor(float("nan")))                  # later bad values do not overwrite the first
    rec = m.guard.tracker.loss
    assert rec.device == torch.device("cpu") and (rec[0].item(), rec[1].item()) == (0, 0)
    with pytest.raises(FloatingPointError, match=r"the training loss is inf at step 0 \(epoch 0\), found here"):
        m.guard.check(m, "here")


def test_no_checkpoint_metadata_is_written_after_a_non_finite_loss():
    m = tiny_module(config={})
    m.guard.note_loss(m, torch.tensor(float("nan")))
    ckpt: dict = {}
    with pytest.raises(FloatingPointError, match="before writing a checkpoint"):
        m.on_save_checkpoint(ckpt)
    assert "vitlab" not in ckpt


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "5"])
def test_loss_check_interval_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="loss_check_interval"):
        tiny_module(loss_check_interval=bad)


def test_train_metrics_skip_argument_validation_but_eval_metrics_keep_it():
    m = tiny_module()
    assert not any(x.validate_args for x in m.train_metrics.values())
    assert all(x.validate_args for split in (m.val_metrics, m.test_metrics) for x in split.values())


# ----------------------------------------------------------- checkpoint ---

def test_on_save_checkpoint_stores_config_data_info_and_rng():
    cfg = {"optim": {"lr": 1e-3}, "seed": 3}
    m = tiny_module(config=cfg, data_info={"num_classes": 10, "in_chans": 1})
    m.wandb_run_id = "abc123"
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    ckpt: dict = {}
    m.on_save_checkpoint(ckpt)
    meta = ckpt["vitlab"]
    assert meta["config"] == cfg
    assert meta["data_info"] == {"num_classes": 10, "in_chans": 1}
    assert meta["wandb_run_id"] == "abc123"
    assert set(meta["rng"]) >= {"torch", "numpy", "python"}
    assert torch.equal(meta["rng"]["torch"], torch.get_rng_state())
    assert meta["rng"]["python"] == random.getstate()
    # the numpy state is stored in some serialisable form: restoring it reproduces numpy's next draw
    expected = np.random.rand(3)
    m.on_load_checkpoint(ckpt)
    assert np.array_equal(np.random.rand(3), expected)


def test_checkpoint_metadata_loads_with_weights_only(tmp_path):
    """torch.load(weights_only=True) (the default since torch 2.6) must be able to read the metadata."""
    m = tiny_module(config={"optim": {"lr": 1e-3}, "tags": ["a", "b"]}, data_info={"num_classes": 10, "in_chans": 1})
    ckpt: dict = {}
    m.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "c.ckpt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    loaded = torch.load(tmp_path / "c.ckpt", weights_only=True)
    assert loaded["vitlab"]["config"] == {"optim": {"lr": 1e-3}, "tags": ["a", "b"]}
    m.on_load_checkpoint(loaded)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_on_load_checkpoint_restores_every_rng():
    m = tiny_module(config={})
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    torch.rand(7), np.random.rand(3), random.random()                 # move away from the seed's start
    ckpt: dict = {}
    m.on_save_checkpoint(ckpt)
    after_save = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])

    torch.manual_seed(999)                                            # anything else in between
    np.random.seed(999)
    random.seed(999)
    torch.rand(100)

    other = tiny_module(config={})
    other.on_load_checkpoint(ckpt)
    after_load = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(after_save[0], after_load[0])
    assert np.array_equal(after_save[1], after_load[1])
    assert after_save[2] == after_load[2]


def test_rng_restore_survives_a_file_round_trip(tmp_path):
    """The stored state goes through torch.save / torch.load (as a real checkpoint does)."""
    m = tiny_module(config={"a": 1})
    torch.manual_seed(21)
    ckpt: dict = {}
    m.on_save_checkpoint(ckpt)
    expected = torch.rand(5)
    torch.save(ckpt, tmp_path / "c.ckpt")
    torch.rand(50)
    loaded = torch.load(tmp_path / "c.ckpt", weights_only=False)
    m.on_load_checkpoint(loaded)
    assert torch.equal(torch.rand(5), expected)
    assert loaded["vitlab"]["config"] == {"a": 1}


def test_on_load_checkpoint_restores_the_wandb_run_id_and_tolerates_foreign_checkpoints():
    m = tiny_module()
    m.on_load_checkpoint({"vitlab": {"wandb_run_id": "run42"}})
    assert m.wandb_run_id == "run42"
    state = torch.get_rng_state()
    m.on_load_checkpoint({"state_dict": {}})                          # a checkpoint without vitlab metadata
    assert m.wandb_run_id is None
    assert torch.equal(torch.get_rng_state(), state)


def test_resume_from_a_saved_checkpoint_restores_rng_in_a_real_run(tiny_fit, tmp_path):
    """Trainer.save_checkpoint -> a fresh module / trainer resumed with ckpt_path sees the saved RNG."""
    trainer, module, dm = tiny_fit()
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["vitlab"]["rng"]["torch"]

    torch.manual_seed(1234)                                           # a different state before resuming
    trainer2, module2, dm2 = tiny_fit(fit=False, max_epochs=1)
    seen = {}

    def capture(ckpt, _orig=module2.on_load_checkpoint):
        _orig(ckpt)
        seen["state"] = torch.get_rng_state()

    module2.on_load_checkpoint = capture
    trainer2.fit(module2, datamodule=dm2, ckpt_path=str(path))       # already at max_epochs: restore only
    assert torch.equal(seen["state"], saved)


# ------------------------------------------------------------ optimizer ---

def test_configure_optimizers_passes_the_run_length_to_the_schedule(tiny_fit):
    seen = {}

    def opt_factory(model):
        seen["model"] = model
        return build_optimizer(model, lr=0.01)

    def sched_factory(opt, total_steps, steps_per_epoch):
        seen.update(total=total_steps, per_epoch=steps_per_epoch)
        return cosine_schedule(opt, total_steps=total_steps, steps_per_epoch=steps_per_epoch, warmup_steps=1)

    trainer, module, _ = tiny_fit(optimizer_factory=opt_factory, scheduler_factory=sched_factory, max_epochs=2)
    assert seen["model"] is module.recipe
    assert seen["total"] == 6 and seen["per_epoch"] == 3                # 2 epochs x 3 batches
    # the schedule is stepped per optimizer step: after 6 steps the lr is the factor at step 6
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(0.01 * warmup_cosine_factor(6, 6, 1, 0.0), abs=1e-12)
    assert trainer.lr_scheduler_configs[0].interval == "step"


def test_accumulation_divides_the_steps_per_epoch(tiny_fit):
    seen = {}

    def sched_factory(opt, total_steps, steps_per_epoch):
        seen.update(total=total_steps, per_epoch=steps_per_epoch)
        return cosine_schedule(opt, total_steps=total_steps, steps_per_epoch=steps_per_epoch)

    tiny_fit(scheduler_factory=sched_factory, limit_train_batches=4, accumulate_grad_batches=2)
    assert seen == {"total": 2, "per_epoch": 2}


def test_without_a_scheduler_only_the_optimizer_is_returned():
    m = tiny_module(optimizer_factory=functools.partial(build_optimizer, name="sgd", lr=0.1))
    opt = m.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD)


def test_module_loaded_for_evaluation_has_no_optimizer():
    with pytest.raises(RuntimeError, match="optimizer"):
        tiny_module().configure_optimizers()


def test_split_metrics_are_independent():
    m = tiny_module()
    assert set(m.val_metrics.keys()) == {"top1", "top5"}
    assert m.val_metrics is not m.test_metrics and m.train_metrics is not m.val_metrics
    m.val_metrics.update(torch.eye(10), torch.arange(10))
    m.test_metrics.update(torch.eye(10), torch.arange(10).roll(1))
    assert m.val_metrics.compute()["top1"].item() == pytest.approx(1.0)
    assert m.test_metrics.compute()["top1"].item() == pytest.approx(0.0)
    assert math.isfinite(m.val_metrics.compute()["top5"].item())


# ------------------------------------------------------ gradients after a step ---

class _GradProbe:
    """Records, at the start of each training batch (before its forward), whether any gradient is allocated."""

    def __init__(self):
        import pytorch_lightning as pl

        probe = self

        class _CB(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                probe.seen.append(any(p.grad is not None for p in pl_module.parameters()))

        self.seen: list[bool] = []
        self.callback = _CB()


def test_gradients_are_freed_right_after_the_optimizer_step(tiny_fit):
    """Lightning would zero them only after the next forward; vitlab frees them after the step, so no forward
    pass runs with a whole model's gradients allocated."""
    probe = _GradProbe()
    tiny_fit(callbacks=[probe.callback])
    assert probe.seen == [False, False, False]


def test_gradient_accumulation_still_accumulates(tiny_fit):
    """accumulate_grad_batches=2: the first micro-batch's gradients survive into the second (they are freed only
    after the optimizer step, which runs once per two batches)."""
    probe = _GradProbe()
    trainer, _, _ = tiny_fit(callbacks=[probe.callback], accumulate_grad_batches=2, limit_train_batches=4)
    assert probe.seen == [False, True, False, True]
    assert trainer.global_step == 2


# ------------------------------------------------ fused AdamW and gradient clipping ---

from pytorch_lightning.utilities import GradClipAlgorithmType  # noqa: E402


def _stub_trainer(precision: str, clip):
    from types import SimpleNamespace

    from pytorch_lightning.plugins.precision import MixedPrecision, Precision

    plugin = Precision() if precision == "32-true" else MixedPrecision(precision, "cpu")
    return SimpleNamespace(precision_plugin=plugin, gradient_clip_val=clip)


def _module_with(optimizer_factory):
    from vitlab.backbones import vit
    from vitlab.tasks import ClassificationTask
    from vitlab.recipes import Supervised

    recipe = Supervised(vit("Ti", patch_size=8, embed_dim=32, depth=1, num_heads=2, img_size=16, in_chans=1),
                        ClassificationTask(32, 10))
    return VitlabModule(recipe, optimizer_factory=optimizer_factory)


def _total_norm(grads):
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def _max_abs(grads):
    return max(g.abs().max() for g in grads)


@pytest.mark.parametrize("algorithm, check", [
    ("norm", _total_norm), (None, _total_norm), ("value", _max_abs),
    (GradClipAlgorithmType.VALUE, _max_abs), (GradClipAlgorithmType.NORM, _total_norm),
])
def test_fused_optimizer_is_clipped_under_bf16_mixed(algorithm, check):
    """Lightning refuses to clip for a fused optimizer under bf16-mixed; vitlab clips the (unscaled) gradients."""
    import functools

    from vitlab.optim import build_optimizer

    module = _module_with(functools.partial(build_optimizer, lr=1e-3, fused=True))
    module._trainer = _stub_trainer("bf16-mixed", 1e-3)
    opt = module.optimizer_factory(module.recipe)
    assert opt.defaults["fused"] is True
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    module.configure_gradient_clipping(opt, 1e-3, algorithm)
    assert float(check([p.grad for p in module.parameters()])) == pytest.approx(1e-3, rel=1e-3)


def test_fp16_scaling_with_clipping_falls_back_to_the_unfused_optimizer():
    import functools

    from vitlab.optim import build_optimizer

    auto = _module_with(functools.partial(build_optimizer, lr=1e-3))        # optim.fused=auto (the default)
    auto._trainer = _stub_trainer("16-mixed", 1.0)
    opt = auto._build_optimizer()
    assert not opt.defaults["fused"]
    forced = _module_with(functools.partial(build_optimizer, lr=1e-3, fused=True))
    forced._trainer = _stub_trainer("16-mixed", 1.0)
    with pytest.raises(ValueError, match="optim.fused=true cannot be combined"):
        forced._build_optimizer()
    no_clip = _module_with(functools.partial(build_optimizer, lr=1e-3))
    no_clip._trainer = _stub_trainer("16-mixed", None)
    assert no_clip._build_optimizer().defaults["fused"]
