"""SIGKILL a run mid-epoch (in its last epoch), inside a checkpoint write, and run it again with ckpt_path=auto: the
previous checkpoint is whole, the killed write's temporary file is removed at that start, and the final metrics, the
per-step loss curve and the epoch rows equal an uninterrupted run's, bit for bit (CPU, the same machine).

Bit-exact because everything random is restored: the data order (seeded per epoch, the loader skips what was
trained), the main process's RNG (in the checkpoint: dropout, stochastic depth, augmentation without loader
workers) and the epoch's running sums (:class:`vitlab.lit.fault.EpochAggregates`). With loader workers, the
augmentation drawn inside the workers is not restored (a resumed epoch restarts their RNG): the variant with
2 workers augments on the device instead (data.batched_augment=true, from the main RNG) and stays exact."""

from __future__ import annotations

import signal

import pytest
import torch

from tests.fault.helpers import STEPS_PER_EPOCH, TINY, kill_in_checkpoint_write, results, train

pytestmark = pytest.mark.slow


def _kill_and_resume(tmp_path, *extra):
    """Killed (SIGKILL) through the real CLI while it writes a checkpoint in the 2nd epoch: the previous checkpoint is
    whole, the write's temporary file is left, and the same command with ckpt_path=auto removes it and resumes."""
    run = tmp_path / "run"
    args = [*TINY, *extra, f"paths.output_dir={run}", "checkpoint_every_n_steps=2"]
    kill_at = STEPS_PER_EPOCH + 9                 # an even step: a checkpoint is written there (every 2 steps)
    rc, log = train(*args, *kill_in_checkpoint_write(kill_at))
    assert rc == -signal.SIGKILL, f"the run was not killed inside a checkpoint write (exit {rc}):\n{log[-3000:]}"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)       # whole: the previous one
    step = ckpt["global_step"]
    assert step == kill_at - 2, step                                               # every 2 steps, mid-epoch 2
    assert ckpt["VitlabDataModule"]["train_loader"] == {"epoch": 1, "consumed_batches": step - STEPS_PER_EPOCH}
    stale = [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".last.ckpt.")]
    assert len(stale) == 1 and stale[0].name.endswith(".tmp") and stale[0].stat().st_size > 0   # the killed write
    assert stale[0].stat().st_size > (run / "checkpoints" / "last.ckpt").stat().st_size / 2

    rc, log = train(*args, "ckpt_path=auto")
    assert rc == 0, log[-3000:]
    assert f"ckpt_path=auto: resuming from {run / 'checkpoints' / 'last.ckpt'}" in log
    assert f"resuming epoch 1 at batch {step - STEPS_PER_EPOCH}" in log
    assert not stale[0].exists() and f"removed {stale[0]}" in log
    return run


def _assert_same(run, straight):
    metrics, steps, epochs = results(run)
    ref_metrics, ref_steps, ref_epochs = results(straight)
    assert len(steps) == 2 * STEPS_PER_EPOCH and steps == ref_steps
    assert epochs == ref_epochs
    assert metrics == ref_metrics and metrics["train/global_step"] == 2 * STEPS_PER_EPOCH


def test_sigkill_mid_epoch_then_auto_resume_matches_an_uninterrupted_run(tmp_path, straight_run):
    _assert_same(_kill_and_resume(tmp_path), straight_run)


def test_sigkill_with_two_loader_workers(tmp_path):
    extra = ("data.num_workers=2", "data.batched_augment=true")
    rc, log = train(*TINY, *extra, f"paths.output_dir={tmp_path / 'straight'}")
    assert rc == 0, log[-3000:]
    _assert_same(_kill_and_resume(tmp_path, *extra), tmp_path / "straight")
