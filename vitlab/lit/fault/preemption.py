"""Preemption: a signal -> ``checkpoints/last.ckpt`` at the next step boundary -> a requeue and exit code 75."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from vitlab.io import atomic_write_text
from vitlab.lit.fault.common import EXIT_PREEMPTED, HISTORY, MARKER, env_rank, read_json
from vitlab.lit.fault.resume import resume_command
from vitlab.lit.fault.slurm import basic_multirun, requeue_pointer, scontrol_requeue, slurm_job_key

log = logging.getLogger("vitlab")


class Preempted(Exception):
    """Raised by :class:`PreemptionHandler` on every rank once the preemption checkpoint is written. ``requeue``
    (global rank 0 only) requeues the job; :func:`exit_preempted` runs it and exits."""

    def __init__(self, signal_name: str, step: int, epoch: int, checkpoint: str,
                 requeue: Optional[Callable[[], None]] = None, requeue_text: str = "none", resume: str = ""):
        super().__init__(f"preempted by {signal_name} at step {step} (epoch {epoch}); {checkpoint} holds the run; "
                         f"requeue: {requeue_text}")
        self.signal_name, self.step, self.epoch, self.checkpoint = signal_name, step, epoch, checkpoint
        self.requeue, self.requeue_text = requeue, requeue_text
        self.resume = resume or resume_command(Path(checkpoint).parent.parent)


def _signal_number(name: Union[str, int]) -> signal.Signals:
    text = str(name).strip().upper()
    if text.isdigit():
        return signal.Signals(int(text))
    try:
        return signal.Signals[text if text.startswith("SIG") else "SIG" + text]
    except KeyError:
        raise ValueError(f"fault.preempt_signals: unknown signal {name!r}; use names like [SIGUSR1, SIGTERM] "
                         "(or [] to turn preemption handling off)") from None


class PreemptionHandler(pl.Callback):
    """A preemption signal -> ``checkpoints/last.ckpt`` at the next step boundary -> a requeue.

    The signal handlers are installed in ``on_train_start``: Lightning installs its own SIGTERM (and, under SLURM,
    SIGUSR1) handlers after ``on_fit_start``, and restores the handlers from before the fit at teardown, which also
    removes these. Inside a submitit job, submitit's preemption signal (``SUBMITIT_PREEMPT_SIGNAL``, USR2) is handled
    too, and submitit's own handler is kept to requeue with. A handler only records the signal (no I/O, no torch).

    At the end of a training batch that ends an accumulation window (a mid-window checkpoint would lose the
    window's gradients) the ranks agree: one process reads its flag; under DDP every ``sync_every_n_steps`` steps
    an all_reduce(MAX) of a CPU int tensor (on the default group when it has gloo, else on a gloo group made once),
    so no device tensor is read per step. Then every rank writes the checkpoint (the loader position and the run's
    history are in it), rank 0 writes ``<run>/preempted.json``, and :class:`Preempted` is raised: Lightning writes
    no end-of-epoch checkpoint over it. ``train()`` requeues (rank 0: submitit's handler, else ``scontrol requeue``
    under SLURM, unless ``requeue=false``) and exits with :data:`EXIT_PREEMPTED`.

    On an epoch's last batch the decision waits for ``on_train_epoch_end``, after the epoch's validation and history
    row (and, run first there, the module's and the checkpoint callbacks' epoch end: best.ckpt): Lightning resumes a
    checkpoint written at the last batch's end as a finished epoch, and would skip them. A signal during validation
    is acted on there too. One that arrives after the last epoch's end is only logged (training is complete; its
    checkpoints are written). The same signal a second time (kill, scancel again)
    ends the process the default way, so a rank stuck in a hang can still be stopped without SIGKILL.

    ``on_train_start`` also consumes a marker left by an earlier preemption (moved to ``preemptions.jsonl``)."""

    def __init__(self, output_dir: Union[str, Path],
                 preempt_signals: Sequence[Union[str, int]] = ("SIGUSR1", "SIGTERM"),
                 requeue: Union[bool, str] = "auto", sync_every_n_steps: int = 1, root_dir: Union[str, Path] = "."):
        if requeue not in ("auto", True, False):
            raise ValueError(f"fault.requeue={requeue!r}: use auto, true or false")
        if int(sync_every_n_steps) < 1:
            raise ValueError(f"fault.sync_every_n_steps={sync_every_n_steps}: use an integer >= 1")
        self.output_dir, self.root_dir = Path(output_dir), Path(root_dir)
        self.signals = [_signal_number(s) for s in (preempt_signals or [])]
        self.requeue, self.sync_every_n_steps = requeue, int(sync_every_n_steps)
        self.received: Optional[int] = None        # the first signal number; written by the handler only
        self._seen: set[int] = set()                # every signal received: a repeat ends the process
        self._late: Optional[int] = None            # agreed on after the last epoch's end: logged only
        self._submitit: Optional[tuple[Callable, int]] = None      # (submitit's handler, its signal)
        self._group: Any = None

    # -- the handler ---------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum in self._seen:                    # asked again: the default action (terminate), now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self._seen.add(signum)                      # submitit's USR2 after a SIGTERM (or before) is the same event
        if self.received is None:
            self.received = signum

    def _install(self) -> None:
        wanted = set(self.signals)
        if wanted and (os.environ.get("SUBMITIT_EXECUTOR") or os.environ.get("SUBMITIT_FOLDER")):
            try:
                import submitit

                sig = submitit.JobEnvironment()._usr_sig()
                previous = signal.getsignal(sig)
                if callable(previous):
                    self._submitit = (previous, int(sig))
                wanted.add(sig)
            except Exception as e:      # noqa: BLE001 - not a submitit job after all
                log.debug("no submitit job environment: %s", e)
        if not wanted:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemption signals are not handled: training does not run in the main thread")
            return
        for sig in wanted:
            signal.signal(sig, self._on_signal)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.received, self._seen, self._late = None, set(), None
        if trainer.is_global_zero:
            self._consume_marker(trainer)
        self._install()
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            backends = dist.get_backend_config() if hasattr(dist, "get_backend_config") else str(dist.get_backend())
            if "gloo" not in str(backends) and "mpi" not in str(backends):
                self._group = dist.new_group(backend="gloo")       # collective: every rank is here

    # -- the decision --------------------------------------------------------
    def _at_step_boundary(self, trainer: pl.Trainer) -> bool:
        loop = trainer.fit_loop.epoch_loop
        return not loop._should_accumulate() if hasattr(loop, "_should_accumulate") else True

    def _agree(self, trainer: pl.Trainer) -> int:
        """The signal every rank acts on (0: none); a collective under DDP."""
        signum = self.received or 0
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            flag = torch.tensor([signum], dtype=torch.int64)          # CPU: no device sync
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            signum = int(flag.item())
        return signum

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._at_step_boundary(trainer) or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return                               # the epoch's last batch: on_train_epoch_end decides (see above)
        if trainer.world_size > 1 and trainer.global_step % self.sync_every_n_steps:
            return
        signum = self._agree(trainer)
        if signum:
            self._preempt(trainer, signum)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the epoch's validation (best.ckpt, last.ckpt) and the other callbacks' epoch end (the history row):
        # a checkpoint written here resumes at the next epoch's start with nothing of this one skipped
        signum = self._agree(trainer)
        if not signum:
            return
        loop = trainer.fit_loop
        done = (trainer.max_epochs is not None and 0 <= trainer.max_epochs <= loop.epoch_progress.current.processed) \
            or (trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step)
        if done:
            self._late = signum                  # training is complete: nothing to resume
            return
        # the rest of the epoch's end first: Lightning calls the module's hook and then the checkpoint callbacks'
        # (best.ckpt and last.ckpt when validation runs once per epoch) after this one, and the stop would skip them
        from pytorch_lightning.trainer import call

        call._call_lightning_module_hook(trainer, "on_train_epoch_end")
        call._call_callback_hooks(trainer, "on_train_epoch_end", monitoring_callbacks=True)
        self._preempt(trainer, signum)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        signum = self._late or self.received
        if signum and trainer.is_global_zero:
            log.warning("preemption: %s arrived after the last training step: training is complete (its checkpoints "
                        "are in %s), so the run goes on to its end instead of stopping. If it is killed before, "
                        "the test stage is what is missing: vitlab-eval ckpt=%s", signal.Signals(signum).name,
                        self.output_dir / "checkpoints", self.output_dir / "checkpoints" / "best.ckpt")

    def _preempt(self, trainer: pl.Trainer, signum: int) -> None:
        name = signal.Signals(signum).name
        step, epoch = trainer.global_step, trainer.current_epoch
        path = self.output_dir / "checkpoints" / "last.ckpt"
        if trainer.is_global_zero:
            log.warning("preemption: %s received; writing %s at step %d (epoch %d) and stopping", name, path, step,
                        epoch)
        trainer.save_checkpoint(path)                                   # every rank: it is collective
        requeue, text = self._requeue_action() if trainer.is_global_zero else (None, "rank 0 decides")
        resume = resume_command(self.output_dir) if trainer.is_global_zero else ""
        if trainer.is_global_zero:
            loader = getattr(trainer.datamodule, "state_dict", dict)().get("train_loader", {}) \
                if trainer.datamodule is not None else {}
            atomic_write_text(self.output_dir / MARKER, json.dumps(
                {"signal": name, "step": step, "epoch": epoch, "batch_in_epoch": loader.get("consumed_batches"),
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(), "pid": os.getpid(),
                 "checkpoint": str(path), "requeue": text,
                 "resume": resume,
                 "how": "paths.output_dir=<this run> (with ckpt_path=null) resumes from the checkpoint while this "
                        "file exists"}, indent=1))
        raise Preempted(name, step, epoch, str(path), requeue, text, resume)

    def _requeue_action(self) -> tuple[Optional[Callable[[], None]], str]:
        if self.requeue is False:
            return None, "off (fault.requeue=false)"
        if basic_multirun():
            return None, ("none (a -m sweep on the basic launcher: a requeued job would start the sweep afresh; only "
                          "hparams_search=... / hydra/sweeper=vitlab_optuna resumes a sweep)")
        if self._submitit is not None:
            handler, sig = self._submitit
            return (lambda: handler(sig, None)), "submitit (its preemption handler requeues the job)"
        job = slurm_job_key()
        if job:
            pointer = requeue_pointer(self.root_dir, job)

            def requeue() -> None:
                atomic_write_text(pointer, json.dumps({"run_dir": str(self.output_dir.resolve()), "job": job}))
                scontrol_requeue(job)
            return requeue, f"scontrol requeue {job}"
        if self.requeue is True:
            log.warning("fault.requeue=true, but this is not a SLURM or submitit job: nothing to requeue")
        return None, "none (not a SLURM or submitit job): run the same command to resume"

    # -- the marker of an earlier preemption --------------------------------
    def _consume_marker(self, trainer: pl.Trainer) -> None:
        marker = self.output_dir / MARKER
        if not marker.is_file():
            return
        info = read_json(marker)
        resumed = trainer.ckpt_path
        info.update(resumed_from=str(resumed) if resumed else None, resumed_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    resumed_step=trainer.global_step)
        with open(self.output_dir / HISTORY, "a") as f:
            f.write(json.dumps(info) + "\n")
        marker.unlink(missing_ok=True)
        job = slurm_job_key()
        if job:
            requeue_pointer(self.root_dir, job).unlink(missing_ok=True)
        if resumed:
            log.warning("resumed the run preempted by %s at step %s, at step %d (from %s); the marker moved to %s",
                        info.get("signal", "?"), info.get("step", "?"), trainer.global_step, resumed,
                        self.output_dir / HISTORY)
        else:
            log.warning("%s was left by a preempted run, but this run started afresh: moved to %s", marker,
                        self.output_dir / HISTORY)


def exit_preempted(exc: Preempted) -> "NoReturn":  # noqa: F821
    """After the fit stopped on :class:`Preempted`: requeue (rank 0; submitit's handler exits the process itself,
    with the code submitit expects) and exit with :data:`EXIT_PREEMPTED`. A requeue that fails (submitit refusing
    after too many timeouts, an unwritable pointer file) is logged: the checkpoint is written, the exit is 75."""
    requeue_text = exc.requeue_text
    if exc.requeue is not None:
        try:
            exc.requeue()
        except Exception as e:          # noqa: BLE001 - SystemExit (submitit's requeued exit) goes through
            requeue_text = f"FAILED ({type(e).__name__}: {e}); the job is not requeued"
            log.error("preemption: the requeue (%s) failed: %s: %s", exc.requeue_text, type(e).__name__, e)
    if env_rank() == 0:
        log.warning("preempted (%s) at step %d: %s holds the run; requeue: %s. Exit code %d. To resume it: %s",
                    exc.signal_name, exc.step, exc.checkpoint, requeue_text, EXIT_PREEMPTED, exc.resume)
        if basic_multirun():
            log.warning("this job is one of a -m sweep run in this process (the basic launcher): the exit ends the "
                        "sweep, and running the sweep command again starts a new sweep from its first job (only "
                        "hparams_search=... / hydra/sweeper=vitlab_optuna resumes a sweep). Resume this job with the "
                        "command above; the sweep's later jobs have not run")
    sys.stdout.flush()
    raise SystemExit(EXIT_PREEMPTED)
