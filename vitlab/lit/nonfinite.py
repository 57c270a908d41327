"""Non-finite losses and gradients: noticed on the device, reported with where they came from.

:class:`NonFiniteTracker` keeps, on the loss's device, the first training step whose loss went non-finite (its
value, the sample indices of its batch) and the first step whose gradients did (which parameter, how many), with
tensor ops only: noting them never makes the host wait for the device. The module reads one flag back when it
checks (:meth:`flag`), and the whole record (:meth:`pack`, all ranks' under DDP) only once something was found.
:func:`build_report` turns the ranks' records into the facts of ``nonfinite_report.json`` and the error message.

Which parameter is named: the first one, in backward order, whose gradient is non-finite, i.e. the LAST in module
order (the order of ``named_parameters()``, the order of the forward pass for vitlab's models). Backward runs from
the loss towards the input and a non-finite value spreads to every layer it reaches after the one that made it, so
the first-reached layer with a non-finite gradient is where it started; the first in module order would almost
always be the patch embedding or the class token, downstream of every cause. When every gradient is non-finite the
loss itself was (backward carries a NaN loss into all of them): the report says so rather than blame a layer.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

log = logging.getLogger("vitlab.lit.module")

MAX_INDICES = 256               # sample indices kept per record (the report and the message show the first ones)
SHOWN_INDICES = 16              # in the error message
# loss record: step, epoch, value (float32 bits), samples, indices kept, indices...
_LOSS_HEAD = 5
# gradient record: step, epoch, first parameter (module order), non-finite count, parameters with a gradient,
#                  samples of the accumulation window, indices kept, indices...
_GRAD_HEAD = 7

HINTS = ("Lower optim.lr, raise sched.warmup_epochs, keep trainer.gradient_clip_val set, or train in precision=32; "
         "resume from checkpoints/last.ckpt with ckpt_path=... once fixed (no checkpoint is written after a non-finite "
         "loss).")


def _fill(t: torch.Tensor, values: dict[int, int]) -> None:
    """``t[i] = v`` for host numbers as fill kernels: ``t[i] = v`` itself copies a host scalar to the device, which
    waits for the device on CUDA."""
    for i, v in values.items():
        t[i:i + 1].fill_(v)


class NonFiniteTracker:
    """The first non-finite loss and the first non-finite gradients of a run (or, under ``fault.nonfinite=skip``,
    of the current step: :meth:`reset` after each), kept on the device. ``-1`` marks "none yet"."""

    def __init__(self, max_indices: int = MAX_INDICES):
        self.k = int(max_indices)
        self.loss: Optional[torch.Tensor] = None                # (_LOSS_HEAD + k,) long
        self.grad: Optional[torch.Tensor] = None                # (_GRAD_HEAD + k,) long
        self.inspected_step = -1                                # host: the last step whose gradients were looked at
        self._zero: Optional[torch.Tensor] = None

    def _ensure(self, device: torch.device) -> None:
        if self.loss is None or self.loss.device != device:
            self.loss = torch.full((_LOSS_HEAD + self.k,), -1, dtype=torch.long, device=device)
            self.grad = torch.full((_GRAD_HEAD + self.k,), -1, dtype=torch.long, device=device)
            self._zero = torch.zeros((), dtype=torch.float32, device=device)

    def reset(self) -> None:
        if self.loss is not None:
            self.loss.fill_(-1)
            self.grad.fill_(-1)

    def _indices(self, parts: Optional[Sequence[torch.Tensor]], device: torch.device) -> tuple[torch.Tensor, int]:
        """The first ``k`` sample indices of ``parts`` in a (k,) buffer padded with -1, and how many it holds
        (0: unknown, a batch without ``index``). Shapes are known on the host: no sync."""
        buf = torch.full((self.k,), -1, dtype=torch.long, device=device)
        if not parts:
            return buf, 0
        flat = torch.cat([p.reshape(-1).to(device=device, dtype=torch.long) for p in parts])
        kept = min(flat.numel(), self.k)
        buf[:kept] = flat[:kept]
        return buf, kept

    def note_loss(self, loss: torch.Tensor, step: int, epoch: int, indices: Optional[Sequence[torch.Tensor]],
                  samples: int) -> None:
        """Record ``loss`` if it is the first non-finite one: tensor ops only."""
        loss = loss.detach()
        self._ensure(loss.device)
        rec = self.loss
        first = ~torch.isfinite(loss) & (rec[0] < 0)                      # () bool, stays on the device
        idx, kept = self._indices(indices, loss.device)
        new = torch.empty_like(rec)
        _fill(new, {0: step, 1: epoch, 3: samples, 4: kept})
        new[2:3] = loss.float().reshape(1).view(torch.int32).long()      # the value's bits: exact, one dtype
        new[_LOSS_HEAD:] = idx
        rec.copy_(torch.where(first, new, rec))

    def note_grads(self, grads: Sequence[Optional[torch.Tensor]], step: int, epoch: int,
                   indices: Optional[Sequence[torch.Tensor]], samples: int,
                   gate: Optional[torch.Tensor] = None) -> None:
        """Record the step's gradients (``grads[i]``: parameter i's, module order; None: none) if they are the first
        non-finite ones and ``gate`` (a device bool) allows. One max-abs norm per gradient (no overflow, NaN
        propagates), the same pass gradient clipping makes; tensor ops only."""
        present = [(i, g.to_local() if hasattr(g, "to_local") else g) for i, g in enumerate(grads) if g is not None]
        # under FSDP a rank's shard of a small parameter can be empty (no inf-norm of nothing): it holds no bad value
        present = [(i, g) for i, g in present if g.numel() > 0]
        self.inspected_step = step
        if not present:
            return
        device = present[0][1].device
        self._ensure(device)
        norms = torch._foreach_norm([g for _, g in present], float("inf"))
        values = [self._zero] * len(grads)
        for (i, _), norm in zip(present, norms):
            values[i] = norm.float()
        bad = ~torch.isfinite(torch.stack(values))                                # (P,) bool
        n_bad = bad.sum()
        last = len(grads) - 1 - torch.argmax(bad.flip(0).to(torch.int32))    # backward-first: last in module order
        rec = self.grad
        first = (n_bad > 0) & (rec[0] < 0)
        if gate is not None:
            first = first & gate
        idx, kept = self._indices(indices, device)
        new = torch.empty_like(rec)
        _fill(new, {0: step, 1: epoch, 4: len(present), 5: samples, 6: kept})
        new[2:3] = last.reshape(1)
        new[3:4] = n_bad.reshape(1)
        new[_GRAD_HEAD:] = idx
        rec.copy_(torch.where(first, new, rec))

    def flag(self) -> torch.Tensor:
        """() int32 on the device: 1 once anything non-finite was recorded."""
        return ((self.loss[0] >= 0) | (self.grad[0] >= 0)).to(torch.int32)

    def pack(self, checked_step: int) -> torch.Tensor:
        """This rank's whole record as one long tensor (same size on every rank, for an all_gather)."""
        tail = torch.tensor([checked_step, self.inspected_step], dtype=torch.long, device=self.loss.device)
        return torch.cat([self.loss, self.grad, tail])


