"""A preemption signal (SIGUSR1 / SIGTERM, or submitit's USR2) -> checkpoints/last.ckpt at the next step boundary,
<run>/preempted.json, a requeue and exit code 75; the same command resumes the run by itself and ends exactly where
an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir

from tests.conftest import CONF
from tests.fault.helpers import STEPS_PER_EPOCH, TINY, finish, progress, results, start, throttle, train, wait_until
from vitlab.lit import fault


class SignalAt(pl.Callback):
    """Sends this process ``signum`` at the start of batch ``batch_idx``, once the handler is in place."""

    def __init__(self, batch_idx: int, signum: int = signal.SIGUSR1):
        self.batch_idx, self.signum, self.sent_at = batch_idx, signum, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch_idx and self.sent_at is None:
            handler = signal.getsignal(self.signum)
            assert isinstance(getattr(handler, "__self__", None), fault.PreemptionHandler), handler
            self.sent_at = trainer.global_step
            os.kill(os.getpid(), self.signum)


def test_a_signal_mid_window_stops_at_the_window_end_with_a_checkpoint(tmp_path):
    """In process, with gradient accumulation: the signal arrives at the first batch of a window; the run stops
    after the window's last batch (an optimizer step), writes last.ckpt there, and the pre-fit handlers are back."""
    from vitlab.lit.build import build_run

    out = tmp_path / "run"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, f"paths.output_dir={out}", "trainer.accumulate_grad_batches=2",
                                          "fault.preempt_signals=[SIGUSR1]"])
    run = build_run(cfg)
    sender = SignalAt(batch_idx=4)                            # batches 4 and 5 make step 3
    run.trainer.callbacks.insert(0, sender)
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    with pytest.raises(fault.Preempted) as e:
        run.trainer.fit(run.module, datamodule=run.datamodule)
    assert {s: signal.getsignal(s) for s in before} == before
    assert sender.sent_at == 2 and e.value.step == 3 and e.value.signal_name == "SIGUSR1"
    assert e.value.requeue is None                            # not a SLURM or submitit job
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3 and ckpt["epoch"] == 0
    assert ckpt["VitlabDataModule"] == {"train_loader": {"epoch": 0, "consumed_batches": 6}}
    assert ckpt["callbacks"]["RunArtifacts"]["steps"][-1][0] == 3           # the run's history is in it
    marker = json.loads((out / fault.MARKER).read_text())
    assert marker["signal"] == "SIGUSR1" and marker["step"] == 3 and marker["batch_in_epoch"] == 6
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt"]   # no end-of-epoch save after it

    with pytest.raises(SystemExit) as stop:
        fault.exit_preempted(e.value)
    assert stop.value.code == fault.EXIT_PREEMPTED == 75


def test_resume_rules(tmp_path):
    from omegaconf import OmegaConf

    last = tmp_path / "checkpoints" / "last.ckpt"

    def resolve(value):
        return fault.resolve_ckpt_path(OmegaConf.create({"ckpt_path": value}), tmp_path)

    assert resolve(None) is None and resolve("auto") is None and resolve("/x/y.ckpt") == "/x/y.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"")
    assert resolve(None) is None                       # a crashed run: only auto (or a path) resumes it
    assert resolve("auto") == str(last)
    (tmp_path / fault.MARKER).write_text(json.dumps({"signal": "SIGTERM", "step": 7}))
    assert resolve(None) == str(last)                  # a preempted one resumes by itself


# ------------------------------------------------------------------ end to end ---

def _same_as(run: Path, straight: Path) -> None:
    metrics, steps, epochs = results(run)
    ref_metrics, ref_steps, ref_epochs = results(straight)
    assert steps == ref_steps and len(steps) == 2 * STEPS_PER_EPOCH    # every step's loss, bit for bit
    assert epochs == ref_epochs                                         # val metrics and epoch train loss
    assert metrics == ref_metrics


def _preempted_at(run: Path, sent_at: int) -> int:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    step = ckpt["global_step"]
    assert sent_at <= step <= sent_at + 2 and 0 < step % STEPS_PER_EPOCH   # the next step boundary, mid-epoch
    assert ckpt["VitlabDataModule"]["train_loader"]["consumed_batches"] == step % STEPS_PER_EPOCH
    marker = json.loads((run / fault.MARKER).read_text())
    assert marker["step"] == step and marker["checkpoint"] == str(run / "checkpoints" / "last.ckpt")
    return step


@pytest.mark.slow
def test_sigusr1_checkpoints_exits_75_and_the_same_command_resumes(tmp_path, straight_run):
    run = tmp_path / "run"
    args = [*TINY, f"paths.output_dir={run}", *throttle(0.25, after=4, until=12)]
    p = start(*args)
    wait_until(lambda: progress(run) >= 6, p, what="step 6")
    sent_at = progress(run)
    os.kill(p.pid, signal.SIGUSR1)
    rc, log = finish(p)
    assert rc == fault.EXIT_PREEMPTED, log[-3000:]
    step = _preempted_at(run, sent_at)
    assert json.loads((run / fault.MARKER).read_text())["signal"] == "SIGUSR1"

    rc, log = train(*args)                                  # the same command, ckpt_path=null
    assert rc == 0, log[-3000:]
    assert "RESUMING A PREEMPTED RUN" in log and f"resuming epoch 0 at batch {step}" in log
    assert not (run / fault.MARKER).exists()               # consumed: a later crash is not a preemption
    history = [json.loads(line) for line in (run / fault.HISTORY).read_text().splitlines()]
    assert len(history) == 1 and history[0]["step"] == step and history[0]["resumed_step"] == step
    _same_as(run, straight_run)


