"""The edges of preemption: a requeue that fails (submitit refusing a timed-out job) still exits 75; the exit names
the command that resumes the run; a repeated signal ends the process; a signal at an epoch's last batch or during
validation is acted on after the epoch's end, and the resumed run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import CONF, REPO
from tests.fault.helpers import STEPS_PER_EPOCH, TINY, results, signal_at, train
from vitlab.lit import fault

# ------------------------------------------------------------ a failed requeue ---


class _Launcher:
    """What hydra-submitit-launcher submits: a callable whose ``checkpoint`` makes the requeued call."""

    def __call__(self) -> None:
        pass

    def checkpoint(self):
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def _submitit_handler(tmp_path, max_num_timeout: int, timeout_min: int, signal_delay_s: int):
    """submitit's own preemption handler in a job that got its warning signal ``signal_delay_s`` before the time
    limit (what SLURM does with --signal=USR2@delay); it would requeue through ``env._requeue``."""
    import submitit
    from submitit.core.job_environment import SignalHandler
    from submitit.core.utils import JobPaths

    class Env:
        global_rank, requeued = 0, []

        def _requeue(self, countdown: int) -> None:
            self.requeued.append(countdown)

    delayed = submitit.helpers.DelayedSubmission(_Launcher())
    delayed.set_timeout(timeout_min, max_num_timeout)
    env = Env()
    handler = SignalHandler(env, JobPaths(tmp_path, job_id="77"), delayed)
    handler._start_time = time.time() - (timeout_min * 60 - signal_delay_s)
    return handler, env


def test_a_time_limit_requeue_that_submitit_refuses_still_exits_75(tmp_path, caplog):
    from submitit.core.utils import UncompletedJobError

    handler, env = _submitit_handler(tmp_path, max_num_timeout=0, timeout_min=60, signal_delay_s=120)
    exc = fault.Preempted("SIGUSR2", 5, 0, str(tmp_path / "run" / "checkpoints" / "last.ckpt"),
                          lambda: handler.checkpoint_and_try_requeue(signal.SIGUSR2), "submitit")
    with pytest.raises(UncompletedJobError, match="timed-out too many times"):
        handler.checkpoint_and_try_requeue(signal.SIGUSR2)              # what used to escape from exit_preempted
    with caplog.at_level(logging.INFO, logger="vitlab"), pytest.raises(SystemExit) as stop:
        fault.exit_preempted(exc)
    assert stop.value.code == fault.EXIT_PREEMPTED and env.requeued == []
    assert "the requeue (submitit) failed: UncompletedJobError" in caplog.text
    assert "requeue: FAILED (UncompletedJobError" in caplog.text


def test_the_slurm_launcher_config_lets_submitit_requeue_at_the_time_limit(tmp_path):
    launcher = OmegaConf.load(CONF / "hydra" / "launcher" / "slurm.yaml")
    handler, env = _submitit_handler(tmp_path, launcher.max_num_timeout, launcher.timeout_min,
                                     launcher.signal_delay_s)
    assert handler.has_timed_out()                                      # the warning signal counts as a timeout
    exc = fault.Preempted("SIGUSR2", 5, 0, str(tmp_path / "last.ckpt"),
                          lambda: handler.checkpoint_and_try_requeue(signal.SIGUSR2), "submitit")
    with pytest.raises(SystemExit) as stop:
        fault.exit_preempted(exc)
    assert stop.value.code == -1                                        # submitit's own "requeued" exit
    assert env.requeued == [launcher.max_num_timeout - 1]


def test_a_failing_pointer_write_under_slurm_is_logged_and_exits_75(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    (tmp_path / "a_file").write_text("")
    handler = fault.PreemptionHandler(tmp_path / "run", root_dir=tmp_path / "a_file")   # root_dir is a file
    requeue, text = handler._requeue_action()
    assert text == "scontrol requeue 4242"
    with caplog.at_level(logging.INFO, logger="vitlab"), pytest.raises(SystemExit) as stop:
        fault.exit_preempted(fault.Preempted("SIGTERM", 3, 0, str(tmp_path / "run" / "last.ckpt"), requeue, text))
    assert stop.value.code == fault.EXIT_PREEMPTED
    assert "the requeue (scontrol requeue 4242) failed" in caplog.text


# ------------------------------------------------------------ repeated signals ---

_REPEAT = """
import os, signal, sys
from vitlab.lit.fault import PreemptionHandler
h = PreemptionHandler("/nonexistent", ["SIGUSR1", "SIGTERM"])
h._install()
os.kill(os.getpid(), signal.SIGTERM)
print("recorded", h.received, flush=True)
os.kill(os.getpid(), signal.SIGUSR1)            # another signal of the same preemption: recorded, not fatal
print("still running", h.received, flush=True)
os.kill(os.getpid(), signal.SIGTERM)            # the same one again: the default action
print("survived", flush=True)
"""


def test_the_same_signal_twice_ends_the_process():
    p = subprocess.run([sys.executable, "-c", _REPEAT], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert p.returncode == -signal.SIGTERM, p.stdout + p.stderr
    term = int(signal.SIGTERM)
    assert p.stdout.split("\n")[:2] == [f"recorded {term}", f"still running {term}"] and "survived" not in p.stdout


# ----------------------------------------------------- signals during validation ---

class SignalInValidation(pl.Callback):
    """Signals this process when the validation of epoch ``epoch`` starts (not the sanity check)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking and trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGUSR1)