# ------------------------------------------------------------------ report ---

def _float_from_bits(bits: int) -> float:
    return float(np.array([bits], dtype=np.int64).astype(np.int32).view(np.float32)[0])


def _json_number(value: Optional[float]) -> Any:
    """nan / inf as the strings "nan" / "inf" / "-inf": strict JSON has no such numbers."""
    return value if value is None or math.isfinite(value) else str(value)


def unpack(row: Sequence[int], rank: int, max_indices: int = MAX_INDICES) -> dict:
    """One rank's packed record (a list of ints) -> a dict of facts."""
    k = max_indices
    loss, grad, tail = row[:_LOSS_HEAD + k], row[_LOSS_HEAD + k:_LOSS_HEAD + _GRAD_HEAD + 2 * k], row[-2:]
    return {"rank": rank,
            "loss_step": loss[0], "loss_epoch": loss[1], "loss": _float_from_bits(loss[2]) if loss[0] >= 0 else None,
            "loss_samples": loss[3], "loss_indices": list(loss[_LOSS_HEAD:_LOSS_HEAD + max(loss[4], 0)]),
            "grad_step": grad[0], "grad_epoch": grad[1], "grad_param": grad[2], "grad_bad": grad[3],
            "grad_total": grad[4], "grad_samples": grad[5], "grad_indices": list(grad[_GRAD_HEAD:_GRAD_HEAD
                                                                                     + max(grad[6], 0)]),
            "checked_at_step": tail[0], "inspected_step": tail[1]}


