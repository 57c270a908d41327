"""HostSyncGuard: it catches host syncs in the training step, and vitlab's training step has none outside logging
intervals (precision 32 and bf16-mixed, hard and mixup targets, the CLI's callbacks); the non-finite loss check
that replaced the per-step ``.item()`` still stops a run at the first bad step, before a checkpoint is written."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.callbacks.progress import ProgressBar as LightningProgressBar
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.logger import Logger

from tests.conftest import REPO
from vitlab.backbones import vit
from vitlab.data import Digits
from vitlab.tasks import ClassificationTask
from vitlab.lit.callbacks import ProgressBar
from vitlab.lit.host_sync import HostSyncGuard, is_logging_step
from vitlab.lit.datamodule import VitlabDataModule
from vitlab.lit.module import VitlabModule
from vitlab.recipes import Supervised

STEPS, LOG_EVERY = 12, 5
LOGGING_STEPS = {4, 9}                           # global steps of batches 5 and 10: (batches_that_stepped + 1) % 5 == 0
WATCHED = [s for s in range(1, STEPS) if s not in LOGGING_STEPS]     # step 0: the guard's warm-up step


# ------------------------------------------------------------- helpers ---

class ItemInStep(Supervised):
    """Supervised whose training step reads the loss back to the host: the classic per-step sync."""

    def training_step(self, batch: dict) -> dict:
        out = super().training_step(batch)
        self.last_loss = out["loss"].item()                           # the deliberate sync
        return out


_source, _first = inspect.getsourcelines(ItemInStep)
ITEM_LINE = _first + next(i for i, line in enumerate(_source) if "the deliberate sync" in line)


class NanFrom(Supervised):
    """Supervised whose loss is NaN from its ``bad``-th call (0-based, = the global step) on."""

    bad = 2

    def training_step(self, batch: dict) -> dict:
        out = super().training_step(batch)
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls > self.bad:
            out["loss"] = out["loss"] * float("nan")
        return out


class ProgBarStepMetric(VitlabModule):
    """Logs a per-step value as a progress-bar metric: Lightning converts it to a float at every batch."""

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("loss_in_bar", loss.detach(), on_step=True, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss


def _factories() -> tuple:
    """The optimizer and scheduler factories from conf/, instantiated as lit/build.py does."""
    optim = instantiate(OmegaConf.load(REPO / "conf" / "optim" / "adamw.yaml"), lr=1e-3, _convert_="all")
    sched = instantiate(OmegaConf.load(REPO / "conf" / "sched" / "cosine.yaml"), warmup_epochs=0.25, _convert_="all")
    return optim, sched


def make_run(tmp_path: Path, recipe_cls=Supervised, module_cls=VitlabModule, mixup: bool = False,
             callbacks=(), steps: int = STEPS, module_kwargs: dict | None = None, **trainer_kwargs):
    """A tiny ViT (dim 32, depth 2, 16x16 digits, patch 4) trained for ``steps`` optimizer steps."""
    pl.seed_everything(0, verbose=False)
    recipe = recipe_cls(vit("Ti", patch_size=4, embed_dim=32, depth=2, num_heads=2, img_size=16, in_chans=1),
                        ClassificationTask(32, 10))
    optim, sched = _factories()
    module = module_cls(recipe, optimizer_factory=optim, scheduler_factory=sched, config={},
                        data_info={"num_classes": 10, "in_chans": 1}, **(module_kwargs or {}))
    dm = VitlabDataModule(Digits(), img_size=16, batch_size=16, augment={"policy": "none"},
                          mixup={"mixup_alpha": 0.8, "cutmix_alpha": 1.0} if mixup else None)
    kwargs = {"max_epochs": 1, "limit_train_batches": steps, "limit_val_batches": 1, "logger": False,
              "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
              "num_sanity_val_steps": 0, "accelerator": "cpu", "devices": 1, "gradient_clip_val": 1.0,
              "log_every_n_steps": LOG_EVERY, "use_distributed_sampler": False, "default_root_dir": str(tmp_path),
              **trainer_kwargs}
    trainer = pl.Trainer(callbacks=list(callbacks), **kwargs)
    return trainer, module, dm


# ---------------------------------------------------- the guard catches ---

def test_error_mode_names_the_op_the_file_line_and_the_step(tmp_path):
    guard = HostSyncGuard(mode="error")
    trainer, module, dm = make_run(tmp_path, recipe_cls=ItemInStep, callbacks=[guard])
    with pytest.raises(RuntimeError, match="host sync in the training step") as e:
        trainer.fit(module, datamodule=dm)
    msg = str(e.value)
    assert f"test_host_sync.py:{ITEM_LINE} in training_step" in msg, msg                # the line, from any cwd
    assert "at step 1" in msg and "aten._local_scalar_dense" in msg and "logging interval" in msg, msg
    assert trainer.global_step == 1                                   # stopped inside the first watched step
    assert not trainer.__dict__.get("save_checkpoint")                # its hooks into the trainer are removed


@pytest.mark.parametrize("warmup", [0, 1])
def test_count_mode_records_one_sync_per_non_logging_step(tmp_path, warmup):
    guard = HostSyncGuard(mode="count", warmup_steps=warmup)
    trainer, module, dm = make_run(tmp_path, recipe_cls=ItemInStep, callbacks=[guard])
    trainer.fit(module, datamodule=dm)
    watched = [0] * (warmup == 0) + WATCHED
    assert guard.windows == len(watched)
    assert [s.step for s in guard.syncs] == watched                   # one per watched step, none elsewhere
    assert {(s.op, s.location.rsplit("/", 1)[-1], s.function, s.in_lightning) for s in guard.syncs} == {
        ("aten._local_scalar_dense", f"test_host_sync.py:{ITEM_LINE}", "training_step", False)}
    assert f"{len(watched)} x aten._local_scalar_dense from " in guard.summary()


def test_without_skipping_logging_steps_every_step_is_watched(tmp_path, caplog):
    guard = HostSyncGuard(mode="warn", skip_logging_steps=False, warmup_steps=0)
    trainer, module, dm = make_run(tmp_path, recipe_cls=ItemInStep, callbacks=[guard])
    with caplog.at_level(logging.WARNING, logger="vitlab.lit.callbacks"):
        trainer.fit(module, datamodule=dm)
    ours = [s for s in guard.syncs if s.location.endswith(f"test_host_sync.py:{ITEM_LINE}")]
    assert [s.step for s in ours] == list(range(STEPS))
    # the rest: the non-finite loss check, which reads its flag back on logging steps only
    rest = [s for s in guard.syncs if s not in ours]
    assert {s.step for s in rest} == LOGGING_STEPS and all("vitlab/lit/nonfinite.py" in s.location for s in rest)
    warned = [r.getMessage() for r in caplog.records if "host sync in the training step" in r.getMessage()]
    assert len(warned) == len({s.where() for s in guard.syncs})                  # once per location
    assert sum(f"test_host_sync.py:{ITEM_LINE}" in w for w in warned) == 1


def test_a_sync_inside_lightning_is_attributed_to_lightning(tmp_path):
    """A per-step progress-bar metric: Lightning reads it back at every batch (its logger connector)."""
    guard = HostSyncGuard(mode="count")
    trainer, module, dm = make_run(tmp_path, module_cls=ProgBarStepMetric, callbacks=[guard], steps=4)
    trainer.fit(module, datamodule=dm)
    assert guard.syncs and {s.step for s in guard.syncs} == {1, 2, 3}
    assert all(s.in_lightning and s.op == "aten._local_scalar_dense" for s in guard.syncs)
    assert all(s.location.startswith(("lightning_fabric/", "pytorch_lightning/")) for s in guard.syncs)
    assert any("logger_connector.py" in s.via for s in guard.syncs), guard.summary()
    assert "inside Lightning" in guard.summary()


def test_logging_step_rule_matches_the_steps_lightning_logs(tmp_path):
    class Recorder(Logger):
        name, version = "rec", 0

        def __init__(self):
            super().__init__()
            self.logged: list = []

        def log_metrics(self, metrics, step=None):
            if "train/loss_step" in metrics:
                self.logged.append(step)

        def log_hyperparams(self, *args, **kwargs):
            pass

    class Flags(pl.Callback):
        def __init__(self):
            self.seen: list = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.append((trainer.global_step, is_logging_step(trainer)))

    rec, flags = Recorder(), Flags()
    trainer, module, dm = make_run(tmp_path, callbacks=[flags], logger=rec)
    trainer.fit(module, datamodule=dm)
    assert {s for s, flag in flags.seen if flag} == LOGGING_STEPS == set(rec.logged)


# ---------------------------------------------- vitlab's step is sync-free ---

@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("mixup", [False, True], ids=["hard_labels", "mixup_soft_targets"])
def test_vitlab_training_step_has_no_host_sync(tmp_path, precision, mixup):
    guard = HostSyncGuard(mode="error")
    trainer, module, dm = make_run(tmp_path, mixup=mixup, callbacks=[guard], precision=precision)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == STEPS
    assert guard.windows == len(WATCHED) and guard.syncs == [], guard.summary()


def test_the_clis_callbacks_add_no_host_sync(tmp_path):
    """The callbacks of conf/callbacks/default.yaml (progress bar shown, lr monitor, checkpoints, artifacts)
    with a CSV logger, as vitlab-train runs them."""
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)},
                            "recipe": {"monitor": "val/top1", "monitor_mode": "max"},
                            "callbacks": OmegaConf.load(REPO / "conf" / "callbacks" / "default.yaml")})
    callbacks = [instantiate(c, _convert_="all") for c in cfg.callbacks.values() if c is not None]
    bar = next(c for c in callbacks if isinstance(c, LightningProgressBar))
    assert isinstance(bar, ProgressBar) and bar.refresh_rate == 5      # lit/build.py's isinstance check holds
    guard = HostSyncGuard(mode="error")
    trainer, module, dm = make_run(tmp_path, callbacks=[*callbacks, guard], enable_progress_bar=True,
                                   enable_checkpointing=True, logger=CSVLogger(str(tmp_path)))
    trainer.fit(module, datamodule=dm)
    assert guard.windows == len(WATCHED) and guard.syncs == [], guard.summary()
    assert trainer.callbacks[0] is guard                              # it watches from the first hook on
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and (tmp_path / "history.json").is_file()


def test_a_checkpoint_written_inside_a_step_is_not_reported(tmp_path):
    guard = HostSyncGuard(mode="error")
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=3, save_top_k=-1, filename="{step}")
    trainer, module, dm = make_run(tmp_path, callbacks=[guard, ckpt], enable_checkpointing=True, steps=6)
    trainer.fit(module, datamodule=dm)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step=3.ckpt", "step=6.ckpt"]
    assert guard.syncs == []


class ReportGuard(pl.Callback):
    """Puts a rank's guard counts into callback_metrics, which ddp_spawn sends back from rank 0."""

    def __init__(self, guard: HostSyncGuard):
        self.guard = guard

    def on_fit_end(self, trainer, pl_module):
        ours = sum(s.location.endswith(f"test_host_sync.py:{ITEM_LINE}") for s in self.guard.syncs)
        trainer.callback_metrics.update({"guard/windows": torch.tensor(float(self.guard.windows)),
                                         "guard/ours": torch.tensor(float(ours)),
                                         "guard/others": torch.tensor(float(len(self.guard.syncs) - ours))})


