"""Callbacks and plugins: run artifacts (metrics.json, curves), DDP agreement check, atomic checkpoints, and
a progress bar that reads metrics only on logging steps. :class:`HostSyncGuard` lives in vitlab/lit/host_sync.py
(re-exported here)."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import TQDMProgressBar

from vitlab.io import atomic_torch_save, atomic_write_json, atomic_write_with
from vitlab.lit.host_sync import HostSyncGuard, is_logging_step, training_batch_number  # noqa: F401 (re-exported)
from vitlab.lit.strategies import FSDP

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file, flushed and renamed: a crash mid-write
    leaves the previous checkpoint whole, never a truncated one."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Optional[Any] = None) -> None:
        atomic_torch_save(path, checkpoint)


def _scalar(v: Any) -> Optional[float]:
    if torch.is_tensor(v) and v.numel() == 1:
        return float(v.item())
    if isinstance(v, (int, float)):
        return float(v)
    return None


class PeriodicMetrics(pl.Callback):
    """A callback that logs validation metrics only every few epochs (the kNN monitor): :meth:`stale_keys` names
    the ones it did not refresh at this validation, which :class:`RunArtifacts` leaves out of the epoch's row."""

    def stale_keys(self, trainer: pl.Trainer) -> set[str]:
        return set()