@pytest.mark.slow
def test_sigterm_under_slurm_requeues_and_the_requeued_job_finds_its_run(tmp_path, straight_run):
    """SIGTERM in a SLURM batch job: `scontrol requeue <job>` (a fake one on PATH records its arguments); the requeued
    job (same command, default timestamped run directory, SLURM_RESTART_COUNT=1) goes back to the run and resumes."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_dir / "scontrol").chmod(0o755)
    root = tmp_path / "root"                                # VITLAB_ROOT: runs go to root/outputs/<date>/<time>
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "VITLAB_ROOT": str(root), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_NODEID": "0"}
    args = [*TINY, *throttle(0.25, after=4, until=12)]
    p = start(*args, env=env)
    wait_until(lambda: len(list(root.glob("outputs/*/*/progress.rank0"))) == 1, p, what="the run directory")
    run = next(root.glob("outputs/*/*"))
    wait_until(lambda: progress(run) >= 6, p, what="step 6")
    sent_at = progress(run)
    os.kill(p.pid, signal.SIGTERM)
    rc, log = finish(p)
    assert rc == fault.EXIT_PREEMPTED, log[-3000:]
    step = _preempted_at(run, sent_at)
    assert calls.read_text().split("\n")[0] == "requeue 4242"
    assert json.loads((run / fault.MARKER).read_text())["requeue"] == "scontrol requeue 4242"

    rc, log = train(*args, env={**env, "SLURM_RESTART_COUNT": "1"})
    assert rc == 0, log[-3000:]
    assert f"requeued SLURM job 4242: back to the preempted run's directory {run}" in log
    assert list(root.glob("outputs/*/*")) == [run] and f"resuming epoch 0 at batch {step}" in log
    assert not (root / ".vitlab" / "requeue" / "slurm-4242.json").exists()
    assert calls.read_text().count("requeue") == 1
    _same_as(run, straight_run)


@pytest.mark.slow
def test_ddp_ranks_stop_together_when_rank_0_alone_is_signalled(tmp_path):
    run = tmp_path / "run"
    p = start(*TINY, "trainer=ddp", "trainer.devices=2", f"paths.output_dir={run}", *throttle(0.25, after=4, until=12))
    wait_until(lambda: progress(run, 0) >= 6 and progress(run, 1) >= 6, p, what="step 6 on both ranks")
    sent_at = progress(run, 0)
    os.kill(p.pid, signal.SIGUSR1)                          # the rank-0 process only
    rc, log = finish(p, timeout=120)                        # no hang
    assert rc == fault.EXIT_PREEMPTED, log[-3000:]
    step = _preempted_at(run, sent_at)
    assert progress(run, 0) == progress(run, 1) == step     # both ranks' last step: the checkpoint's
    rank1_pid = int((run / "progress.rank1").read_text().split()[1])
    assert not Path(f"/proc/{rank1_pid}").exists() or \
        Path(f"/proc/{rank1_pid}/stat").read_text().split()[2] == "Z"   # rank 1 has exited
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert log.count("preemption: SIGUSR1 received") == 1   # rank 0 reports it


def _descendants(pid: int) -> list[int]:
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return children + [d for c in children for d in _descendants(c)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.slow
def test_submitit_job_is_requeued_and_finishes_like_an_uninterrupted_run(tmp_path, straight_run):
    """hydra/launcher=submitit_local: submitit's preemption signal (USR2, as SLURM sends it before a timeout) reaches
    the job; vitlab checkpoints, then submitit's own handler requeues it; the requeued job resumes in its directory."""
    sweep = tmp_path / "sweep"
    p = start("-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}", *TINY,
              *throttle(0.25, after=4, until=12))
    run = sweep / "0"
    wait_until(lambda: progress(run) >= 6, p, what="step 6")
    sent_at = progress(run)
    tasks = [d for d in _descendants(p.pid) if "submitit.core._submit" in _cmdline(d)]
    assert len(tasks) == 1, [_cmdline(d) for d in _descendants(p.pid)]
    os.kill(tasks[0], signal.SIGUSR2)
    rc, log = finish(p, timeout=300)
    job_log = "".join(f.read_text() for f in sorted((sweep / ".submitit").rglob("*_log.*")))
    assert rc == 0, log[-2000:] + job_log[-3000:]
    assert "Caught signal SIGUSR2" in job_log and "Requeued job" in job_log
    history = [json.loads(line) for line in (run / fault.HISTORY).read_text().splitlines()]
    assert len(history) == 1 and history[0]["signal"] == "SIGUSR2"
    assert sent_at <= history[0]["step"] <= sent_at + 2 and history[0]["resumed_step"] == history[0]["step"]
    assert "submitit" in history[0]["requeue"]
    _same_as(run, straight_run)