@pytest.mark.slow
def test_ddp_ranks_see_only_the_deliberate_sync(tmp_path):
    """2 CPU processes (gloo, spawned), each with its own guard: DDP's gradient all-reduce and sync_dist=True
    are collectives, not host syncs; only the recipe's .item() is reported, once per watched step."""
    guard = HostSyncGuard(mode="count")
    trainer, module, dm = make_run(tmp_path, recipe_cls=ItemInStep, callbacks=[guard, ReportGuard(guard)],
                                   strategy="ddp_spawn", devices=2, steps=6)
    trainer.fit(module, datamodule=dm)
    got = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("guard/")}
    assert got == {"guard/windows": 4.0, "guard/ours": 4.0, "guard/others": 0.0}      # steps 1, 2, 3, 5


# ------------------------------------------------------ the op table ---

def _watch(fn, *args):
    """Run ``fn`` inside a guard window on a CPU 'device' (no trainer); return the syncs it recorded."""
    guard = HostSyncGuard(mode="count")
    guard._trainer = SimpleNamespace(optimizers=[])
    guard._open(SimpleNamespace(global_step=3), SimpleNamespace(device=torch.device("cpu")))
    try:
        fn(*args)
    finally:
        guard._close(raise_pending=False)
    return guard.syncs


def _with_grad(x: torch.Tensor) -> torch.nn.Parameter:
    p = torch.nn.Parameter(x.clone())
    p.grad = x * 10
    return p


