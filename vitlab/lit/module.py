"""The LightningModule: the adapter between Lightning's loop and a recipe (backbone + task + its own modules).

It calls the recipe, logs what it returns, updates the task's metrics, builds the optimizer and keeps the
resolved config and the data's description in every checkpoint. What is not adapting lives elsewhere: the
non-finite loss / gradient policy in :class:`vitlab.lit.nonfinite.NonFiniteGuard` (called at a few points below),
SAM's gradient-accumulation replay in :class:`vitlab.optim.sam.SAM`, the fused-optimizer rules in
:mod:`vitlab.optim.build`.

The training step never waits for the device outside logging intervals (``tests/lit/test_host_sync.py`` proves
it with :class:`vitlab.lit.host_sync.HostSyncGuard`): the non-finite check keeps its state on the device and reads
it back once per ``loss_check_interval``; the train loss is not a progress-bar metric (Lightning converts those to
Python floats at every batch); training metrics are only updated per step (computed once per epoch).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch

from vitlab.lit.nonfinite import REPORT_NAME, NonFiniteGuard, _batch_size  # noqa: F401 (REPORT_NAME re-exported)
from vitlab.lit.rng import rng_state, set_rng_state
from vitlab.lit.strategies import FSDP
from vitlab.optim.build import clip_gradients, unfused_for_scaled_clipping
from vitlab.optim.sam import SAM
from vitlab.recipes import ModelEma, Recipe

log = logging.getLogger(__name__)


def _identity(value: Any) -> Any:
    return value


def _scaler(trainer: Optional[pl.Trainer]) -> Any:
    """fp16's GradScaler, when the precision plugin has one."""
    return None if trainer is None else getattr(trainer.precision_plugin, "scaler", None)


