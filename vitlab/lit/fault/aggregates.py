"""The epoch's running training sums in every checkpoint, so a run resumed mid-epoch reports the same epoch metrics
as an uninterrupted one."""

from __future__ import annotations

from typing import Any, Optional

import pytorch_lightning as pl
import torch


class EpochAggregates(pl.Callback):
    """The running sums behind epoch-level training metrics (``self.log(..., on_epoch=True)``: the epoch's mean
    ``train/loss``, ``train/top1``) travel in every checkpoint of a single-process run.

    Lightning 2.x does not checkpoint them, so a run resumed mid-epoch would report that epoch's aggregate over the
    batches after the resume only. They are added back after the first resumed batch: its sum starts at 0 + x, and
    x + saved == saved + x exactly, so the epoch's value is bit-identical to an uninterrupted run's. Under DDP each
    rank holds its own sums and only rank 0's callback state is saved: there, the interrupted epoch's training
    aggregates cover the resumed batches only (validation metrics are whole either way)."""

    _KINDS = ("mean", "sum", "max", "min")

    def __init__(self) -> None:
        self._trainer: Optional[pl.Trainer] = None
        self._pending: Optional[dict] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    @staticmethod
    def _kind(meta: Any) -> Optional[str]:
        for kind in EpochAggregates._KINDS:
            if getattr(meta, f"is_{kind}_reduction", False):
                return kind
        return None

    def state_dict(self) -> dict:
        t = self._trainer
        if t is None or t.world_size > 1 or not t.training:
            return {}
        saved = {}
        for key, rm in t.fit_loop.epoch_loop._results.items():
            if not rm.meta.on_epoch:
                continue
            if rm.is_tensor and self._kind(rm.meta):
                entry = {"kind": self._kind(rm.meta), "value": rm.value.detach().cpu().clone()}
                if entry["kind"] == "mean":
                    entry["count"] = rm.cumulated_batch_size.detach().cpu().clone()
                saved[key] = entry
            elif not rm.is_tensor:                      # a torchmetrics Metric: its states, if they add up
                metric = rm.value
                names = list(getattr(metric, "_defaults", {}))
                if names and all(getattr(metric._reductions.get(n), "__name__", "") == "dim_zero_sum" for n in names):
                    saved[key] = {"kind": "metric", "count": int(metric._update_count),
                                  "states": {n: getattr(metric, n).detach().cpu().clone() for n in names}}
        return {"epoch": t.current_epoch, "results": saved}

    def load_state_dict(self, state: dict) -> None:
        self._pending = state if state.get("results") else None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        pending, self._pending = self._pending, None
        if pending is None or pending.get("epoch") != trainer.current_epoch or trainer.world_size > 1:
            return                                       # resumed at an epoch's end: nothing was interrupted
        results = trainer.fit_loop.epoch_loop._results
        for key, s in pending["results"].items():
            rm = results.get(key)
            if rm is None:
                continue
            if s["kind"] == "metric" and not rm.is_tensor:
                for name, value in s["states"].items():
                    setattr(rm.value, name, getattr(rm.value, name) + value.to(getattr(rm.value, name).device))
                rm.value._update_count += s["count"]
            elif rm.is_tensor and s["kind"] == self._kind(rm.meta):
                value = s["value"].to(rm.value.device, rm.value.dtype)
                if s["kind"] == "max":
                    rm.value = torch.maximum(rm.value, value)
                elif s["kind"] == "min":
                    rm.value = torch.minimum(rm.value, value)
                else:
                    rm.value = rm.value + value
                if s["kind"] == "mean":
                    rm.cumulated_batch_size = rm.cumulated_batch_size + s["count"].to(rm.cumulated_batch_size.device)