SYNCING = {
    "item": lambda x: x.sum().item(),
    "bool": lambda x: bool(x.sum() > 0),
    "float": lambda x: float(x.mean()),
    "format": lambda x: f"{x.sum():.3f}",
    "if_isfinite": lambda x: 1 if torch.isfinite(x.sum()) else 0,
    "tolist": lambda x: x.tolist(),
    "numpy": lambda x: x.numpy(),
    "mask_index": lambda x: x[x > 0],
    # a value per selected element: index_put_ needs the number of True entries (a nonzero); x has 4 > 0
    "mask_assign_tensor": lambda x: x.__setitem__(x > 0, torch.zeros(4)),
    "nonzero": lambda x: x.nonzero(),
    "where_1arg": lambda x: torch.where(x > 0),
    "masked_select": lambda x: x.masked_select(x > 0),
    "unique": lambda x: torch.unique(x),
    "equal": lambda x: torch.equal(x, x),
    "allclose": lambda x: torch.allclose(x, x),
    "bincount": lambda x: torch.bincount((x > 0).long()),
    "repeat_interleave": lambda x: torch.repeat_interleave((x > 0).long()),
}
NOT_SYNCING = {
    "where_3arg": lambda x: torch.where(x > 0, x, 0.0),
    "isfinite_all": lambda x: torch.isfinite(x).all(),
    "masked_fill": lambda x: x.masked_fill(x > 0, 0.0),
    "mask_assign_scalar": lambda x: x.__setitem__(x > 5, 1.0),         # masked_fill_ inside index_put_
    "mask_assign_host_scalar_tensor": lambda x: x.__setitem__(x > 0, torch.zeros(())),
    "nonzero_static": lambda x: torch.nonzero_static(x > 0, size=2),
    "repeat_interleave_sized": lambda x: torch.repeat_interleave(torch.ones(4, dtype=torch.long), output_size=4),
    "clip_grad_norm": lambda x: torch.nn.utils.clip_grad_norm_([_with_grad(x)], 1.0),
    "assert_async": lambda x: torch._assert_async(x.abs().sum() >= 0),
}


