"""Callbacks that end-to-end tests add from the command line (``+callbacks.NAME._target_=tests.e2e.recorders.X``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl


class RecordIndices(pl.Callback):
    """Writes ``out_dir/indices-rank{R}.json``: the sample indices each training batch held, per epoch."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.epochs: dict[int, list[list[int]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.epochs.setdefault(trainer.current_epoch, []).append(batch["index"].tolist())

    def on_train_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"indices-rank{trainer.global_rank}.json"
        path.write_text(json.dumps({str(e): b for e, b in self.epochs.items()}))
