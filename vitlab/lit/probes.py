"""Online evaluation of the frozen representation during training: the :class:`KNNMonitor` callback.

Pretraining recipes (MAE, DINO) train no classifier, so their validation loss says little about the quality of
the features. The kNN monitor extracts features of (part of) the train split and of the val split with the
evaluation transform at the end of a validation epoch, classifies the val features by DINO's weighted kNN
(:func:`vitlab.metrics.knn_accuracy`) and logs ``val/knn_top1`` (and ``val/knn_top5``), which a checkpoint
callback can monitor.

Cost: every rank extracts the same features and computes the same value on the full data (no collectives, so
it cannot desynchronise DDP). One check costs a forward pass over ``max_train_samples`` train images plus the
val split (``max_eval_samples``) on each rank, and a (N_val x N_train) similarity matmul: with the default
10,000 train images this is a few seconds on a GPU. Lower ``max_train_samples`` or raise ``every_n_epochs`` to
make it cheaper.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import pytorch_lightning as pl
import torch

from vitlab.lit.callbacks import PeriodicMetrics
from vitlab.metrics import extract_features, knn_accuracy

log = logging.getLogger("vitlab")

Feature = Literal["pooled", "cls", "avg"]


def eval_recipe(pl_module: pl.LightningModule) -> torch.nn.Module:
    """The recipe to evaluate: the module's EMA copy when it has one (``eval_recipe()``), else its recipe."""
    return getattr(pl_module, "eval_recipe", lambda: pl_module.recipe)()