def _batch_entry(samples: int, indices: list) -> dict:
    return {"samples": int(samples), "indices": [int(i) for i in indices] if indices else None}


def build_report(records: list[dict], param_names: Sequence[str], found: str, policy: str = "stop") -> dict:
    """The facts of the first non-finite event over all ranks' records (from :func:`unpack`).

    ``step``: the first step, over ranks, with a non-finite loss or gradient. ``kind``: ``loss`` when some rank's
    loss was non-finite there (``ranks`` lists them: under DDP a rank's own loss is its own, while the gradients
    are all-reduced, so every rank sees those), else ``gradient``. ``batches``: rank -> the sample indices of the
    batch whose loss went bad (``kind=loss``) or of the accumulation window whose gradients did."""
    steps = [s for r in records for s in (r["loss_step"], r["grad_step"]) if s >= 0]
    if not steps:
        raise ValueError("no non-finite loss or gradient in these records")
    step = min(steps)
    loss_ranks = [r for r in records if r["loss_step"] == step]
    grad_ranks = [r for r in records if r["grad_step"] == step]
    kind = "loss" if loss_ranks else "gradient"
    epoch = (loss_ranks or grad_ranks)[0]["loss_epoch" if loss_ranks else "grad_epoch"]
    if kind == "loss":
        batches = {r["rank"]: _batch_entry(r["loss_samples"], r["loss_indices"]) for r in loss_ranks}
    else:
        batches = {r["rank"]: _batch_entry(r["grad_samples"], r["grad_indices"]) for r in grad_ranks}
    gradient: dict[str, Any]
    if grad_ranks:
        param = max(r["grad_param"] for r in grad_ranks)       # FSDP shards: the one backward reached first
        bad, total = max(r["grad_bad"] for r in grad_ranks), grad_ranks[0]["grad_total"]
        gradient = {"status": "non-finite", "first_layer": param_names[param] if 0 <= param < len(param_names)
                    else f"parameter #{param}", "non_finite": int(bad), "with_gradient": int(total)}
    elif max(r["inspected_step"] for r in records) >= step:
        gradient = {"status": "finite", "first_layer": None}
    else:
        gradient = {"status": "not computed", "first_layer": None}
    return {"policy": policy, "kind": kind, "step": int(step), "epoch": int(epoch), "found": found,
            "loss": {r["rank"]: _json_number(r["loss"]) for r in loss_ranks}, "ranks": [r["rank"] for r in loss_ranks],
            "world_size": len(records), "batches": batches, "gradient": gradient,
            "checked_at_step": {r["rank"]: int(r["checked_at_step"]) for r in records}}


def _indices_text(entry: dict) -> str:
    if entry["indices"] is None:
        return f"{entry['samples']} samples, indices unknown (the batch has no 'index')"
    shown = entry["indices"][:SHOWN_INDICES]
    more = entry["samples"] - len(shown)
    return f"{entry['samples']} samples, indices {shown}" + (f" (+{more} more)" if more > 0 else "")


def describe(report: dict) -> str:
    """The facts of a report in one line (no hints): what, where, which rank(s), batch, gradient."""
    step, epoch, found = report["step"], report["epoch"], report["found"]
    world = report["world_size"]
    if report["kind"] == "loss":
        value = next(iter(report["loss"].values()))
        ranks = ", ".join(str(r) for r in report["ranks"])
        text = (f"the training loss is {value} at step {step} (epoch {epoch}), found {found}. "
                f"Rank{'s' if len(report['ranks']) > 1 else ''} with a non-finite loss: {ranks} (of {world}).")
    else:
        text = (f"the gradients are non-finite at step {step} (epoch {epoch}) while the training loss was finite on "
                f"every rank, found {found}.")
    for rank, entry in report["batches"].items():
        text += f" Batch on rank {rank}: {_indices_text(entry)}."
    grad = report["gradient"]
    if grad["status"] == "non-finite":
        text += f" First layer with a non-finite gradient (the first backward reached): {grad['first_layer']}"
        if grad["non_finite"] >= grad["with_gradient"]:
            text += f" (all {grad['with_gradient']} gradients are non-finite: the loss made them so, not one layer)."
        else:
            text += f" ({grad['non_finite']} of {grad['with_gradient']} gradients non-finite)."
    elif grad["status"] == "finite":
        text += " The gradients were finite: the loss alone is non-finite (a term that has no gradient?)."
    else:
        text += " The gradients of that step were not computed (the run stopped before its backward pass)."
    return text


