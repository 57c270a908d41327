"""Helpers of the fault-tolerance tests: a test-only callback the runs load by name (``+callbacks.throttle``), the
tiny run's command line, and waiting on a process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import pytorch_lightning as pl

from tests.conftest import REPO

# the digits training split at batch 64: 19 steps per epoch; a tiny ViT, so a step takes milliseconds
TINY = ["experiment=digits_vit", "backbone.embed_dim=32", "backbone.depth=1", "backbone.num_heads=2",
        "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "run_test=false", "trainer.log_every_n_steps=1",
        "trainer.accelerator=cpu", "logger=[]"]
STEPS_PER_EPOCH = 19


def throttle(delay: float, after: int = 0, until: int = 10**9) -> list[str]:
    """Overrides adding :class:`Throttle`: the steps from ``after`` to ``until`` sleep ``delay`` seconds each, so a
    test can signal or kill the run at a step it chooses (sleeping changes nothing in the maths)."""
    return ["+callbacks.throttle._target_=tests.fault.helpers.Throttle",
            "+callbacks.throttle.output_dir=${paths.output_dir}", f"+callbacks.throttle.delay={delay}",
            f"+callbacks.throttle.after={after}", f"+callbacks.throttle.until={until}"]


class Throttle(pl.Callback):
    """Writes ``<run>/progress.rank<R>`` (the global step, then this process's pid) after every training step, then
    sleeps ``delay`` seconds at the steps from ``after`` to ``until``."""

    def __init__(self, output_dir: str, delay: float = 0.0, after: int = 0, until: int = 10**9):
        self.output_dir, self.delay, self.after, self.until = Path(output_dir), float(delay), int(after), int(until)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        path = self.output_dir / f"progress.rank{trainer.global_rank}"
        path.write_text(f"{trainer.global_step} {os.getpid()}")
        if self.after <= trainer.global_step <= self.until and self.delay:
            time.sleep(self.delay)


def signal_at(step: int, signum: str = "SIGUSR1") -> list[str]:
    """Overrides adding :class:`SignalAt`: the run signals itself before training step ``step`` (0-based)."""
    return ["+callbacks.signal_at._target_=tests.fault.helpers.SignalAt", f"+callbacks.signal_at.step={step}",
            f"+callbacks.signal_at.signum={signum}"]


class SignalAt(pl.Callback):
    """Sends this process ``signum`` at the start of the batch that makes optimizer step ``step + 1`` (no timing:
    the step is exact). A resumed run past that step sends nothing."""

    def __init__(self, step: int, signum: str = "SIGUSR1"):
        self.step, self.signum = int(step), signal.Signals[signum]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
            self.step = -1


def kill_in_checkpoint_write(step: int) -> list[str]:
    """Overrides adding :class:`KillInCheckpointWrite`: the run SIGKILLs itself inside the write of the first
    ``last.ckpt`` at or after optimizer step ``step``."""
    return ["+callbacks.kill_in_write._target_=tests.fault.helpers.KillInCheckpointWrite",
            f"+callbacks.kill_in_write.step={step}"]


class KillInCheckpointWrite(pl.Callback):
    """SIGKILLs this process in the middle of writing ``last.ckpt`` (the first write at or after step ``step``):
    once the checkpoint's bytes are on disk in the writer's temporary file (its fsync), before the rename that
    would put them in place. A writer that is not vitlab's atomic one (no temporary file, no fsync) is never
    interrupted, so the run ends normally and a test that expects the kill fails."""

    def __init__(self, step: int):
        self.step = int(step)

    def setup(self, trainer, pl_module, stage) -> None:
        real = os.fsync

        def fsync(fd: int) -> None:
            real(fd)
            name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
            if trainer.global_step >= self.step and name.startswith(".last.ckpt.") and name.endswith(".tmp"):
                os.kill(os.getpid(), signal.SIGKILL)

        os.fsync = fsync


def progress(run: Path, rank: int = 0) -> int:
    try:
        return int((run / f"progress.rank{rank}").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return -1


def start(*args: str, env: Optional[dict] = None, cwd: Path = REPO) -> subprocess.Popen:
    """``python -m vitlab.cli.train args`` in the background (its output in a temporary file: no pipe to fill)."""
    full = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO), **(env or {})}
    full.pop("WANDB_API_KEY", None)
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"vitlab-fault-{os.getpid()}-{time.time_ns()}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "vitlab.cli.train", *args], cwd=cwd, env=full,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    proc.log = log                                   # type: ignore[attr-defined]
    return proc


def output(proc: subprocess.Popen) -> str:
    proc.log.seek(0)                                 # type: ignore[attr-defined]
    return proc.log.read()                           # type: ignore[attr-defined]


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """Wait for the process (kill its whole session on a timeout, so a hung DDP child is not left behind)."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        raise AssertionError(f"the run did not finish in {timeout} s:\n{output(proc)[-4000:]}") from None
    return rc, output(proc)


def train(*args: str, env: Optional[dict] = None, timeout: float = 300, cwd: Path = REPO) -> tuple[int, str]:
    return finish(start(*args, env=env, cwd=cwd), timeout)


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 240, what: str = "") -> None:
    """Poll ``condition`` until it holds; fail (with the run's output) if the run ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (code {proc.returncode}) before {what}:\n{output(proc)[-4000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, 9)
            raise AssertionError(f"timed out waiting for {what}:\n{output(proc)[-4000:]}")
        time.sleep(0.02)


def results(run: Path) -> tuple[dict, list, list]:
    """metrics.json without its timing, the per-step loss curve, and the epoch rows without their speed."""
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.pop("train/seconds", None)
    history = json.loads((run / "history.json").read_text())
    epochs = [{k: v for k, v in e.items() if k != "images_per_s"} for e in history["epochs"]]
    return metrics, [tuple(s) for s in history["steps"]], epochs
