"""Before any work, a run directory that cannot be created or written, or a disk without room for the checkpoints,
stops the run with exit 2 and a message naming the directory, the cause and the fix. A disk that fills up during
training stops it with the same kind of message, and the previous checkpoint stays whole."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
from collections import namedtuple

import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.conftest import CONF, REPO, run_cli
from tests.fault.helpers import TINY
from vitlab.lit import fault

ENV = {"OMP_NUM_THREADS": "1"}


def _cfg(out, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[*TINY, f"paths.output_dir={out}", *overrides])


@pytest.mark.parametrize("where", ["proc", "under_a_file"])
def test_a_run_dir_that_cannot_be_made_stops_before_hydra_makes_it(tmp_path, where):
    if where == "proc":
        run_dir, cause = "/proc/vitlab-test-run", "No such file or directory"
    else:
        (tmp_path / "a_file").write_text("")
        run_dir, cause = str(tmp_path / "a_file" / "run"), "is a file, not a folder"
    p = run_cli("vitlab.cli.train", *TINY, f"paths.output_dir={run_dir}", timeout=180, env=ENV)
    assert p.returncode == 2, p.stderr[-3000:]
    assert f"vitlab: error: cannot create the run directory {run_dir}" in p.stderr
    assert cause in p.stderr and "paths.output_dir=DIR" in p.stderr and "VITLAB_ROOT" in p.stderr
    assert "Traceback" not in p.stderr


def _file_size_limit() -> None:            # runs in the child before exec: writes past 512 KB fail with EFBIG
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, 512 * 1024))


def test_a_full_disk_is_reported_before_the_run_starts(tmp_path):
    env = {**os.environ, **ENV, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "vitlab.cli.train", *TINY, f"paths.output_dir={tmp_path / 'run'}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=180, preexec_fn=_file_size_limit)
    assert p.returncode == 2, p.stderr[-3000:]
    assert f"cannot create the run directory {tmp_path / 'run'}" in p.stderr
    assert "File too large" in p.stderr and "the disk is full" in p.stderr
    assert "paths.output_dir=/other/disk/DIR" in p.stderr
    assert list(tmp_path.iterdir()) == []          # no run directory, no probe left behind


def test_check_output_dir_probes_an_existing_dir_and_leaves_nothing(tmp_path):
    fault.check_output_dir(tmp_path, probe_bytes=3 << 20)
    fault.check_output_dir(tmp_path / "new" / "run")
    assert list(tmp_path.iterdir()) == []


def test_free_space_check_names_free_needed_and_the_fix(tmp_path, monkeypatch):
    from vitlab.lit.build import build_run

    cfg = _cfg(tmp_path / "run", "backbone.embed_dim=64", "backbone.depth=2", "trainer.max_steps=1",
               "trainer.limit_val_batches=1")
    run = build_run(cfg)
    one = fault.checkpoint_bytes(run.module, "adamw")
    trainable = sum(p.numel() * 4 for p in run.module.parameters())
    assert one == sum(t.numel() * t.element_size() for t in run.module.state_dict().values()) + 2 * trainable

    # the estimate is the size of a real checkpoint (weights + AdamW's two moments) to within its small extras
    run.trainer.fit(run.module, datamodule=run.datamodule)
    real = tmp_path / "real.ckpt"
    run.trainer.save_checkpoint(real)
    assert 0.85 < one / real.stat().st_size < 1.15

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(fault.disk.shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 2 * one, 2 * one))
    fresh = tmp_path / "fresh"                                          # no checkpoints yet
    with pytest.raises(fault.RunDirError) as e:
        fault.check_free_space(cfg, fresh, run.module)                  # auto: 3 checkpoints' worth
    text = str(e.value)
    assert f"in {fresh / 'checkpoints'}" in text
    assert f"{fault.human(2 * one)} free, {fault.human(3 * one)} needed" in text
    assert "paths.output_dir=" in text and "fault.min_free_space=0" in text
    # a resumed run: its last.ckpt and best.ckpt are overwritten in place, so the room they hold counts
    resumed = tmp_path / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    for name in ("last.ckpt", "best.ckpt"):
        with open(resumed / name, "wb") as f:
            f.truncate(one)                                             # sparse: the size counts, not the blocks
    fault.check_free_space(cfg, resumed.parent, run.module)             # 2 free = 3 needed - 2 there
    monkeypatch.setattr(fault.disk.shutil, "disk_usage", lambda p: Usage(10**9, 10**9, one - 1))
    with pytest.raises(fault.RunDirError) as e:                         # but never less than one checkpoint
        fault.check_free_space(cfg, resumed.parent, run.module)
    assert f"{fault.human(one - 1)} free, {fault.human(one)} needed" in str(e.value)
    assert f"less the {fault.human(2 * one)} of checkpoints already in {resumed}" in str(e.value)
    monkeypatch.setattr(fault.disk.shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 2 * one, 2 * one))
    cfg.fault.min_free_space = 2 * one + 1                              # an explicit size
    with pytest.raises(fault.RunDirError, match=f"needed \\(fault.min_free_space={2 * one + 1}\\)"):
        fault.check_free_space(cfg, fresh, run.module)
    cfg.fault.min_free_space = 2 * one
    fault.check_free_space(cfg, fresh, run.module)
    cfg.fault.min_free_space = 0                                          # off
    monkeypatch.setattr(fault.disk.shutil, "disk_usage", lambda p: Usage(1, 1, 0))
    fault.check_free_space(cfg, tmp_path / "run", run.module)


def test_not_enough_space_stops_train_before_any_step(tmp_path, capsys):
    from vitlab.cli.train import train

    with pytest.raises(SystemExit) as e:
        train(_cfg(tmp_path / "run", "fault.min_free_space=1000TB"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "not enough free space for the checkpoints" in err and "1000.0 TB needed" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_full_disk_during_training_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    from vitlab.cli.train import train

    real_save, saves = torch.save, []

    def save(obj, f, *args, **kwargs):          # the 3rd checkpoint (step 6) meets a full disk half-way
        saves.append(obj.get("global_step"))
        if len(saves) == 3:
            f.write(b"PK\x03\x04 half a checkpoint")
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:                      # what torch.save reports, with the OSError as its context
                raise RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 704 vs 598")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train(_cfg(out, "checkpoint_every_n_steps=2"))
    assert e.value.code == 2 and saves == [2, 4, 6]
    err = capsys.readouterr().err
    last = out / "checkpoints" / "last.ckpt"
    assert f"the last complete checkpoint is {last} (step 4)" in err
    assert "No space left on device" in err and "the disk is full" in err and "ckpt_path=auto" in err
    assert torch.load(last, weights_only=False)["global_step"] == 4
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]     # no temporary file left


def test_sizes_and_signals_are_checked_with_the_key_in_the_message():
    assert fault.parse_size("20GB") == 20 * 10**9 and fault.parse_size("2GiB") == 2 * 2**30
    assert fault.parse_size(0) == 0 and fault.parse_size("512") == 512
    with pytest.raises(ValueError, match="fault.min_free_space='lots'"):
        fault.parse_size("lots")
    assert [int(s) for s in fault.PreemptionHandler(".", ["SIGUSR1", "term", 12]).signals] == \
        [signal.SIGUSR1, signal.SIGTERM, 12]
    with pytest.raises(ValueError, match=r"fault.preempt_signals: unknown signal 'SIGNOPE'"):
        fault.PreemptionHandler(".", ["SIGNOPE"])
    with pytest.raises(ValueError, match="fault.requeue='maybe'"):
        fault.PreemptionHandler(".", requeue="maybe")