@pytest.mark.parametrize("name", sorted(SYNCING))
def test_ops_that_sync_are_reported(name):
    syncs = _watch(SYNCING[name], torch.linspace(-1, 1, 8))
    assert len(syncs) >= 1 and syncs[0].step == 3, name
    assert "test_host_sync.py:" in syncs[0].location and syncs[0].function == "<lambda>", syncs[0]


@pytest.mark.parametrize("name", sorted(NOT_SYNCING))
def test_ops_that_stay_on_the_device_are_not_reported(name):
    assert _watch(NOT_SYNCING[name], torch.linspace(-1, 1, 8)) == []


def test_optimizer_step_counters_are_host_tensors_by_design():
    """AdamW (not fused) keeps state['step'] on the host and reads it with .item(): allowed, even on the first
    step, which creates the counters inside the window."""
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def steps():
        for _ in range(2):
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
            opt.zero_grad()

    guard = HostSyncGuard(mode="count")
    guard._trainer = SimpleNamespace(optimizers=[opt])
    guard._open(SimpleNamespace(global_step=0), SimpleNamespace(device=torch.device("cpu")))
    try:
        steps()
        torch.tensor(1.0).item()                                      # any other read still counts
    finally:
        guard._close(raise_pending=False)
    assert [s.op for s in guard.syncs] == ["aten._local_scalar_dense"]


