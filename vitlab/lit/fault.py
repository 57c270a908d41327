"""Fault tolerance: a preempted run checkpoints and requeues, a stopped run resumes, and a run directory that
cannot hold the run stops it before any work.

- :class:`PreemptionHandler` (a callback, added by ``build_trainer`` from ``cfg.fault``): the signals in
  ``fault.preempt_signals`` (and submitit's preemption signal inside a submitit job) are recorded; at the next
  optimizer-step boundary (at an epoch's last batch: after the epoch's end) every rank agrees,
  ``checkpoints/last.ckpt`` is written mid-epoch (the loader position is in it), ``<run>/preempted.json`` says
  what happened, and :class:`Preempted` ends the fit. ``train()`` turns it
  into the requeue (submitit's own handler, or ``scontrol requeue`` under SLURM) and the exit code
  :data:`EXIT_PREEMPTED`, and logs the command that resumes the run (:func:`resume_command`). A ``-m`` sweep on
  Hydra's basic launcher is not requeued: its jobs run in one process, and only the Optuna sweeper
  (``hydra/sweeper=vitlab_optuna``) resumes a sweep.
- :func:`resolve_ckpt_path`: ``ckpt_path=auto`` and the resume of a requeued job (``ckpt_path=null`` with a marker).
- :class:`EpochAggregates`: the epoch's running training sums in every checkpoint, so a run resumed mid-epoch
  reports the same epoch metrics as an uninterrupted one.
- :func:`check_output_dir`, :func:`check_free_space`, :func:`disk_full_message`, :class:`RunDirectoryCheck`
  (a Hydra callback: before Hydra makes the run directory): clear errors for an unwritable or full disk.
- :func:`remove_stale_temp_files`: what a save killed mid-write left behind (see ``AtomicCheckpointIO``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf, read_write

from vitlab.lit.callbacks import atomic_write_text

log = logging.getLogger("vitlab")

EXIT_PREEMPTED = 75                 # EX_TEMPFAIL (sysexits.h): stopped on purpose, run the same command again
MARKER = "preempted.json"           # in the run directory while a preempted run waits to be resumed
HISTORY = "preemptions.jsonl"       # every consumed marker, one line each (when the run was stopped and resumed)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# AtomicCheckpointIO's temporary files: ".<name>.<mkstemp's 8 random characters>.tmp" next to the checkpoint
_TEMP_CKPT = re.compile(r"^\.[^/]+\.ckpt\.[A-Za-z0-9_]{8}\.tmp$")


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


class RunDirError(Exception):
    """The run directory cannot hold the run (the message names the directory, the cause and the fix)."""


def env_rank() -> int:
    """This process's global rank before any trainer exists (Lightning reads the same variables)."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


# ------------------------------------------------------------- run directory ---

def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def parse_size(value: Union[int, float, str]) -> int:
    """``fault.min_free_space``: bytes as a number or with a unit ("500MB", "2GiB")."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([KMGT]?)(i?)B?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ValueError(f"fault.min_free_space={value!r} is not a size: use auto, 0 (off), a number of bytes or "
                         "a size like 500MB or 20GB")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index((m.group(2) or "_").upper()))


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def _dir_message(path: Path, err: OSError, verb: str, where: Path) -> str:
    cause = f"writing in {where} failed: [Errno {err.errno}] {err.strerror}" if err.strerror else str(err)
    if err.errno in DISK_FULL:
        return (f"cannot {verb} the run directory {path}: {cause} (the disk is full, or a quota or file-size limit "
                "(ulimit -f) is reached). Free some space, or put the run on another disk: "
                "paths.output_dir=/other/disk/DIR (or VITLAB_ROOT=/other/disk for every run)")
    return (f"cannot {verb} the run directory {path}: {cause}. Choose a writable place: paths.output_dir=DIR "
            "(or VITLAB_ROOT=DIR, under which runs go to outputs/)")


def _probe(folder: Path, nbytes: int) -> None:
    """Write (and fsync: delayed allocation reports a full disk only then) ``nbytes`` in ``folder``."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=".vitlab-probe-")
    try:
        with os.fdopen(fd, "wb") as f:
            chunk = b"\0" * min(nbytes, 1 << 20)
            left = nbytes
            while left > 0:
                f.write(chunk[:left])
                left -= len(chunk)
            f.flush()
            os.fsync(f.fileno())
    finally:
        Path(name).unlink(missing_ok=True)