class RunArtifacts(pl.Callback):
    """Writes ``metrics.json`` (final metrics, flat keys like ``val/top1``), ``history.json``
    and ``curves.png`` (train loss per step, val loss and top-1 per epoch) into the run directory."""

    def __init__(self, output_dir: str):
        self.output_dir = Path(output_dir)
        self.steps: list[tuple[int, float]] = []
        self._pending: list[tuple[int, Any]] = []          # (step, loss on the device) not yet read back
        self.epochs: list[dict] = []
        self.final: dict[str, Any] = {}
        self.curves: list[str] = ["top1", "top5"]        # the task's curve_metrics, read at fit start
        self._t0 = time.time()
        self._epoch_t0 = time.time()
        self._images = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_t0, self._images = time.time(), 0

    # The history travels in every checkpoint, so a resumed run's history.json and curves.png start at step 1,
    # not at the resume (reading the pending losses here costs one host read per checkpoint write).
    def state_dict(self) -> dict:
        self._flush()
        return {"steps": [list(s) for s in self.steps], "epochs": [dict(e) for e in self.epochs]}

    def load_state_dict(self, state: dict) -> None:
        self.steps = [(int(s), float(v)) for s, v in state.get("steps", [])]
        self.epochs = [dict(e) for e in state.get("epochs", [])]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += _batch_len(batch) * trainer.world_size
        loss = trainer.callback_metrics.get("train/loss_step")
        if loss is not None and trainer.is_global_zero:
            # kept on the device and read back together on logging steps: no host sync per step
            self._pending.append((trainer.global_step, loss.detach() if torch.is_tensor(loss) else loss))
            if is_logging_step(trainer):
                self._flush()

    def _flush(self) -> None:
        """Move the pending step losses to :attr:`steps` with one host read."""
        if not self._pending:
            return
        steps, values = zip(*self._pending, strict=True)
        self._pending = []
        if all(torch.is_tensor(v) for v in values):
            floats = torch.stack([v.float().reshape(()) for v in values]).tolist()
        else:
            floats = [float(v) for v in values]
        self.steps.extend(zip(steps, floats, strict=True))

    def on_fit_start(self, trainer, pl_module) -> None:
        # the task's declared headline metrics go on the right-hand plot (Task.curve_metrics)
        self.curves = list(pl_module.recipe.task.curve_metrics)

    def on_validation_end(self, trainer, pl_module) -> None:
        # after the module's on_validation_epoch_end: the dense tasks' epoch metrics (mAP, mIoU) are logged there,
        # and Lightning calls the callbacks' on_validation_epoch_end before the module's
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        self._flush()
        row = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        # metrics computed only every few epochs (the kNN monitor) would otherwise repeat their last value
        stale = set().union(*(cb.stale_keys(trainer) for cb in trainer.callbacks if isinstance(cb, PeriodicMetrics)))
        for k, v in trainer.callback_metrics.items():
            s = _scalar(v)
            if s is not None and k not in stale and (k.startswith("val/") or k == "train/loss_epoch"):
                row[k] = s
        seconds = time.time() - self._epoch_t0
        row["images_per_s"] = self._images / max(seconds, 1e-9)
        self.epochs.append(row)
        self._save_plot()
        # One line per epoch, also when the progress bar is off (logs of batch jobs).
        left = (trainer.max_epochs - trainer.current_epoch - 1) if trainer.max_epochs and trainer.max_epochs > 0 else 0
        shown = "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("val/"))
        log.info("epoch %d/%s  %s  %.0f img/s  %.1fs/epoch  ETA %s", trainer.current_epoch + 1,
                 trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?", shown,
                 row["images_per_s"], seconds, time.strftime("%H:%M:%S", time.gmtime(left * seconds)))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._flush()
        # read on every rank: computing callback_metrics reduces the sync_dist metrics (a collective), so reading them
        # on rank 0 alone would pair that reduction with whatever collective the other ranks issue next (a hang)
        metrics = trainer.callback_metrics
        if self.epochs and trainer.is_global_zero:
            s = _scalar(metrics.get("train/loss_epoch"))
            if s is not None:
                self.epochs[-1]["train/loss_epoch"] = s

    def _collect(self, trainer) -> None:
        for k, v in trainer.callback_metrics.items():
            s = _scalar(v)
            if s is not None and not k.endswith("_step"):
                self.final[k.removesuffix("_epoch")] = s

    def on_fit_end(self, trainer, pl_module) -> None:
        self._collect(trainer)
        self.final["train/global_step"] = trainer.global_step
        self.final["train/epochs"] = trainer.current_epoch
        self.final["train/seconds"] = round(time.time() - self._t0, 2)
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and ckpt.best_model_score is not None and ckpt.monitor:
            # val/top1 -> val/best_top1, val/loss -> val/best_loss
            prefix, _, name = str(ckpt.monitor).rpartition("/")
            self.final[f"{prefix + '/' if prefix else ''}best_{name}"] = float(ckpt.best_model_score)
        self.write(trainer)

    def on_test_end(self, trainer, pl_module) -> None:
        self._collect(trainer)
        self.write(trainer)

    def write(self, trainer) -> None:
        if not trainer.is_global_zero:
            return
        self._flush()
        atomic_write_json(self.output_dir / "metrics.json", self.final)
        atomic_write_json(self.output_dir / "history.json", {"steps": self.steps, "epochs": self.epochs}, indent=1,
                          sort_keys=False)
        self._save_plot()

    def _save_plot(self) -> None:
        if not self.steps and not self.epochs:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        if self.steps:
            s, l = zip(*self.steps)
            axes[0].plot(s, l, lw=0.6, alpha=0.5, label="train loss (step)")
        ep = [e for e in self.epochs if "val/loss" in e]
        if ep:
            axes[0].plot([e["step"] for e in ep], [e["val/loss"] for e in ep], "o-", label="val loss")
        axes[0].set_xlabel("step"), axes[0].set_ylabel("loss"), axes[0].legend(), axes[0].grid(alpha=0.3)
        curves = [(f"val/{name}", "o-" if i == 0 else "s--", f"val {name}") for i, name in enumerate(self.curves)]
        for key, style, label in curves + [("val/knn_top1", "^-", "val kNN top-1")]:
            acc = [e for e in self.epochs if key in e]
            if acc:
                axes[1].plot([e["epoch"] + 1 for e in acc], [100 * e[key] for e in acc], style, label=label,
                             alpha=0.6 if style == "s--" else 1.0)
        axes[1].set_xlabel("epoch"), axes[1].set_ylabel("score (%)"), axes[1].grid(alpha=0.3)
        if axes[1].get_legend_handles_labels()[0]:
            axes[1].legend()
        fig.tight_layout()
        try:
            atomic_write_with(self.output_dir / "curves.png", lambda f: fig.savefig(f, dpi=110, format="png"))
        finally:
            plt.close(fig)


