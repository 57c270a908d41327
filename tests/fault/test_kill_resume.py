"""SIGKILL a run mid-epoch (in its last epoch) and run it again with ckpt_path=auto: the final metrics, the per-step
loss curve and the epoch rows equal an uninterrupted run's, bit for bit (CPU, the same machine). The temporary file
of a killed checkpoint write is removed at that start.

Bit-exact because everything random is restored: the data order (seeded per epoch, the loader skips what was
trained), the main process's RNG (in the checkpoint: dropout, stochastic depth, augmentation without loader
workers) and the epoch's running sums (:class:`vitlab.lit.fault.EpochAggregates`). With loader workers, the
augmentation drawn inside the workers is not restored (a resumed epoch restarts their RNG): the variant with
2 workers augments on the device instead (data.batched_augment=true, from the main RNG) and stays exact."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from tests.fault.helpers import STEPS_PER_EPOCH, TINY, finish, progress, results, start, throttle, train, wait_until

pytestmark = pytest.mark.slow


def _kill_and_resume(tmp_path, *extra):
    run = tmp_path / "run"
    args = [*TINY, *extra, f"paths.output_dir={run}", "checkpoint_every_n_steps=2"]
    p = start(*args, *throttle(0.25, after=STEPS_PER_EPOCH + 4, until=STEPS_PER_EPOCH + 10))
    wait_until(lambda: progress(run) >= STEPS_PER_EPOCH + 8, p, what="a step in the 2nd epoch")
    os.kill(p.pid, signal.SIGKILL)
    finish(p)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    step = ckpt["global_step"]
    assert STEPS_PER_EPOCH + 6 <= step < 2 * STEPS_PER_EPOCH and step % 2 == 0       # mid-epoch, epoch 2
    assert ckpt["VitlabDataModule"]["train_loader"] == {"epoch": 1, "consumed_batches": step - STEPS_PER_EPOCH}
    stale = run / "checkpoints" / ".last.ckpt.k1ll3d_x.tmp"                         # as a killed write leaves it
    stale.write_bytes(b"PK\x03\x04 half")

    rc, log = train(*args, "ckpt_path=auto")
    assert rc == 0, log[-3000:]
    assert f"ckpt_path=auto: resuming from {run / 'checkpoints' / 'last.ckpt'}" in log
    assert f"resuming epoch 1 at batch {step - STEPS_PER_EPOCH}" in log
    assert not stale.exists() and f"removed {stale}" in log
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
