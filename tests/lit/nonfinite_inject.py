"""Test-only callbacks that make a training step non-finite on purpose (tests/lit/test_nonfinite.py).

Usable from the command line too: ``+callbacks.poison._target_=tests.lit.nonfinite_inject.PoisonSample`` (from the
repository root, where ``tests`` is importable).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import pytorch_lightning as pl
import torch


class PoisonSample(pl.Callback):
    """NaN pixels in the sample at ``position`` of the training batches ``batches`` (0-based, this rank's count)
    on rank ``rank``: that sample's logits, the batch's loss and every gradient go NaN. The poisoned batches' sample
    indices are kept in ``self.seen`` and, with ``record``, written to ``{record}.rank{R}.json``."""

    def __init__(self, batches: Sequence[int] = (2,), position: int = 0, rank: int = 0,
                 record: Optional[str] = None):
        self.batches, self.position, self.rank, self.record = set(batches), int(position), int(rank), record
        self.seen: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx not in self.batches or trainer.global_rank != self.rank:
            return
        batch["image"][self.position] = float("nan")           # the batch is on the device already: in place
        self.seen[batch_idx] = {"step": trainer.global_step, "indices": batch["index"].tolist(),
                                "poisoned": int(batch["index"][self.position])}
        if self.record:
            Path(f"{self.record}.rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))


class _InfBackward(torch.autograd.Function):
    """Identity forward; its backward multiplies the incoming gradient by inf (inf, or NaN where it was 0)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class InfGradientAt(pl.Callback):
    """Make the gradient non-finite from the output of the recipe's submodule ``module`` (e.g.
    ``backbone.blocks.1.mlp.fc1``) during training batch ``batch``: the loss stays finite, that layer's parameters
    and everything backward reaches after it get non-finite gradients, the layers after it in the forward pass
    keep finite ones."""

    def __init__(self, module: str, batch: int = 1):
        self.module, self.batch = module, int(batch)
        self.armed = False
        self._handle = None

    def on_train_start(self, trainer, pl_module) -> None:
        target = pl_module.recipe.get_submodule(self.module)
        self._handle = target.register_forward_hook(lambda m, i, out: _InfBackward.apply(out) if self.armed else out)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.armed = batch_idx == self.batch

    def on_train_end(self, trainer, pl_module) -> None:
        if self._handle is not None:
            self._handle.remove()