def autocast_dtype(precision: object, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for feature extraction under a Lightning ``precision`` on ``device`` (None: fp32)."""
    p = str(precision)
    if p.startswith("bf16"):                                  # bf16-mixed / bf16-true, on a GPU or the CPU
        return torch.bfloat16
    if p.startswith("16") and device.type == "cuda":          # 16-mixed / 16-true
        return torch.float16
    return None


class KNNMonitor(PeriodicMetrics):
    """Log the weighted-kNN top-1 (and top-5) of the frozen features on the val split every few epochs.

    Args:
        every_n_epochs: how often (in epochs; checked at the end of each validation epoch). ``"auto"``: every
            epoch when the recipe is a pretraining recipe (``recipe.pretraining``), else off. 0: off.
        k, temperature: DINO's kNN settings (20, 0.07).
        feature: which representation, as in ``Recipe.features``: ``pooled`` | ``cls`` | ``avg``.
        max_train_samples: train images used as the kNN reference set (evenly spaced over the split); None = all.
        max_eval_samples: val images classified; None = the whole val split.
        num_workers: loader workers for the extraction (0: in the main process, no worker start-up per check).
    """

    def __init__(self, every_n_epochs: int | Literal["auto"] = "auto", k: int = 20, temperature: float = 0.07,
                 feature: Feature = "pooled", max_train_samples: int | None = 10000,
                 max_eval_samples: int | None = None, num_workers: int = 0):
        if every_n_epochs != "auto" and (isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int)
                                         or every_n_epochs < 0):
            raise ValueError(f"every_n_epochs must be 'auto' or an integer >= 0 (0 = off), got {every_n_epochs!r}")
        if feature not in ("pooled", "cls", "avg"):
            raise ValueError(f"feature must be pooled, cls or avg, got {feature!r}")
        if k < 1 or temperature <= 0:
            raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
        for name, v in (("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be a positive number of images or null (all), got {v}")
        self.every_n_epochs = every_n_epochs
        self._fresh_epoch: int | None = None
        self.k, self.temperature, self.feature = k, temperature, feature
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.num_workers = num_workers
        self._warned_no_loader = False

    def interval(self, pl_module: pl.LightningModule) -> int:
        """Epochs between checks for this module (0 = off)."""
        if self.every_n_epochs == "auto":
            return 1 if getattr(getattr(pl_module, "recipe", None), "pretraining", False) else 0
        return int(self.every_n_epochs)

    def due(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        n = self.interval(pl_module)
        return n > 0 and not getattr(trainer, "sanity_checking", False) and (trainer.current_epoch + 1) % n == 0

    def stale_keys(self, trainer: pl.Trainer) -> set[str]:
        """The metrics this callback did not refresh at this validation (Lightning keeps a logged value until it
        is logged again): RunArtifacts leaves them out of the epoch's row of history.json."""
        return set() if self._fresh_epoch == trainer.current_epoch else {"val/knn_top1", "val/knn_top5"}

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.due(trainer, pl_module):
            return
        dm = getattr(trainer, "datamodule", None)
        loader_fn = getattr(dm, "eval_loader", None)
        if loader_fn is None:
            if not self._warned_no_loader:
                log.warning("kNN monitor: the datamodule (%s) has no eval_loader(split, ...), so there is no train "
                            "feature set to compare with; the monitor is skipped. Use vitlab's VitlabDataModule or "
                            "turn it off with callbacks.knn_monitor=null", type(dm).__name__)
                self._warned_no_loader = True
            return
        source = getattr(dm, "source", None)
        if source is not None and source.label_kind != "class":
            if not self._warned_no_loader:
                log.warning("kNN monitor: %s's labels are not one class per image (%s labels); the monitor is "
                            "skipped", source.name, source.label_kind)
                self._warned_no_loader = True
            return
        metrics, seconds, n_train, n_val = self.evaluate(trainer, pl_module, loader_fn)
        self._fresh_epoch = trainer.current_epoch
        for name, value in metrics.items():
            # every rank computed the same value from the same data: no sync needed
            pl_module.log(f"val/{name}", torch.tensor(value), sync_dist=False)
        if getattr(trainer, "is_global_zero", True):
            top5 = f", top-5 {metrics['knn_top5']:.4f}" if "knn_top5" in metrics else ""
            log.info("kNN monitor (epoch %d): val top-1 %.4f%s (k=%d, %d train / %d val images, %.1f s)",
                     trainer.current_epoch, metrics["knn_top1"], top5, self.k, n_train, n_val, seconds)

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 loader_fn) -> tuple[dict[str, float], float, int, int]:
        """Extract the train and val features and classify; returns (metrics, seconds, n_train, n_val)."""
        t0 = time.perf_counter()
        recipe = eval_recipe(pl_module)
        device = torch.device(pl_module.device)
        amp = autocast_dtype(getattr(trainer, "precision", "32-true"), device)
        # remember each submodule's mode: an EMA teacher may be kept in eval mode while the student trains
        modes = {m: m.training for m in recipe.modules()}
        recipe.eval()
        try:
            def fn(images: torch.Tensor) -> torch.Tensor:
                return recipe.features(images, self.feature)

            train_f, train_y = extract_features(
                fn, loader_fn("train", max_samples=self.max_train_samples, num_workers=self.num_workers), device,
                max_samples=self.max_train_samples, autocast_dtype=amp, desc="kNN train features")
            val_f, val_y = extract_features(
                fn, loader_fn("val", max_samples=self.max_eval_samples, num_workers=self.num_workers), device,
                max_samples=self.max_eval_samples, autocast_dtype=amp, desc="kNN val features")
        finally:
            for m, was_training in modes.items():
                m.training = was_training
        num_classes = self._num_classes(trainer, pl_module, train_y, val_y)
        metrics = knn_accuracy(train_f.to(device), train_y.to(device), val_f.to(device), val_y.to(device),
                               num_classes, k=self.k, temperature=self.temperature)
        return metrics, time.perf_counter() - t0, len(train_f), len(val_f)

    @staticmethod
    def _num_classes(trainer: pl.Trainer, pl_module: pl.LightningModule, *labels: torch.Tensor) -> int:
        source = getattr(getattr(trainer, "datamodule", None), "source", None)
        n = getattr(source, "num_classes", None) or (getattr(pl_module, "data_info", None) or {}).get("num_classes")
        return int(n) if n else int(max(int(y.max()) for y in labels)) + 1