def _tiny_run(out, *overrides):
    from vitlab.lit.build import build_run

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, f"paths.output_dir={out}", "trainer.limit_train_batches=3",
                                          "fault.preempt_signals=[SIGUSR1]", *overrides])
    return build_run(cfg)


def test_a_signal_during_an_epochs_validation_stops_at_the_epochs_end(tmp_path):
    run = _tiny_run(tmp_path / "run")
    run.trainer.callbacks.insert(0, SignalInValidation(epoch=0))
    with pytest.raises(fault.Preempted) as e:
        run.trainer.fit(run.module, datamodule=run.datamodule)
    assert e.value.step == 3 and e.value.epoch == 0                   # not at epoch 1's first batch
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3
    assert [row["epoch"] for row in ckpt["callbacks"]["RunArtifacts"]["epochs"]] == [0]
    assert "train/loss_epoch" in ckpt["callbacks"]["RunArtifacts"]["epochs"][0]       # the epoch's end is in it
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=False)
    assert best["global_step"] == 3                                    # and the epoch's checkpoints


def test_a_signal_after_the_last_training_step_is_logged_and_the_run_ends(tmp_path, caplog):
    run = _tiny_run(tmp_path / "run", "trainer.max_epochs=1")
    run.trainer.callbacks.insert(0, SignalInValidation(epoch=0))
    with caplog.at_level(logging.INFO, logger="vitlab"):
        run.trainer.fit(run.module, datamodule=run.datamodule)        # no Preempted: training is complete
    assert "preemption: SIGUSR1 arrived after the last training step" in caplog.text
    assert not (tmp_path / "run" / fault.MARKER).exists()


# ------------------------------------------------ a signal at an epoch's last batch ---

@pytest.mark.slow
def test_a_signal_at_an_epochs_last_batch_keeps_that_epochs_end(tmp_path, straight_run):
    """The signal comes before the last batch of epoch 0: the run still validates epoch 0, writes its best.ckpt and
    history row, and stops at the epoch's end; the resume command it prints (paths.output_dir=<the run>: its
    default directory would be a new timestamp) ends exactly like the uninterrupted run."""
    root = tmp_path / "root"                                # VITLAB_ROOT: the run goes to root/outputs/<date>/<time>
    args = [*TINY, *signal_at(STEPS_PER_EPOCH - 1)]
    rc, log = train(*args, env={"VITLAB_ROOT": str(root)})
    assert rc == fault.EXIT_PREEMPTED, log[-3000:]
    (run,) = root.glob("outputs/*/*")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == STEPS_PER_EPOCH and ckpt["epoch"] == 0
    assert [row["epoch"] for row in ckpt["callbacks"]["RunArtifacts"]["epochs"]] == [0]
    assert torch.load(run / "checkpoints" / "best.ckpt", weights_only=False)["global_step"] == STEPS_PER_EPOCH

    marker = json.loads((run / fault.MARKER).read_text())
    command = shlex.join(["vitlab-train", *args, f"paths.output_dir={run}"])
    assert marker["step"] == STEPS_PER_EPOCH and marker["resume"] == command
    assert f"To resume it: {command}" in log

    rc, log = train(*shlex.split(command)[1:], env={"VITLAB_ROOT": str(root)})
    assert rc == 0, log[-3000:]
    assert "RESUMING A PREEMPTED RUN" in log and list(root.glob("outputs/*/*")) == [run]
    metrics, steps, epochs = results(run)
    ref_metrics, ref_steps, ref_epochs = results(straight_run)
    assert steps == ref_steps and len(steps) == 2 * STEPS_PER_EPOCH
    assert epochs == ref_epochs                             # epoch 0's validation and training loss included
    assert metrics == ref_metrics