def check_output_dir(path: Union[str, Path], probe_bytes: int = 1 << 20) -> None:
    """The run directory exists and takes a ``probe_bytes`` write, or can be made. Nothing is created when it does
    not exist yet (the probe goes to a temporary folder in its nearest existing parent), so this can run before
    Hydra decides the directory. Raises :class:`RunDirError`."""
    path = Path(os.path.abspath(path))
    existing = _existing_ancestor(path)
    if not existing.is_dir():
        raise RunDirError(f"cannot create the run directory {path}: {existing} is a file, not a folder. Choose "
                          "another place: paths.output_dir=DIR (or VITLAB_ROOT=DIR, under which runs go to outputs/)")
    verb = "write to" if existing == path else "create"
    try:
        if existing == path:
            _probe(path, probe_bytes)
        else:
            scratch = Path(tempfile.mkdtemp(dir=existing, prefix=".vitlab-probe-"))
            try:
                _probe(scratch, probe_bytes)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    except OSError as e:
        raise RunDirError(_dir_message(path, e, verb, existing)) from e


def checkpoint_bytes(module: torch.nn.Module, optimizer: str = "adamw") -> int:
    """An estimate of one checkpoint's size: the weights and buffers (an EMA copy included: it is a submodule),
    plus the optimizer's per-parameter state (AdamW: 2 copies, SGD with momentum and SAM's saved point: 1)."""
    weights = sum(t.numel() * t.element_size() for t in module.state_dict().values() if torch.is_tensor(t))
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return int(weights + _optimizer_copies(optimizer) * trainable)


def _optimizer_copies(optimizer: str) -> int:
    name = str(optimizer).lower()
    if name.startswith("sam"):
        return 1 + _optimizer_copies(name.partition(":")[2] or "adamw")
    if name.startswith("sgd"):
        return 0 if name.endswith(":0") else 1
    return 2                             # AdamW, Adam, LAMB, ... (or unknown: the common case)


def _optimizer_name(cfg: DictConfig) -> str:
    o = cfg.get("optim") or {}
    name = str(o.get("name", "adamw"))
    if name == "sam":
        return f"sam:{o.get('base', 'adamw')}"
    if name == "sgd":
        return f"sgd:{0 if not o.get('momentum') else 1}"
    return name


def check_free_space(cfg: DictConfig, output_dir: Union[str, Path], module: Optional[torch.nn.Module] = None
                     ) -> None:
    """``fault.min_free_space`` bytes free where checkpoints go (auto: 3 checkpoints' worth: best.ckpt, last.ckpt and
    the temporary file of the next atomic write of last.ckpt, less the checkpoints a resumed run already has there:
    they are overwritten, but at least one checkpoint's worth). Raises :class:`RunDirError`."""
    setting = (cfg.get("fault") or {}).get("min_free_space", "auto")
    where = Path(output_dir) / "checkpoints"
    if setting in (None, "auto"):
        if module is None:
            return
        one = checkpoint_bytes(module, _optimizer_name(cfg))
        have = sum(p.stat().st_size for p in where.glob("*.ckpt") if p.is_file()) if where.is_dir() else 0
        needed, how = 3 * one, f"3 checkpoints of ~{_human(one)}: best, last and the next last being written"
        if have:
            needed = max(one, 3 * one - have)
            how += f", less the {_human(have)} of checkpoints already in {where}"
    else:
        needed, how = parse_size(setting), f"fault.min_free_space={setting}"
    if needed <= 0:
        return
    free = shutil.disk_usage(_existing_ancestor(where)).free
    if free < needed:
        raise RunDirError(f"not enough free space for the checkpoints in {where}: {_human(free)} free, "
                          f"{_human(needed)} needed ({how}). Free some space, put the run on another disk "
                          "(paths.output_dir=/other/disk/DIR or VITLAB_ROOT=/other/disk), or turn this check off "
                          "with fault.min_free_space=0")
    log.info("free space for checkpoints: %s (%s needed: %s)", _human(free), _human(needed), how)


def disk_full_message(exc: BaseException, output_dir: Union[str, Path]) -> Optional[str]:
    """The message for a write that failed on a full disk during training (None for any other error). torch.save
    reports it as a RuntimeError whose context is the OSError, so the whole chain is searched."""
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            break
        e = e.__cause__ or e.__context__
    else:
        return None
    last = Path(output_dir) / "checkpoints" / "last.ckpt"
    state = "there is no checkpoint yet"
    if last.is_file():
        try:
            step = torch.load(last, map_location="cpu", weights_only=False, mmap=True).get("global_step", "?")
            state = f"the last complete checkpoint is {last} (step {step}): a failed write never replaces it"
        except Exception:                # noqa: BLE001 - the message must not fail
            state = f"the last checkpoint is {last}"
    return (f"a write in {output_dir} failed during training: {e} (the disk is full, or a quota or file-size limit "
            f"is reached); {state}. Free some space (or move the run directory to another disk and point "
            "paths.output_dir at it), then resume with ckpt_path=auto and the same paths.output_dir")