class SaveVisuals(pl.Callback):
    """Saves the pictures a recipe draws (:meth:`vitlab.recipes.Recipe.visualize`, e.g. MAE's original / masked /
    reconstruction rows) for the first validation batch, every ``every_n_epochs``, as
    ``<output_dir>/<name>_epochNNN.png``. Images are de-normalised with the dataset's mean and std."""

    def __init__(self, output_dir: str, every_n_epochs: int = 1, max_images: int = 8):
        self.output_dir = Path(output_dir)
        self.every_n_epochs = int(every_n_epochs)
        self.max_images = int(max_images)
        self._batch: Optional[dict] = None

    def _due(self, trainer) -> bool:
        return (self.every_n_epochs > 0 and trainer.is_global_zero and not trainer.sanity_checking
                and (trainer.current_epoch + 1) % self.every_n_epochs == 0)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and self._due(trainer) and isinstance(batch, dict):
            self._batch = {k: (v[: self.max_images] if (torch.is_tensor(v) and v.ndim > 0) or isinstance(v, list)
                               else v) for k, v in batch.items()}             # lists: boxes per image

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        batch, self._batch = self._batch, None
        if batch is None or not self._due(trainer):
            return
        if isinstance(trainer.strategy, FSDP):
            # a sharded model's forward is collective: rank 0 alone would wait forever for the others
            if not getattr(self, "_warned", False):
                log.warning("visuals: none under trainer=fsdp (the model is sharded)")
                self._warned = True
            return
        recipe = pl_module.eval_recipe()
        with torch.no_grad():
            pictures = recipe.visualize(batch)
        if not pictures:
            return
        data = pl_module.data_info                      # the data's normalisation, stored with the model
        for name, rows in pictures.items():
            path = self.output_dir / f"{name}_epoch{trainer.current_epoch + 1:03d}.png"
            save_image_rows(rows, path, data.get("mean"), data.get("std"))
            log.info("saved %s", path)


