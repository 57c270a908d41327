"""The callback that writes ``<run>/environment.json`` (:mod:`vitlab.env`) when fit starts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytorch_lightning as pl

from vitlab.env import environment_record, summary
from vitlab.io import atomic_write_text

log = logging.getLogger("vitlab")


class EnvironmentRecord(pl.Callback):
    """Versions, commit, hardware, and every rank's device and config hash. Written when fit starts rather than
    when the run is built: the processes Lightning starts open their process group inside fit, and every rank's
    entry is gathered through it."""

    def __init__(self, output_dir: str):
        self.output_dir = Path(output_dir)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = environment_record(trainer, getattr(pl_module, "config", None))
        if not trainer.is_global_zero:
            return
        path = self.output_dir / "environment.json"
        try:
            atomic_write_text(path, json.dumps(record, indent=2) + "\n")
        except OSError as e:                       # a record must never stop the run
            log.warning("environment: could not write %s (%s)", path, e)
        log.info("environment: %s", summary(record))