def remove_stale_temp_files(ckpt_dir: Union[str, Path]) -> list[Path]:
    """Temporary checkpoint files a killed save left in ``ckpt_dir`` (only AtomicCheckpointIO's own name pattern,
    only in that folder). Call it before the run writes: a live save's file looks the same."""
    folder = Path(ckpt_dir)
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if _TEMP_CKPT.match(p.name) and p.is_file():
                size = p.stat().st_size
                p.unlink(missing_ok=True)
                removed.append(p)
                log.info("removed %s (%s), left by a checkpoint write that was killed", p, _human(size))
    return removed


# ------------------------------------------------------------------- resume ---

def resolve_ckpt_path(cfg: DictConfig, output_dir: Union[str, Path]) -> Optional[str]:
    """The checkpoint a run starts from: an explicit ``ckpt_path`` as given; ``auto``: the run directory's
    checkpoints/last.ckpt when there is one (else a fresh run); ``null``: a fresh run, unless the run directory holds
    a preemption marker and its checkpoint (a requeued job resumes by itself). The marker is consumed by
    :class:`PreemptionHandler` once training restarts, so a later crash is not taken for a preemption."""
    value = cfg.get("ckpt_path")
    out = Path(output_dir)
    last, marker = out / "checkpoints" / "last.ckpt", out / MARKER
    say = log.info if env_rank() == 0 else log.debug
    if value not in (None, "auto"):
        return str(value)
    if value == "auto":
        if last.is_file():
            say("ckpt_path=auto: resuming from %s", last)
            return str(last)
        say("ckpt_path=auto: no checkpoint at %s yet: a fresh run", last)
        return None
    if marker.is_file():
        if last.is_file():
            info = _read_json(marker)
            if env_rank() == 0:
                log.warning("RESUMING A PREEMPTED RUN: %s says it stopped on %s at step %s (%s); continuing from %s. "
                            "(ckpt_path=null resumes a preempted run by itself; to start afresh, use another "
                            "paths.output_dir)", marker, info.get("signal", "?"), info.get("step", "?"),
                            info.get("time", "?"), last)
            return str(last)
        say("%s exists but %s does not: a fresh run", marker, last)
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _requeue_pointer(root_dir: Union[str, Path], job: str) -> Path:
    """Where a preempted plain-SLURM job notes its run directory, for the requeued job (a new Hydra start, whose
    default run directory would be a new timestamp) to find it again: see :class:`RunDirectoryCheck`."""
    return Path(root_dir) / ".vitlab" / "requeue" / f"slurm-{job}.json"


def resume_command(output_dir: Union[str, Path]) -> str:
    """The command that resumes a preempted run: its default run directory is a new timestamp, so "the same
    command" alone starts afresh; ``paths.output_dir=<this run>`` goes back to it, and the marker there picks the
    checkpoint. The job's own overrides are kept (without -m: for a sweep's job, this one job), ``ckpt_path`` and
    the run directory's keys are left out."""
    overrides: list[str] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            skip = ("paths.output_dir", "ckpt_path", "hydra.run.dir")
            overrides = [o for o in HydraConfig.get().overrides.task if o.split("=", 1)[0].lstrip("+~") not in skip]
    except Exception:                    # noqa: BLE001 - the hint must not fail: the run dir alone is enough
        pass
    where = f"paths.output_dir={os.path.abspath(output_dir)}"
    return " ".join(shlex.quote(a) for a in ["vitlab-train", *overrides, where])