class ModelCheckpoint(pl.callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint, with ``last.ckpt`` written at every save point.

    Since Lightning 2.5 the stock callback writes ``last.ckpt`` at the end of validation (or of a training epoch)
    only when a top-k checkpoint was written at the same step: once the monitored metric stops improving,
    ``last.ckpt`` stays at the best epoch and a resume silently goes back in time. Here it follows every
    validation, as its name says."""

    def _last_due(self, trainer) -> bool:
        return bool(self.save_last) and not self._should_skip_saving_checkpoint(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        due = self._last_due(trainer) and self._should_save_on_train_epoch_end(trainer)
        super().on_train_epoch_end(trainer, pl_module)
        if due and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer, pl_module) -> None:
        due = self._last_due(trainer) and not self._should_save_on_train_epoch_end(trainer)
        super().on_validation_end(trainer, pl_module)
        if due and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class SampleGrid(pl.Callback):
    """Sample grids of a generative task (``Task.draws_samples``: task=diffusion; inactive for other tasks): one row
    per class (the first
    ``max_classes``), ``per_class`` samples each, from the evaluated weights (the EMA copy) with the task's sampler
    and guidance, every ``every_n_steps`` optimizer steps and when training ends, as
    ``<output_dir>/step_NNNNNNN.png``. The noise is fixed (``seed``), so grids of successive steps show the same
    samples improving. Rank 0 draws; the other ranks go on (sampling runs no collective operation)."""

    def __init__(self, output_dir: str, every_n_steps: int = 1000, per_class: int = 8, max_classes: int = 10,
                 seed: int = 0):
        if int(every_n_steps) < 0 or int(per_class) < 1 or int(max_classes) < 1:
            raise ValueError("diffusion_samples: every_n_steps >= 0 (0: only at the end), per_class >= 1 and "
                             "max_classes >= 1")
        self.output_dir = Path(output_dir)
        self.every_n_steps, self.per_class, self.max_classes = int(every_n_steps), int(per_class), int(max_classes)
        self.seed = int(seed)
        self._last_step = -1

    @staticmethod
    def _task(pl_module) -> Any:
        recipe = pl_module.eval_recipe()
        return recipe, recipe.task if recipe.task.draws_samples else None       # the task's declaration

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.draw(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last_step:
            self.draw(trainer, pl_module)

    def draw(self, trainer, pl_module) -> Optional[Path]:
        self._last_step = trainer.global_step
        recipe, task = self._task(pl_module)
        if task is None or not trainer.is_global_zero:
            return None
        if isinstance(trainer.strategy, FSDP) and recipe is pl_module.recipe:
            # a sharded model's forward is collective: rank 0 alone would wait forever for the others
            if not getattr(self, "_warned", False):
                log.warning("diffusion_samples: no grids under trainer=fsdp (the model is sharded); draw them from "
                            "a checkpoint with vitlab-sample")
                self._warned = True
            return None
        path = self.output_dir / f"step_{trainer.global_step:07d}.png"
        save_sample_grid(task, recipe.backbone, path, per_class=self.per_class, max_classes=self.max_classes,
                         seed=self.seed, device=pl_module.device)
        log.info("saved %s", path)
        return path


def save_sample_grid(task: Any, backbone: torch.nn.Module, path: Path, per_class: int = 8, max_classes: int = 10,
                     seed: int = 0, device: Optional[torch.device] = None, **options: Any) -> torch.Tensor:
    """A generative task's rows of samples (:meth:`vitlab.tasks.base.Task.sample_rows`: a row per class, sample
    seeds seed, seed + 1, ...) saved as a PNG grid; returns the samples (n, C, H, W) in [0, 1]. ``options`` go to
    the task's sampler (sampler, steps, guidance)."""
    rows = task.sample_rows(backbone, per_class=per_class, max_classes=max_classes, seed=seed, device=device,
                            **options)
    save_image_rows(rows, path)
    return torch.cat(rows)


