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

import math
from typing import Any, Optional, Sequence

import numpy as np
import torch

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