def _basic_multirun() -> bool:
    """A ``-m`` sweep whose jobs run one after the other in this process (basic sweeper and launcher): exit 75
    ends the whole sweep, and a rerun (or a requeue) of the sweep command starts a new sweep from its first job."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return False
        hc = HydraConfig.get()
        return hc.mode == RunMode.MULTIRUN and "BasicLauncher" in str(hc.launcher.get("_target_", "")) \
            and "BasicSweeper" in str(hc.sweeper.get("_target_", ""))
    except Exception:                    # noqa: BLE001 - another Hydra: assume not
        return False


def slurm_job_key() -> Optional[str]:
    """The id ``scontrol requeue`` takes (``<array job>_<task>`` for an array task); None outside a batch job
    (an interactive allocation cannot be requeued)."""
    if os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def scontrol_requeue(job: str) -> bool:
    """``scontrol requeue <job>``; a failure is logged (the checkpoint is written either way)."""
    try:
        res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("preemption: `scontrol requeue %s` failed: %s; the job is not requeued (resume it with the same "
                  "command)", job, e)
        return False
    if res.returncode != 0:
        log.error("preemption: `scontrol requeue %s` exited with %d: %s; the job is not requeued (resume it with "
                  "the same command)", job, res.returncode, (res.stderr or res.stdout).strip())
        return False
    log.warning("preemption: SLURM job %s requeued", job)
    return True


# --------------------------------------------------------------- preemption ---

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
        if _basic_multirun():
            return None, ("none (a -m sweep on the basic launcher: a requeued job would start the sweep afresh; only "
                          "hparams_search=... / hydra/sweeper=vitlab_optuna resumes a sweep)")
        if self._submitit is not None:
            handler, sig = self._submitit
            return (lambda: handler(sig, None)), "submitit (its preemption handler requeues the job)"
        job = slurm_job_key()
        if job:
            pointer = _requeue_pointer(self.root_dir, job)

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
        info = _read_json(marker)
        resumed = trainer.ckpt_path
        info.update(resumed_from=str(resumed) if resumed else None, resumed_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    resumed_step=trainer.global_step)
        with open(self.output_dir / HISTORY, "a") as f:
            f.write(json.dumps(info) + "\n")
        marker.unlink(missing_ok=True)
        job = slurm_job_key()
        if job:
            _requeue_pointer(self.root_dir, job).unlink(missing_ok=True)
        if resumed:
            log.warning("resumed the run preempted by %s at step %s, at step %d (from %s); the marker moved to %s",
                        info.get("signal", "?"), info.get("step", "?"), trainer.global_step, resumed,
                        self.output_dir / HISTORY)
        else:
            log.warning("%s was left by a preempted run, but this run started afresh: moved to %s", marker,
                        self.output_dir / HISTORY)


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
        if _basic_multirun():
            log.warning("this job is one of a -m sweep run in this process (the basic launcher): the exit ends the "
                        "sweep, and running the sweep command again starts a new sweep from its first job (only "
                        "hparams_search=... / hydra/sweeper=vitlab_optuna resumes a sweep). Resume this job with the "
                        "command above; the sweep's later jobs have not run")
    sys.stdout.flush()
    raise SystemExit(EXIT_PREEMPTED)


def fault_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """:class:`EpochAggregates` and the :class:`PreemptionHandler` of the ``fault:`` block. build_trainer adds them
    after the configured callbacks, so the run's history already holds a step when its preemption checkpoint is
    written, and the epoch's sums are whole again before it."""
    f = cfg.get("fault") or {}
    signals = f.get("preempt_signals", ["SIGUSR1", "SIGTERM"])
    signals = OmegaConf.to_container(signals) if OmegaConf.is_config(signals) else (signals or [])
    handler = PreemptionHandler(cfg.paths.output_dir, signals, f.get("requeue", "auto"), f.get("sync_every_n_steps", 1),
                                root_dir=cfg.paths.get("root_dir", "."))
    return [EpochAggregates(), handler]


def prepare_run_dir(cfg: DictConfig, output_dir: Union[str, Path]) -> Optional[str]:
    """Before building the run (every rank): the run directory takes a write, a killed save's temporary files are
    removed (rank 0), and the checkpoint to start from is decided. Raises :class:`RunDirError`."""
    out = Path(output_dir)
    check_output_dir(out)
    if env_rank() == 0:
        remove_stale_temp_files(out / "checkpoints")
    return resolve_ckpt_path(cfg, out)


# -------------------------------------------------------- the Hydra callback ---

class RunDirectoryCheck(HydraCallback):
    """Before Hydra makes the run directory (``hydra.run.dir``, or ``hydra.sweep.dir`` for -m): it must be creatable
    and writable, else exit 2 with the fix (Hydra's own error is a traceback). A requeued plain-SLURM job whose
    preempted run noted its directory goes back to it (its default directory would be a new timestamp)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        job = slurm_job_key()
        if job and int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
            try:
                root = config.paths.root_dir
            except Exception:                  # noqa: BLE001 - another config layout: nothing to find
                root = None
            pointer = _requeue_pointer(root, job) if root is not None else None
            run_dir = _read_json(pointer).get("run_dir") if pointer is not None and pointer.is_file() else None
            if run_dir and (Path(run_dir) / MARKER).is_file():
                with read_write(config.hydra.run):
                    config.hydra.run.dir = run_dir
                print(f"[vitlab] requeued SLURM job {job}: back to the preempted run's directory {run_dir}",
                      file=sys.stderr, flush=True)
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")

    @staticmethod
    def _check(config: DictConfig, key: str) -> None:
        try:
            path = str(OmegaConf.select(config, key))
        except Exception:                      # noqa: BLE001 - an unresolvable dir is Hydra's to report
            return
        try:
            check_output_dir(path)
        except RunDirError as e:
            print(f"vitlab: error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