def save_image_rows(rows: Sequence[torch.Tensor], path: Path, mean: Optional[Sequence[float]] = None,
                    std: Optional[Sequence[float]] = None) -> None:
    """Rows of images (n, C, H, W) in normalised space -> one PNG grid (a row per entry), written atomically.
    uint8 rows are finished pictures (boxes or masks drawn on them by a dense task) and are used as they are."""
    import torchvision

    n = max(r.shape[0] for r in rows)
    tiles = []
    for r in rows:
        if r.dtype == torch.uint8:
            tiles.append(_pad_rows(r.detach().cpu().float() / 255.0, n))
            continue
        r = r.detach().float().cpu()
        if mean is not None and std is not None:
            r = r * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
        tiles.append(_pad_rows(r, n).clamp(0, 1))
    grid = torchvision.utils.make_grid(torch.cat(tiles), nrow=n, padding=1, pad_value=1.0)
    scale = max(1, 64 // max(1, rows[0].shape[-1]))                        # small images: upscale for viewing
    if scale > 1:
        grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    atomic_write_with(path, lambda f: torchvision.utils.save_image(grid, f, format="png"))


def _pad_rows(r: torch.Tensor, n: int) -> torch.Tensor:
    """Pad a short row with blank tiles to ``n`` images."""
    return torch.cat([r, torch.zeros(n - r.shape[0], *r.shape[1:])]) if r.shape[0] < n else r


class DDPAgreement(pl.Callback):
    """After fit, checks that every rank holds the same weights (a DDP desync shows here).

    Writes ``ddp/world_size`` and ``ddp/max_param_divergence`` (largest absolute
    difference from rank 0 over all parameters) into the run's metrics and
    raises if the ranks disagree.
    """

    def __init__(self, tolerance: float = 0.0):
        self.tolerance = tolerance

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.world_size < 2 or not dist.is_available() or not dist.is_initialized():
            return
        from torch.distributed.tensor import DTensor

        # FSDP: each rank holds its own shard by design (one copy of every value), nothing to compare
        sharded = any(isinstance(p, DTensor) for p in pl_module.parameters())
        divergence = None if sharded else self._max_divergence(pl_module)
        for cb in trainer.callbacks:
            if isinstance(cb, RunArtifacts):
                cb.final["ddp/world_size"] = trainer.world_size
                if divergence is not None:
                    cb.final["ddp/max_param_divergence"] = divergence
                cb.write(trainer)
        if divergence is None:
            return
        if divergence > self.tolerance:
            raise RuntimeError(f"DDP ranks disagree after training: max parameter difference {divergence:g}")
        if trainer.is_global_zero:
            log.info("DDP: %d ranks hold identical weights", trainer.world_size)

    @staticmethod
    def _max_divergence(pl_module) -> float:
        """Largest |parameter - rank 0's| over all parameters and ranks."""
        flat = torch.cat([p.detach().float().flatten() for p in pl_module.parameters()]).cpu()
        ref = flat.clone()
        dist.broadcast(ref, src=0)
        div = torch.tensor([(flat - ref).abs().max().item()])
        dist.all_reduce(div, op=dist.ReduceOp.MAX)
        return float(div.item())


# ------------------------------------------------------------- progress bar ---

def _batch_len(batch: Any) -> int:
    image = batch.get("image") if isinstance(batch, dict) else None
    if isinstance(image, (list, tuple)) and image:                 # multi-crop: a list of views of the same images
        image = image[0]
    return int(image.shape[0]) if isinstance(image, torch.Tensor) else 0


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar without a host sync per step.

    The bar advances every ``refresh_rate`` batches, with tqdm's it/s and the epoch's remaining time. The
    numbers after it are read from the device only on logging steps (:func:`is_logging_step`) and at the end
    of an epoch or a validation: ``step_metrics`` (the current step's value, default ``train/loss``),
    Lightning's progress-bar metrics (``val/*``), ``img/s`` over the last logging interval (all ranks) and
    ``eta``, the time left for the run's remaining optimizer steps at that speed (validation not included).
    Lightning's ``TQDMProgressBar`` instead reads every progress-bar metric back at each refresh.
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False,
                 step_metrics: Sequence[str] = ("train/loss",)):
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self.step_metrics = tuple(step_metrics)
        self._speed: dict[str, str] = {}
        self._since: tuple[float, int, int] = (time.perf_counter(), 0, 0)    # (time, images, global step)
        self._images = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._since = (time.perf_counter(), self._images, trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._images += _batch_len(batch) * trainer.world_size
        bar = self._train_progress_bar
        if bar is None or bar.disable or not self.is_enabled:
            return
        if is_logging_step(trainer):
            self._measure(trainer)
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        n = batch_idx + 1
        if self._should_update(n, bar.total):
            bar.n = n
            bar.refresh()

    def _measure(self, trainer: pl.Trainer) -> None:
        now = time.perf_counter()
        t0, images0, step0 = self._since
        seconds, steps = now - t0, trainer.global_step - step0
        self._since = (now, self._images, trainer.global_step)
        if seconds <= 0 or steps <= 0:
            return
        self._speed = {"img/s": f"{(self._images - images0) / seconds:.0f}"}
        total = trainer.estimated_stepping_batches
        if math.isfinite(total):
            left = max(0.0, (total - trainer.global_step) * seconds / steps)
            self._speed["eta"] = f"{int(left // 3600)}:{time.strftime('%M:%S', time.gmtime(left))}"

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        metrics = trainer.callback_metrics
        for name in self.step_metrics:
            value = metrics.get(name)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                items[name] = value.item()
        items.update(self._speed)
        return items
