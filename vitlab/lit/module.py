"""The LightningModule: calls the recipe, logs, updates metrics, builds the optimizer.

The training step never waits for the device outside logging intervals (``tests/lit/test_host_sync.py``
proves it with :class:`vitlab.lit.host_sync.HostSyncGuard`): the non-finite loss / gradient check keeps its
state on the device (:mod:`vitlab.lit.nonfinite`) and reads it back once per ``loss_check_interval``, at epoch
end and before a checkpoint is written; the train loss is not a progress-bar metric (Lightning converts those
to Python floats at every batch); the train accuracy is only updated per step (computed once per epoch).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import random
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist

from vitlab.lit.host_sync import is_logging_step, training_batch_number
from vitlab.lit.nonfinite import HINTS, NonFiniteTracker, build_report, describe, unpack
from vitlab.optim.sam import SAM
from vitlab.recipes import ModelEma, Recipe

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("stop", "skip")
REPORT_NAME = "nonfinite_report.json"


def _rng_state() -> dict:
    """All RNG states, in types that load with torch.load(weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _identity(value: Any) -> Any:
    return value


class VitlabModule(pl.LightningModule):
    """Backbone + task + recipe, trained by Lightning.

    ``optimizer_factory(model) -> Optimizer`` already carries the scaled lr;
    ``scheduler_factory(optimizer, total_steps=, steps_per_epoch=)`` builds a per-step schedule.
    ``config`` (the resolved run config) is stored in every checkpoint so
    ``vitlab.load(path)`` can rebuild the model with no other input.

    ``ema`` (the ``ema:`` block of train.yaml: decay, warmup, update_every, evaluate) keeps an exponential moving
    average of the recipe's weights, updated after every optimizer step, saved in checkpoints (``ema.module.*``) and,
    with ``evaluate``, used for validation, test and ``vitlab-eval``.

    ``optim=sam``: each optimizer step runs two forward/backward passes through Lightning's closure
    (:class:`vitlab.optim.sam.SAM`). Under DDP the first pass skips the gradient all-reduce (m-sharpness); with
    gradient accumulation the window's earlier micro-batches are replayed at the perturbed weights, so both passes
    see the whole accumulated batch.

    Non-finite losses and gradients (``nonfinite``, from ``fault.nonfinite``):

    - ``stop`` (default): the run stops with :class:`FloatingPointError` and ``<default_root_dir>/nonfinite_report
      .json`` (written by rank 0), both naming the first bad step, its loss, the rank(s) whose loss went bad, the
      batch's sample indices and the first layer, in backward order, whose gradient went non-finite
      (:mod:`vitlab.lit.nonfinite`). It is noticed on the device at every step (the loss in the training step,
      the gradients, all-reduced under DDP, in ``on_before_optimizer_step``) and read back (one host sync) every
      ``loss_check_interval`` training batches: None (default) = on the steps where Lightning logs
      (``trainer.log_every_n_steps``), 1 = every step (a host sync per step); also at the end of every epoch and
      of training, and before any checkpoint is written, so no checkpoint ever holds weights trained on a
      non-finite loss. Every rank checks at the same points and the flag is all-reduced there, so all ranks stop
      together. A loss found bad in its own step stops the run after that step's backward (before the update),
      so its gradients are in the report. Under fp16's GradScaler, non-finite gradients are the scaler's business
      (it skips those steps and lowers the scale): only a non-finite loss stops the run.
    - ``skip``: a step whose loss (any micro-batch of the accumulation window) or accumulated gradients are
      non-finite on any rank is dropped: no optimizer update (no weight decay, no moment or step-count update), no
      EMA or recipe update, gradients freed; a warning with the same facts (rank 0; the first 10 skips, then every
      100th) and ``train/skipped_steps`` (the run's total). It costs one host read per step (and under DDP one
      all-reduce of a flag): the module runs Lightning's closure itself and decides before calling the
      optimizer. The skipped step still counts: ``global_step`` and the LR schedule move on (as for the steps
      fp16's GradScaler skips), so max_steps and resume stay consistent. More than ``max_skipped_steps``
      consecutive skipped steps stop the run with the report. Under fp16's GradScaler only the loss is checked
      (the scaler already skips steps with inf gradients). Not with ``optim=sam`` (its step runs the closure
      twice itself).
    """

    def __init__(self, recipe: Recipe, optimizer_factory: Optional[Callable] = None,
                 scheduler_factory: Optional[Callable] = None, config: Optional[dict] = None,
                 data_info: Optional[dict] = None, eval_split: str = "test",
                 loss_check_interval: Optional[int] = None, ema: Optional[dict] = None,
                 nonfinite: str = "stop", max_skipped_steps: int = 20):
        super().__init__()
        if loss_check_interval is not None and (isinstance(loss_check_interval, bool)
                                                or not isinstance(loss_check_interval, int) or loss_check_interval < 1):
            raise ValueError(f"loss_check_interval must be null (check on logging steps) or an integer >= 1, "
                             f"got {loss_check_interval!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"fault.nonfinite must be stop (end the run with a report) or skip (drop the step), "
                             f"got {nonfinite!r}; set fault.nonfinite=stop or fault.nonfinite=skip")
        if isinstance(max_skipped_steps, bool) or not isinstance(max_skipped_steps, int) or max_skipped_steps < 1:
            raise ValueError(f"fault.max_skipped_steps must be an integer >= 1 (how many steps in a row "
                             f"fault.nonfinite=skip may drop before the run stops), got {max_skipped_steps!r}; "
                             "e.g. fault.max_skipped_steps=20")
        self.recipe = recipe
        ema = dict(ema or {})
        self.ema_evaluate = bool(ema.pop("evaluate", True))
        # the EMA is a registered submodule: saved and restored with every checkpoint, never seen by the optimizer
        # (which is built from the recipe alone)
        self.ema: Optional[ModelEma] = ModelEma(recipe, **ema) if ema.pop("enabled", False) else None
        self._sam_window: list[dict] = []
        self.optimizer_factory = optimizer_factory
        self.scheduler_factory = scheduler_factory
        self.config = config
        self.data_info = data_info or {}
        self.eval_split = eval_split
        self.loss_check_interval = loss_check_interval
        # dense tasks (detection, segmentation) score whole epochs (mAP, mIoU): computed once per validation / test
        self.dense = getattr(recipe.task, "kind", "classification") != "classification"
        # the labels were checked by the data layer: no per-step argument validation on the train split
        self.train_metrics = recipe.task.metrics(validate_args=False) if not self.dense else None
        self.val_metrics = recipe.task.metrics()
        self.test_metrics = recipe.task.metrics()
        self.wandb_run_id: Optional[str] = None
        self.nonfinite = nonfinite
        self.max_skipped_steps = max_skipped_steps
        # first non-finite loss and gradients, kept on the loss's device (vitlab.lit.nonfinite)
        self._nonfinite = NonFiniteTracker()
        self._window: list[tuple[Optional[torch.Tensor], int]] = []   # (sample indices, size) per micro-batch
        self._nonfinite_pending: Optional[str] = None    # found in its own step: stop once its gradients are seen
        # a training step ran since the last check (the same on every rank): a check with nothing new to read is
        # skipped, so the checkpoint writes after the end-of-epoch check cost no sync and no collective
        self._unchecked = False
        self._skipped_total = 0                          # skip: steps dropped since this process started
        self._skipped_streak = 0                         # skip: steps dropped in a row ...
        self._streak_first: Optional[dict] = None        # ... and the report of the first of them

    def forward(self, images: torch.Tensor) -> Any:
        """Logits (B, C) for classification; a dense task's predictions (detections per image, or logits
        (B, C, H, W) for segmentation)."""
        return self.eval_recipe()(images)

    def eval_recipe(self) -> Recipe:
        """The recipe that is evaluated: its EMA copy when the run keeps one (and ``ema.evaluate``), else itself."""
        if self.ema is not None and self.ema_evaluate:
            return self.ema.module
        return self.recipe

    @staticmethod
    def _batch_size(batch: dict) -> int:
        image = batch["image"]
        return (image[0] if isinstance(image, (list, tuple)) else image).shape[0]     # multi-crop: a list of views

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
                self._sam_window.append(batch)        # replayed at the perturbed weights (see optimizer_step)
        self._note_non_finite(loss, batch)
        if self.nonfinite == "stop" and self._loss_check_due():        # skip decides at every optimizer step
            self.check_loss(self._interval_text(), defer=True)
        bs = self._batch_size(batch)
        # not prog_bar: Lightning would read a progress-bar value back to the host at every batch;
        # vitlab.lit.callbacks.ProgressBar shows train/loss on logging steps
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=bs, sync_dist=True)
        for k, v in out.items():
            if k not in ("loss", "logits", "target") and torch.is_tensor(v) and v.ndim == 0:
                self.log(f"train/{k}", v, on_step=True, on_epoch=True, batch_size=bs)
        if "target" in out and self.train_metrics is not None:
            # update only: the metric's forward would also compute a per-batch value nobody reads
            self.train_metrics["top1"].update(out["logits"], out["target"])
            self.log("train/top1", self.train_metrics["top1"], on_step=False, on_epoch=True, batch_size=bs)
        return loss

    # ------------------------------------------------------ loss check ---
    def _note_non_finite(self, loss: torch.Tensor, batch: Optional[dict] = None) -> None:
        """Record the first non-finite loss (with its batch's sample indices) on the device: tensor ops only, no
        host sync. The batch joins the accumulation window whose gradients :meth:`_note_grads` looks at."""
        index = batch.get("index") if isinstance(batch, dict) else None
        index = index if torch.is_tensor(index) else None
        samples = self._batch_size(batch) if isinstance(batch, dict) else 0
        self._unchecked = True
        self._nonfinite.note_loss(loss, self.global_step, self.current_epoch,
                                  None if index is None else [index], samples)
        if batch is not None:
            self._window.append((index, samples))

    def _param_names_and_grads(self) -> tuple[list[str], list[Optional[torch.Tensor]]]:
        named = list(self.recipe.named_parameters())
        return [n for n, _ in named], [p.grad for _, p in named]

    def _scaler(self) -> Any:
        trainer = self._trainer
        return getattr(getattr(trainer, "precision_plugin", None), "scaler", None) if trainer is not None else None

    def _note_grads(self) -> None:
        """Record the first non-finite gradients of the recipe (after DDP's all-reduce, fp16's unscaling and the
        whole accumulation window; before clipping): device ops only. Under fp16's GradScaler only on a step
        whose loss went bad here: gradient overflow alone is the scaler's to handle."""
        _, grads = self._param_names_and_grads()
        window = self._window
        parts = None if not window or any(i is None for i, _ in window) else [i for i, _ in window]
        gate = None
        if self._scaler() is not None and self._nonfinite.loss is not None:
            gate = self._nonfinite.loss[0] == self.global_step
        self._unchecked = True
        self._nonfinite.note_grads(grads, self.global_step, self.current_epoch, parts,
                                   sum(n for _, n in window), gate)

    def _distributed(self) -> bool:
        trainer = self._trainer
        return (trainer is not None and trainer.world_size > 1 and dist.is_available() and dist.is_initialized())

    def _any_rank_non_finite(self) -> bool:
        """The one host read of a check: this rank's flag, all-reduced (MAX) under DDP so every rank decides
        alike at the same point (no rank is left waiting in a collective)."""
        flag = self._nonfinite.flag()
        if self._distributed():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _report(self, found: str) -> dict:
        """Every rank's record (all_gather under DDP) -> the facts of the first non-finite event."""
        packed = self._nonfinite.pack(self.global_step)
        if self._distributed():
            rows = [torch.empty_like(packed) for _ in range(dist.get_world_size())]
            dist.all_gather(rows, packed)
        else:
            rows = [packed]
        records = [unpack(row.tolist(), rank, self._nonfinite.k) for rank, row in enumerate(rows)]
        names, _ = self._param_names_and_grads()
        return build_report(records, names, found, self.nonfinite)

    def _write_report(self, report: dict) -> str:
        """``<default_root_dir>/nonfinite_report.json`` (rank 0, atomic); returns what the message says of it."""
        trainer = self._trainer
        if trainer is None:
            return ""
        path = Path(trainer.default_root_dir) / REPORT_NAME
        if trainer.is_global_zero:
            from vitlab.lit.callbacks import atomic_write_text

            try:
                atomic_write_text(path, json.dumps(report, indent=2, default=str) + "\n")
            except OSError as e:                      # the error to raise is the non-finite value, not this
                log.warning("could not write %s: %s", path, e)
                return f" (the report could not be written to {path}: {e})"
        return f" Report: {path}."

    def _stop(self, report: dict, text: str, hints: str) -> None:
        report["message"] = text + " " + hints
        where = self._write_report(report)
        raise FloatingPointError(f"{text}{where} {hints}")

    def _loss_check_due(self) -> bool:
        trainer = self._trainer
        if trainer is None:                          # called outside a Trainer: check at once
            return True
        if self.loss_check_interval is None:
            return is_logging_step(trainer)
        return training_batch_number(trainer) % self.loss_check_interval == 0

    def _interval_text(self) -> str:
        trainer = self._trainer
        if trainer is None:
            return "at once (no trainer)"
        every = self.loss_check_interval or trainer.log_every_n_steps
        source = "loss_check_interval" if self.loss_check_interval else "trainer.log_every_n_steps"
        return f"by the check at step {self.global_step} (every {every} steps, {source})"

    def check_loss(self, where: str, defer: bool = False) -> None:
        """Raise FloatingPointError (and write the report) if a non-finite training loss or gradient was seen
        (one host read of the flag; under DDP every rank must call it at the same point). ``defer``: a loss that
        went bad in the current step stops the run after this step's backward, in ``on_before_optimizer_step``,
        so the report can name the first layer with a non-finite gradient. With ``skip`` every step is decided
        in optimizer_step and nothing non-finite reaches the weights: nothing to check here."""
        if self.nonfinite == "skip" or self._nonfinite.loss is None or not self._unchecked:
            return
        self._unchecked = False
        if not self._any_rank_non_finite():
            return
        report = self._report(where)
        if defer and self._trainer is not None and report["step"] == self.global_step \
                and self._nonfinite.inspected_step < self.global_step:
            self._nonfinite_pending = where
            return
        self._stop(report, describe(report), HINTS + " Or set fault.nonfinite=skip to drop such steps.")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.nonfinite == "skip":      # a Python number: skip mode reads the device every step anyway
            self.log("train/skipped_steps", float(self._skipped_total), on_step=True, on_epoch=True,
                     reduce_fx="max", batch_size=self._batch_size(batch))

    def on_train_epoch_end(self) -> None:
        self.check_loss(f"at the end of epoch {self.current_epoch}")

    def on_train_end(self) -> None:
        self.check_loss("at the end of training")

    def _eval_step(self, batch: dict, prefix: str, metrics) -> None:
        out = self.eval_recipe().evaluation_step(batch) or {}
        bs = self._batch_size(batch)
        for k, v in out.items():
            if k not in ("logits", "target") and torch.is_tensor(v) and v.ndim == 0:
                self.log(f"{prefix}/{k}", v, on_epoch=True, prog_bar=prefix == "val" and k == "loss",
                         sync_dist=True, batch_size=bs)
        if self.dense and "preds" in out:    # mAP / mIoU: accumulated here, computed at the end of the epoch
            metrics.update(out["preds"], out["target"])
        elif "logits" in out:          # pretraining recipes have no classifier to score
            metrics.update(out["logits"], out["target"])
            self.log_dict({f"{prefix}/{k}": m for k, m in metrics.items()}, on_epoch=True,
                          prog_bar=prefix == "val", batch_size=bs)

    def _log_dense_metrics(self, prefix: str, metrics) -> None:
        """A dense task's epoch metrics (val/map, val/map_50, ... or val/miou, val/pixel_acc, ...). torchmetrics
        gathers every rank's state in compute(), so each rank logs the same global value."""
        if not self.dense:
            return
        values = self.eval_recipe().task.compute_metrics(metrics)
        metrics.reset()
        main = getattr(self.recipe.task, "monitor", "").rpartition("/")[2]
        for k, v in values.items():
            self.log(f"{prefix}/{k}", v.to(self.device) if torch.is_tensor(v) else float(v), on_epoch=True,
                     prog_bar=prefix == "val" and k == main, sync_dist=False)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_dense_metrics("val", self.val_metrics)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.eval_split, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_dense_metrics(self.eval_split, self.test_metrics)

    # -------------------------------------------------------- optimizer ---
    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise RuntimeError("this module was loaded for evaluation; it has no optimizer factory")
        opt = self.optimizer_factory(self.recipe)
        opt = self._unfused_if_scaled_and_clipped(opt)
        if isinstance(opt, SAM):
            self._check_sam()
            if self.nonfinite == "skip":
                raise ValueError("fault.nonfinite=skip cannot be used with optim=sam: SAM's step runs the forward "
                                 "and backward passes itself (twice), so a step cannot be checked before it is "
                                 "taken. Set fault.nonfinite=stop, or use another optimizer (optim=adamw)")
        if self._trainer is None and self.scheduler_factory is None:       # built outside a Trainer
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

    def _check_sam(self) -> None:
        """SAM runs two passes through Lightning's closure. fp16's GradScaler runs the closure itself and then calls
        step() without it; FSDP shards the weights SAM perturbs. Both are refused here, before any work."""
        trainer = self.trainer
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError("optim=sam cannot run under trainer.precision=16-mixed: fp16's GradScaler calls the "
                             "optimizer without the closure SAM needs for its second pass. Use "
                             "trainer.precision=bf16-mixed (GPU) or 32-true")
        if getattr(trainer.strategy, "shard", None) is not None:
            raise ValueError("optim=sam is not supported with trainer=fsdp (the perturbation would need the sharded "
                             "gradients' global norm); use trainer=ddp or a single device")

    def _unfused_if_scaled_and_clipped(self, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """fp16's GradScaler + gradient clipping + a fused optimizer cannot work: the fused kernel unscales the
        gradients itself, after clipping would have seen them scaled (Lightning refuses it). With optim.fused=auto
        use the unfused optimizer then; an explicit optim.fused=true gets an error that says what to change."""
        trainer = self._trainer
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None) if trainer is not None else None
        if not (opt.defaults.get("fused") and scaler is not None and trainer.gradient_clip_val):
            return opt
        if getattr(self.optimizer_factory, "keywords", {}).get("fused", "auto") != "auto":
            raise ValueError("optim.fused=true cannot be combined with trainer.precision=16-mixed and gradient "
                             "clipping (the fused kernel unscales fp16 gradients after clipping would see them): "
                             "set optim.fused=auto, or trainer.precision=bf16-mixed, or trainer.gradient_clip_val=null")
        log.info("optimizer: unfused AdamW (fp16 gradient scaling + clipping; the fused kernel cannot clip)")
        return self.optimizer_factory(self.recipe, fused=False)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:
        """Lightning's mixed-precision plugin refuses to clip for an optimizer that unscales gradients itself (a
        fused one), even under bf16-mixed, where nothing is scaled. Without a GradScaler the gradients are the true
        ones, so vitlab clips them here; with one, configure_optimizers already chose an unfused optimizer."""
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and optimizer.defaults.get("fused") and getattr(plugin, "scaler", None) is None:
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if gradient_clip_algorithm == "value":              # a str or Lightning's GradClipAlgorithmType
                torch.nn.utils.clip_grad_value_(params, float(gradient_clip_val))
            else:
                torch.nn.utils.clip_grad_norm_(params, float(gradient_clip_val))
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
            sam.first_pass_context = getattr(strategy, "block_backward_sync", contextlib.nullcontext)
            # the window's earlier micro-batches; the last one is the closure's own (it runs inside the step)
            window, self._sam_window = self._sam_window, []
            sam.second_pass_prelude = (lambda: self._replay(window, optimizer)) if window else None
        if self.nonfinite == "skip" and optimizer_closure is not None:
            # run the window's last forward/backward here (DDP all-reduces the gradients in it), decide, and hand
            # its loss on: on_before_optimizer_step and clipping still run once, inside the optimizer's step
            loss = optimizer_closure()
            if self._skip_non_finite(optimizer):
                return
            optimizer_closure = functools.partial(_identity, loss)
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._sam_window = []                         # the closure stashed its own micro-batch too
        self._window = []
        optimizer.zero_grad(set_to_none=True)
        step = self.global_step - 1                   # Lightning counted the step that was just taken
        self.recipe.on_after_optimizer_step(step, self.current_epoch)
        if self.ema is not None:
            self.ema.update(self.recipe, step)

    def _replay(self, window: list[dict], optimizer) -> None:
        """SAM with gradient accumulation: the second pass needs the gradient of the whole accumulated batch at the
        perturbed weights. Lightning's closure recomputes only the window's last micro-batch, so the earlier ones are
        recomputed here first, without DDP gradient sync (the closure's backward then all-reduces the sum)."""
        scale = 1.0 / self.trainer.accumulate_grad_batches
        strategy = self.trainer.strategy
        with getattr(strategy, "block_backward_sync", contextlib.nullcontext)():
            for batch in window:
                loss = self.recipe.training_step(batch)["loss"] * scale
                strategy.backward(loss, optimizer)

    def _skip_non_finite(self, optimizer) -> bool:
        """``fault.nonfinite=skip``, after the window's backward: True (and the step dropped, its gradients freed)
        when a loss of the window or the gradients are non-finite on any rank. One host read (+ an all-reduce)."""
        self._note_grads()
        self._window = []
        self._unchecked = False
        if not self._any_rank_non_finite():
            self._skipped_streak, self._streak_first = 0, None
            return False
        report = self._report(f"at step {self.global_step}, which was skipped (fault.nonfinite=skip)")
        self._nonfinite.reset()
        optimizer.zero_grad(set_to_none=True)
        self._skipped_total += 1
        self._skipped_streak += 1
        self._streak_first = self._streak_first or report
        streak = self._skipped_streak
        if streak > self.max_skipped_steps:
            first = self._streak_first
            report = {**first, "consecutive_skipped": streak, "last_step": self.global_step,
                      "skipped_total": self._skipped_total}
            text = (f"{streak} training steps in a row had a non-finite loss or gradients (steps {first['step']} to "
                    f"{self.global_step}; fault.max_skipped_steps={self.max_skipped_steps}): the run is stopped. "
                    f"The first of them: {describe(first)}")
            self._stop(report, text, HINTS + f" Or raise fault.max_skipped_steps (now {self.max_skipped_steps}).")
        n = self._skipped_total
        if self._trainer is not None and self.trainer.is_global_zero and (n <= 10 or n % 100 == 0):
            log.warning("skipped a training step (fault.nonfinite=skip; %d so far, %d in a row, the run stops after "
                        "more than fault.max_skipped_steps=%d in a row): %s", n, streak, self.max_skipped_steps,
                        describe(report))
        return True

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.nonfinite == "stop":
            self._note_grads()
            if self._nonfinite_pending is not None:   # the loss went bad in this step: stop before the update
                found, self._nonfinite_pending = self._nonfinite_pending, None
                self.check_loss(found)
        self.recipe.on_before_optimizer_step(self.global_step, self.current_epoch)

    # ---------------------------------------------------------- sharding ---
    def configure_model(self) -> None:
        """Under ``trainer=fsdp`` (vitlab.lit.strategies.FSDP), shard the recipe: one FSDP unit per block."""
        shard = getattr(self._trainer.strategy, "shard", None) if self._trainer is not None else None
        if shard is not None and not getattr(self, "_sharded", False):
            shard(self.recipe)
            self._sharded = True

    # ------------------------------------------------------- checkpoint ---
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_loss("before writing a checkpoint (it was not written)")
        checkpoint["vitlab"] = {"config": self.config, "data_info": self.data_info, "rng": _rng_state(),
                                "wandb_run_id": self.wandb_run_id}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("vitlab", {})
        if "rng" in meta:
            _set_rng_state(meta["rng"])
        self.wandb_run_id = meta.get("wandb_run_id")