def test_a_swallowed_error_is_raised_when_the_window_closes():
    guard = HostSyncGuard(mode="error")
    guard._trainer = SimpleNamespace(optimizers=[], log_every_n_steps=5)
    guard._open(SimpleNamespace(global_step=0), SimpleNamespace(device=torch.device("cpu")))
    try:
        torch.ones(()).item()
    except RuntimeError:
        pass                                                          # e.g. a broad try/except in user code
    with pytest.raises(RuntimeError, match="host sync in the training step at step 0"):
        guard._close(raise_pending=True)
    assert torch.Tensor.tolist is torch._C.TensorBase.tolist          # .tolist() / .numpy() are restored


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="count, warn or error"):
        HostSyncGuard(mode="strict")
    with pytest.raises(ValueError, match="warmup_steps"):
        HostSyncGuard(warmup_steps=-1)


# ------------------------------------------------- non-finite loss check ---

def test_nan_is_caught_at_the_next_logging_step_with_the_first_bad_step(tmp_path):
    trainer, module, dm = make_run(tmp_path, recipe_cls=NanFrom, callbacks=[HostSyncGuard(mode="error")])
    with pytest.raises(FloatingPointError) as e:
        trainer.fit(module, datamodule=dm)
    msg = str(e.value)
    assert "nan at step 2 (epoch 0)" in msg, msg                       # the FIRST bad step, not the check's
    assert "by the check at step 4 (every 5 steps, trainer.log_every_n_steps)" in msg, msg
    assert "optim.lr" in msg and "gradient_clip" in msg and "ckpt_path" in msg
    assert trainer.global_step == 4                                   # no host sync on steps 2 and 3


def test_loss_check_interval_1_checks_every_step(tmp_path):
    trainer, module, dm = make_run(tmp_path, recipe_cls=NanFrom, module_kwargs={"loss_check_interval": 1})
    with pytest.raises(FloatingPointError, match="nan at step 2 .* by the check at step 2 .*loss_check_interval"):
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2


def test_no_checkpoint_is_written_after_a_nan_loss(tmp_path):
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer, module, dm = make_run(tmp_path, recipe_cls=NanFrom, callbacks=[ckpt], enable_checkpointing=True)
    with pytest.raises(FloatingPointError, match="nan at step 2 .*before writing a checkpoint"):
        trainer.fit(module, datamodule=dm)
    # steps 0 and 1 trained on finite losses; step 2's update used the NaN loss: its checkpoint is never written
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step=1.ckpt", "step=2.ckpt"]
    for path in (tmp_path / "ck").iterdir():
        state = torch.load(path, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path


# ------------------------------------------------------------------ GPU ---

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.set_sync_debug_mode)")
def test_gpu_training_step_has_no_host_sync_under_cuda_sync_debug(tmp_path):
    """On CUDA the guard also sets torch.cuda.set_sync_debug_mode('error') for the window: any synchronizing
    CUDA call (a device-to-host copy, a sync inside a kernel) raises too. Fused AdamW, bf16-mixed."""
    before = torch.cuda.get_sync_debug_mode()
    guard = HostSyncGuard(mode="error")
    trainer, module, dm = make_run(tmp_path, mixup=True, callbacks=[guard], accelerator="gpu", devices=1,
                                   precision="bf16-mixed")
    trainer.fit(module, datamodule=dm)
    assert guard.windows == len(WATCHED) and guard.syncs == [], guard.summary()
    assert torch.cuda.get_sync_debug_mode() == before

    guard = HostSyncGuard(mode="error")
    trainer, module, dm = make_run(tmp_path, recipe_cls=ItemInStep, callbacks=[guard], accelerator="gpu", devices=1)
    with pytest.raises(RuntimeError, match=f"test_host_sync.py:{ITEM_LINE}"):
        trainer.fit(module, datamodule=dm)
    assert torch.cuda.get_sync_debug_mode() == before
