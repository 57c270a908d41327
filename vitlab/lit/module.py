"""The LightningModule: calls the recipe, logs, updates metrics, builds the optimizer."""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Optional

import numpy as np
import pytorch_lightning as pl
import torch

from vitlab.recipes import Recipe


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


class VitlabModule(pl.LightningModule):
    """Backbone + task + recipe, trained by Lightning.

    ``optimizer_factory(model) -> Optimizer`` already carries the scaled lr;
    ``scheduler_factory(optimizer, total_steps=, steps_per_epoch=)`` builds a per-step schedule.
    ``config`` (the resolved run config) is stored in every checkpoint so
    ``vitlab.load(path)`` can rebuild the model with no other input.
    """

    def __init__(self, recipe: Recipe, optimizer_factory: Optional[Callable] = None,
                 scheduler_factory: Optional[Callable] = None, config: Optional[dict] = None,
                 data_info: Optional[dict] = None, eval_split: str = "test"):
        super().__init__()
        self.recipe = recipe
        self.optimizer_factory = optimizer_factory
        self.scheduler_factory = scheduler_factory
        self.config = config
        self.data_info = data_info or {}
        self.eval_split = eval_split
        self.train_metrics = recipe.task.metrics()
        self.val_metrics = recipe.task.metrics()
        self.test_metrics = recipe.task.metrics()
        self.wandb_run_id: Optional[str] = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.recipe(images)

    # ------------------------------------------------------------ steps ---
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.recipe.training_step(batch)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the training loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}). "
                "Lower optim.lr, raise sched.warmup_epochs, keep trainer.gradient_clip_val set, or train in "
                "precision=32; resume from checkpoints/last.ckpt with ckpt_path=... once fixed.")
        bs = batch["image"].shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs, sync_dist=True)
        for k, v in out.items():
            if k not in ("loss", "logits", "target") and torch.is_tensor(v) and v.ndim == 0:
                self.log(f"train/{k}", v, on_step=True, on_epoch=True, batch_size=bs)
        if "target" in out:
            self.train_metrics["top1"](out["logits"], out["target"])
            self.log("train/top1", self.train_metrics["top1"], on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def _eval_step(self, batch: dict, prefix: str, metrics) -> None:
        out = self.recipe.evaluation_step(batch)
        bs = batch["image"].shape[0]
        self.log(f"{prefix}/loss", out["loss"], on_epoch=True, prog_bar=prefix == "val", sync_dist=True,
                 batch_size=bs)
        metrics.update(out["logits"], out["target"])
        self.log_dict({f"{prefix}/{k}": m for k, m in metrics.items()}, on_epoch=True, prog_bar=prefix == "val",
                      batch_size=bs)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.eval_split, self.test_metrics)

    # -------------------------------------------------------- optimizer ---
    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise RuntimeError("this module was loaded for evaluation; it has no optimizer factory")
        opt = self.optimizer_factory(self.recipe)
        if self.scheduler_factory is None:
            return opt
        total = int(self.trainer.estimated_stepping_batches)
        per_epoch = max(1, math.ceil(self.trainer.num_training_batches / self.trainer.accumulate_grad_batches))
        sched = self.scheduler_factory(opt, total_steps=total, steps_per_epoch=per_epoch)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------- checkpoint ---
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["vitlab"] = {"config": self.config, "data_info": self.data_info, "rng": _rng_state(),
                                "wandb_run_id": self.wandb_run_id}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("vitlab", {})
        if "rng" in meta:
            _set_rng_state(meta["rng"])
        self.wandb_run_id = meta.get("wandb_run_id")