# ------------------------------------------------------------------ the guard ---

POLICIES = ("stop", "skip")
REPORT_NAME = "nonfinite_report.json"


def _batch_size(batch: Any) -> int:
    image = batch["image"] if isinstance(batch, dict) else None
    image = image[0] if isinstance(image, (list, tuple)) else image            # multi-crop: a list of views
    return int(image.shape[0]) if isinstance(image, torch.Tensor) else 0


class NonFiniteGuard:
    """What the Lightning module does about non-finite losses and gradients (``fault.nonfinite``), called at a
    few points of its step: :meth:`after_training_step`, :meth:`before_optimizer_step`, :meth:`decide_step`
    (skip), :meth:`check` (epoch end, training end, before a checkpoint). Each call is handed the module (for its
    step, epoch, trainer and the recipe's parameters); the guard holds only its own state.

    - ``stop`` (default): the run stops with :class:`FloatingPointError` and ``<default_root_dir>/nonfinite_report
      .json`` (written by rank 0), both naming the first bad step, its loss, the rank(s) whose loss went bad, the
      batch's sample indices and the first layer, in backward order, whose gradient went non-finite. It is noticed
      on the device at every step (the loss after the training step, the gradients, all-reduced under DDP, before
      the optimizer step) and read back (one host sync) every ``loss_check_interval`` training batches: None = on
      the steps where Lightning logs (``trainer.log_every_n_steps``), 1 = every step; also at the end of every
      epoch and of training, and before any checkpoint is written, so no checkpoint ever holds weights trained on
      a non-finite loss. Every rank checks at the same points and the flag is all-reduced there, so all ranks stop
      together. A loss found bad in its own step stops the run after that step's backward (before the update), so
      its gradients are in the report. Under fp16's GradScaler, non-finite gradients are the scaler's business (it
      skips those steps and lowers the scale): only a non-finite loss stops the run.
    - ``skip``: a step whose loss (any micro-batch of the accumulation window) or accumulated gradients are
      non-finite on any rank is dropped: no optimizer update, no EMA or recipe update, gradients freed; a warning
      with the same facts (rank 0; the first 10 skips, then every 100th) and ``train/skipped_steps``. One host read
      per step (and under DDP one all-reduce of a flag): the module runs Lightning's closure itself and asks
      :meth:`decide_step` before calling the optimizer. The skipped step still counts (``global_step`` and the LR
      schedule move on, as for the steps fp16's GradScaler skips). More than ``max_skipped_steps`` consecutive
      skipped steps stop the run with the report. Not with ``optim=sam`` (its step runs the closure twice itself).
    """

    def __init__(self, policy: str = "stop", max_skipped_steps: int = 20, check_interval: Optional[int] = None):
        if check_interval is not None and (isinstance(check_interval, bool) or not isinstance(check_interval, int)
                                           or check_interval < 1):
            raise ValueError(f"loss_check_interval must be null (check on logging steps) or an integer >= 1, "
                             f"got {check_interval!r}")
        if policy not in POLICIES:
            raise ValueError(f"fault.nonfinite must be stop (end the run with a report) or skip (drop the step), "
                             f"got {policy!r}; set fault.nonfinite=stop or fault.nonfinite=skip")
        if isinstance(max_skipped_steps, bool) or not isinstance(max_skipped_steps, int) or max_skipped_steps < 1:
            raise ValueError(f"fault.max_skipped_steps must be an integer >= 1 (how many steps in a row "
                             f"fault.nonfinite=skip may drop before the run stops), got {max_skipped_steps!r}; "
                             "e.g. fault.max_skipped_steps=20")
        self.policy, self.max_skipped_steps, self.check_interval = policy, max_skipped_steps, check_interval
        self.tracker = NonFiniteTracker()        # first non-finite loss and gradients, on the loss's device
        self._window: list[tuple[Optional[torch.Tensor], int]] = []   # (sample indices, size) per micro-batch
        self._pending: Optional[str] = None     # found in its own step: stop once its gradients are seen
        # a training step ran since the last check (the same on every rank): a check with nothing new to read is
        # skipped, so the checkpoint writes after the end-of-epoch check cost no sync and no collective
        self._unchecked = False
        self.skipped_total = 0                   # skip: steps dropped since this process started
        self._streak = 0                         # skip: steps dropped in a row ...
        self._streak_first: Optional[dict] = None   # ... and the report of the first of them

    # --------------------------------------------------------------- notes ---
    def note_loss(self, module: Any, loss: torch.Tensor, batch: Optional[dict] = None) -> None:
        """Record the first non-finite loss (with its batch's sample indices) on the device: tensor ops only, no
        host sync. The batch joins the accumulation window whose gradients :meth:`note_grads` looks at."""
        index = batch.get("index") if isinstance(batch, dict) else None
        index = index if torch.is_tensor(index) else None
        samples = _batch_size(batch) if isinstance(batch, dict) else 0
        self._unchecked = True
        self.tracker.note_loss(loss, module.global_step, module.current_epoch,
                               None if index is None else [index], samples)
        if batch is not None:
            self._window.append((index, samples))

    def note_grads(self, module: Any) -> None:
        """Record the first non-finite gradients of the recipe (after DDP's all-reduce, fp16's unscaling and the
        whole accumulation window; before clipping): device ops only. Under fp16's GradScaler only on a step whose
        loss went bad here: gradient overflow alone is the scaler's to handle."""
        grads = [p.grad for _, p in module.recipe.named_parameters()]
        window = self._window
        parts = None if not window or any(i is None for i, _ in window) else [i for i, _ in window]
        gate = None
        if _scaler(module) is not None and self.tracker.loss is not None:
            gate = self.tracker.loss[0] == module.global_step
        self._unchecked = True
        self.tracker.note_grads(grads, module.global_step, module.current_epoch, parts,
                                sum(n for _, n in window), gate)

    # ------------------------------------------------------- module hooks ---
    def after_training_step(self, module: Any, loss: torch.Tensor, batch: dict) -> None:
        """Every training step (micro-batch): note the loss; under ``stop``, check when a check is due."""
        self.note_loss(module, loss, batch)
        if self.policy == "stop" and self._check_due(module):
            self.check(module, self._interval_text(module), defer=True)

    def before_optimizer_step(self, module: Any) -> None:
        """The window's gradients are ready (``stop``): note them; a loss that went bad in this step stops now."""
        if self.policy != "stop":
            return
        self.note_grads(module)
        if self._pending is not None:
            found, self._pending = self._pending, None
            self.check(module, found)

    def after_optimizer_step(self) -> None:
        self._window = []

    def check(self, module: Any, where: str, defer: bool = False) -> None:
        """Raise FloatingPointError (and write the report) if a non-finite training loss or gradient was seen (one
        host read of the flag; under DDP every rank must call it at the same point). ``defer``: a loss that went bad
        in the current step stops the run after this step's backward, in :meth:`before_optimizer_step`, so the
        report can name the first layer with a non-finite gradient. Under ``skip`` every step is decided in
        :meth:`decide_step` and nothing non-finite reaches the weights: nothing to check here."""
        if self.policy == "skip" or self.tracker.loss is None or not self._unchecked:
            return
        self._unchecked = False
        if not self._any_rank(module):
            return
        report = self._report(module, where)
        if defer and module._trainer is not None and report["step"] == module.global_step \
                and self.tracker.inspected_step < module.global_step:
            self._pending = where
            return
        self._stop(module, report, describe(report), HINTS + " Or set fault.nonfinite=skip to drop such steps.")

    def decide_step(self, module: Any, optimizer: torch.optim.Optimizer) -> bool:
        """``skip``, after the window's backward: True (and the step dropped, its gradients freed) when a loss of the
        window or the gradients are non-finite on any rank. One host read (+ an all-reduce)."""
        self.note_grads(module)
        self._window = []
        self._unchecked = False
        if not self._any_rank(module):
            self._streak, self._streak_first = 0, None
            return False
        report = self._report(module, f"at step {module.global_step}, which was skipped (fault.nonfinite=skip)")
        self.tracker.reset()
        optimizer.zero_grad(set_to_none=True)
        self.skipped_total += 1
        self._streak += 1
        self._streak_first = self._streak_first or report
        if self._streak > self.max_skipped_steps:
            first = self._streak_first
            report = {**first, "consecutive_skipped": self._streak, "last_step": module.global_step,
                      "skipped_total": self.skipped_total}
            text = (f"{self._streak} training steps in a row had a non-finite loss or gradients (steps "
                    f"{first['step']} to {module.global_step}; fault.max_skipped_steps={self.max_skipped_steps}): "
                    f"the run is stopped. The first of them: {describe(first)}")
            self._stop(module, report, text, HINTS + f" Or raise fault.max_skipped_steps (now "
                                                     f"{self.max_skipped_steps}).")
        n = self.skipped_total
        trainer = module._trainer
        if trainer is not None and trainer.is_global_zero and (n <= 10 or n % 100 == 0):
            log.warning("skipped a training step (fault.nonfinite=skip; %d so far, %d in a row, the run stops after "
                        "more than fault.max_skipped_steps=%d in a row): %s", n, self._streak,
                        self.max_skipped_steps, describe(report))
        return True

    # ------------------------------------------------------------ helpers ---
    def _check_due(self, module: Any) -> bool:
        from vitlab.lit.host_sync import is_logging_step, training_batch_number

        trainer = module._trainer
        if trainer is None:                          # called outside a Trainer: check at once
            return True
        if self.check_interval is None:
            return is_logging_step(trainer)
        return training_batch_number(trainer) % self.check_interval == 0

    def _interval_text(self, module: Any) -> str:
        trainer = module._trainer
        if trainer is None:
            return "at once (no trainer)"
        every = self.check_interval or trainer.log_every_n_steps
        source = "loss_check_interval" if self.check_interval else "trainer.log_every_n_steps"
        return f"by the check at step {module.global_step} (every {every} steps, {source})"

    def _any_rank(self, module: Any) -> bool:
        """The one host read of a check: this rank's flag, all-reduced (MAX) under DDP so every rank decides alike
        at the same point (no rank is left waiting in a collective)."""
        flag = self.tracker.flag()
        if _distributed(module):
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def _report(self, module: Any, found: str) -> dict:
        """Every rank's record (all_gather under DDP) -> the facts of the first non-finite event."""
        packed = self.tracker.pack(module.global_step)
        if _distributed(module):
            rows = [torch.empty_like(packed) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(rows, packed)
        else:
            rows = [packed]
        records = [unpack(row.tolist(), rank, self.tracker.k) for rank, row in enumerate(rows)]
        names = [n for n, _ in module.recipe.named_parameters()]
        return build_report(records, names, found, self.policy)

    def _stop(self, module: Any, report: dict, text: str, hints: str) -> None:
        report["message"] = text + " " + hints
        where = ""
        trainer = module._trainer
        if trainer is not None:
            path = Path(trainer.default_root_dir) / REPORT_NAME
            where = f" Report: {path}."
            if trainer.is_global_zero:
                from vitlab.io import atomic_write_text

                try:
                    atomic_write_text(path, json.dumps(report, indent=2, default=str) + "\n")
                except OSError as e:                  # the error to raise is the non-finite value, not this
                    log.warning("could not write %s: %s", path, e)
                    where = f" (the report could not be written to {path}: {e})"
        raise FloatingPointError(f"{text}{where} {hints}")


def _scaler(module: Any) -> Any:
    trainer = module._trainer
    return None if trainer is None else getattr(trainer.precision_plugin, "scaler", None)


def _distributed(module: Any) -> bool:
    trainer = module._trainer
    return (trainer is not None and trainer.world_size > 1 and torch.distributed.is_available()
            and torch.distributed.is_initialized())