class VitlabModule(pl.LightningModule):
    """Backbone + task + recipe, trained by Lightning.

    ``optimizer_factory(model) -> Optimizer`` already carries the scaled lr; ``scheduler_factory(optimizer,
    total_steps=, steps_per_epoch=)`` builds a per-step schedule. ``config`` (the resolved run config) and
    ``data_info`` (:class:`vitlab.data.base.DataInfo` as a dict) go into every checkpoint so ``vitlab.load(path)``
    rebuilds the model with no other input.

    ``ema`` (the ``ema:`` block: decay, warmup, update_every, evaluate) keeps an exponential moving average of the
    recipe's weights, updated after every optimizer step, saved in checkpoints (``ema.module.*``) and, with
    ``evaluate``, used for validation, test and ``vitlab-eval``. ``nonfinite`` / ``max_skipped_steps`` /
    ``loss_check_interval``: :class:`~vitlab.lit.nonfinite.NonFiniteGuard`. ``optim=sam``: each optimizer step runs
    two forward/backward passes through Lightning's closure (:class:`vitlab.optim.sam.SAM`).
    """

    def __init__(self, recipe: Recipe, optimizer_factory: Optional[Callable] = None,
                 scheduler_factory: Optional[Callable] = None, config: Optional[dict] = None,
                 data_info: Optional[dict] = None, eval_split: str = "test",
                 loss_check_interval: Optional[int] = None, ema: Optional[dict] = None,
                 nonfinite: str = "stop", max_skipped_steps: int = 20):
        super().__init__()
        self.guard = NonFiniteGuard(nonfinite, max_skipped_steps, loss_check_interval)
        self.recipe = recipe
        ema = dict(ema or {})
        self.ema_evaluate = bool(ema.pop("evaluate", True))
        # the EMA is a registered submodule: saved and restored with every checkpoint, never seen by the optimizer
        # (which is built from the recipe alone)
        self.ema: Optional[ModelEma] = ModelEma(recipe, **ema) if ema.pop("enabled", False) else None
        self.optimizer_factory = optimizer_factory
        self.scheduler_factory = scheduler_factory
        self.config = config
        self.data_info = data_info or {}
        self.eval_split = eval_split
        task = recipe.task
        self.train_metrics = task.train_metrics()
        self.val_metrics = task.metrics()
        self.test_metrics = task.metrics()
        self._updated: set[int] = set()             # metric objects updated this epoch (computed only then)
        self.wandb_run_id: Optional[str] = None
        self._sharded = False

    def forward(self, images: torch.Tensor) -> Any:
        """The task's prediction (logits (B, C) for classification; detections per image; segmentation logits;
        diffusion samples for class labels) from the evaluated weights."""
        return self.eval_recipe()(images)

    def eval_recipe(self) -> Recipe:
        """The recipe that is evaluated: its EMA copy when the run keeps one (and ``ema.evaluate``), else itself."""
        if self.ema is not None and self.ema_evaluate:
            return self.ema.module
        return self.recipe

    # ------------------------------------------------------------ steps ---
    def _sam(self) -> Optional[SAM]:
        trainer = self._trainer
        if trainer is None or not trainer.optimizers:
            return None
        opt = trainer.optimizers[0]
        return opt if isinstance(opt, SAM) else None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.recipe.training_step(batch)
        loss = out["loss"]
        sam = self._sam()
        if sam is not None:
            if sam.second_pass:          # SAM's pass at the perturbed weights: the step was logged by the first pass
                return loss
            if self.trainer.accumulate_grad_batches > 1:
                sam.remember(batch)       # replayed at the perturbed weights (see optimizer_step)
        self.guard.after_training_step(self, loss, batch)
        bs = _batch_size(batch)
        # not prog_bar: Lightning would read a progress-bar value back to the host at every batch;
        # vitlab.lit.callbacks.ProgressBar shows train/loss on logging steps
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=bs, sync_dist=True)
        for k, v in out.items():
            if k not in ("loss", "preds", "target") and torch.is_tensor(v) and v.ndim == 0:
                self.log(f"train/{k}", v, on_step=True, on_epoch=True, batch_size=bs)
        if "target" in out and self.train_metrics is not None:
            # update only: the metric's forward would also compute a per-batch value nobody reads
            self.train_metrics.update(out["preds"], out["target"])
            self.log_dict({f"train/{k}": m for k, m in self.train_metrics.items()}, on_step=False, on_epoch=True,
                          batch_size=bs)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.guard.policy == "skip":      # a Python number: skip mode reads the device every step anyway
            self.log("train/skipped_steps", float(self.guard.skipped_total), on_step=True, on_epoch=True,
                     reduce_fx="max", batch_size=_batch_size(batch))

    def on_train_epoch_end(self) -> None:
        self.guard.check(self, f"at the end of epoch {self.current_epoch}")

    def on_train_end(self) -> None:
        self.guard.check(self, "at the end of training")

    # ------------------------------------------------------- evaluation ---
    def _eval_step(self, batch: dict, split: str, metrics: Any) -> None:
        """One evaluation batch: its scalars logged under ``split/``, its predictions into ``metrics``."""
        out = self.eval_recipe().evaluation_step(batch) or {}
        bs = _batch_size(batch)
        for k, v in out.items():
            if k not in ("preds", "target") and torch.is_tensor(v) and v.ndim == 0:
                self.log(f"{split}/{k}", v, on_epoch=True, prog_bar=split == "val" and k == "loss",
                         sync_dist=True, batch_size=bs)
        if "preds" in out:                  # pretraining recipes have no task prediction to score
            metrics.update(out["preds"], out["target"])
            self._updated.add(id(metrics))

    def _eval_epoch_end(self, split: str, metrics: Any) -> None:
        """The task's epoch metrics (val/top1, val/map, val/miou, ...). torchmetrics gathers every rank's state in
        compute(), so each rank logs the same global value."""
        updated = id(metrics) in self._updated
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:       # compute() is a collective: all ranks or none
            updated = bool(trainer.strategy.reduce(torch.tensor(float(updated), device=self.device),
                                                   reduce_op="sum") > 0)
        if not updated:
            return
        values = self.eval_recipe().task.compute_metrics(metrics)
        metrics.reset()
        self._updated.discard(id(metrics))
        task = self.recipe.task
        shown = set(task.progress_metrics) or {task.monitor.rpartition("/")[2]}
        for k, v in values.items():
            self.log(f"{split}/{k}", v.to(self.device) if torch.is_tensor(v) else float(v), on_epoch=True,
                     prog_bar=split == "val" and k in shown, sync_dist=False)

    def on_validation_epoch_start(self) -> None:
        self.eval_recipe().task.on_evaluation_start()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val", self.val_metrics)

    def on_test_epoch_start(self) -> None:
        self.eval_recipe().task.on_evaluation_start()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.eval_split, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end(self.eval_split, self.test_metrics)

    # -------------------------------------------------------- optimizer ---
    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise RuntimeError("this module was loaded for evaluation; it has no optimizer factory")
        trainer = self._trainer
        opt = self._build_optimizer()
        if isinstance(opt, SAM):
            self._check_sam()
        if trainer is None and self.scheduler_factory is None:       # built outside a Trainer
            return opt
        total = int(self.trainer.estimated_stepping_batches)
        batches = self.trainer.num_training_batches        # inf when max_epochs=-1 (Lightning never sized the loader)
        per_epoch = max(1, math.ceil(batches / self.trainer.accumulate_grad_batches)) if math.isfinite(batches) \
            else total
        self.recipe.setup_schedule(total_steps=total, steps_per_epoch=per_epoch)
        if self.scheduler_factory is None:
            return opt
        sched = self.scheduler_factory(opt, total_steps=total, steps_per_epoch=per_epoch)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer over the recipe; unfused when fp16 gradient scaling and clipping meet (optim.build)."""
        opt = self.optimizer_factory(self.recipe)
        trainer = self._trainer
        if trainer is None:
            return opt
        return unfused_for_scaled_clipping(opt, lambda: self.optimizer_factory(self.recipe, fused=False),
                                           _scaler(trainer) is not None, bool(trainer.gradient_clip_val),
                                           self._fused_setting())

    def _fused_setting(self) -> str | bool:
        """``optim.fused`` as configured (the factory is the Hydra partial of build_optimizer)."""
        factory = self.optimizer_factory
        return factory.keywords.get("fused", "auto") if isinstance(factory, functools.partial) else "auto"

    def _check_sam(self) -> None:
        """SAM runs two passes through Lightning's closure. fp16's GradScaler runs the closure itself and then calls
        step() without it; FSDP shards the weights SAM perturbs; the skip policy must see a step before it is taken.
        All three are refused here, before any work."""
        trainer = self._trainer
        if trainer is None:
            return
        if _scaler(trainer) is not None:
            raise ValueError("optim=sam cannot run under trainer.precision=16-mixed: fp16's GradScaler calls the "
                             "optimizer without the closure SAM needs for its second pass. Use "
                             "trainer.precision=bf16-mixed (GPU) or 32-true")
        if isinstance(trainer.strategy, FSDP):
            raise ValueError("optim=sam is not supported with trainer=fsdp (the perturbation would need the sharded "
                             "gradients' global norm); use trainer=ddp or a single device")
        if self.guard.policy == "skip":
            raise ValueError("fault.nonfinite=skip cannot be used with optim=sam: SAM's step runs the forward "
                             "and backward passes itself (twice), so a step cannot be checked before it is "
                             "taken. Set fault.nonfinite=stop, or use another optimizer (optim=adamw)")

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:
        """Lightning's mixed-precision plugin refuses to clip for an optimizer that unscales gradients itself (a
        fused one), even under bf16-mixed, where nothing is scaled. Without a GradScaler the gradients are the true
        ones, so they are clipped here; with one, configure_optimizers already chose an unfused optimizer."""
        if gradient_clip_val and optimizer.defaults.get("fused") and _scaler(self.trainer) is None:
            clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Step, then free the gradients at once. Lightning zeroes them only after the next step's forward, so
        without this a whole model's gradients (4 bytes per parameter in fp32) stay allocated through every
        forward pass; the later zero_grad finds nothing to do. Gradient accumulation is unaffected: this hook
        runs only at accumulation boundaries."""
        sam = self._sam()
        if sam is not None:
            strategy = self.trainer.strategy
            scale = 1.0 / self.trainer.accumulate_grad_batches

            def replay(batch: dict) -> None:
                strategy.backward(self.recipe.training_step(batch)["loss"] * scale, optimizer)

            sam.arm(replay, getattr(strategy, "block_backward_sync", contextlib.nullcontext))   # DDP's: no all-reduce
        if self.guard.policy == "skip" and optimizer_closure is not None:
            # run the window's last forward/backward here (DDP all-reduces the gradients in it), decide, and hand
            # its loss on: on_before_optimizer_step and clipping still run once, inside the optimizer's step
            loss = optimizer_closure()
            if self.guard.decide_step(self, optimizer):
                return
            optimizer_closure = functools.partial(_identity, loss)
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if sam is not None:
            sam.forget()                                  # the closure remembered its own micro-batch too
        self.guard.after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)
        step = self.global_step - 1                   # Lightning counted the step that was just taken
        self.recipe.on_after_optimizer_step(step, self.current_epoch)
        if self.ema is not None:
            self.ema.update(self.recipe, step)

    def on_before_optimizer_step(self, optimizer) -> None:
        self.guard.before_optimizer_step(self)
        self.recipe.on_before_optimizer_step(self.global_step, self.current_epoch)

    # ---------------------------------------------------------- sharding ---
    def configure_model(self) -> None:
        """Under ``trainer=fsdp`` (vitlab.lit.strategies.FSDP), shard the recipe: one FSDP unit per module the recipe
        declares (:meth:`vitlab.recipes.Recipe.fsdp_units`: the backbone's blocks, a decoder's)."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDP) and not self._sharded:
            strategy.shard(self.recipe, self.recipe.fsdp_units())
            self._sharded = True

    # ------------------------------------------------------- checkpoint ---
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.guard.check(self, "before writing a checkpoint (it was not written)")
        checkpoint["vitlab"] = {"config": self.config, "data_info": self.data_info, "rng": rng_state(),
                                "wandb_run_id": self.wandb_run_id}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("vitlab", {})
        if "rng" in meta:
            set_rng_state(meta["rng"])
        self.wandb_run_id = meta.get("wandb_run_id")
