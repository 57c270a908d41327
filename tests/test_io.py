"""vitlab.io: the one atomic writer (all or nothing, unique temporary names, fsync, the usual permissions)."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest
import torch

from tests.conftest import new_file_mode
from vitlab import io as vio
from vitlab.io import (atomic_torch_save, atomic_write, atomic_write_json, atomic_write_text, atomic_write_with,
                       stale_temp_files)


def test_creates_folders_and_replaces(tmp_path):
    path = tmp_path / "sub" / "metrics.json"
    atomic_write_text(path, "first")
    assert path.read_text() == "first"
    atomic_write_json(path, {"val/top1": 0.5})
    assert json.loads(path.read_text()) == {"val/top1": 0.5}
    atomic_write(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert os.listdir(path.parent) == ["metrics.json"]


def test_torch_save_round_trips(tmp_path):
    atomic_torch_save(tmp_path / "x.ckpt", {"w": torch.arange(3)})
    assert torch.equal(torch.load(tmp_path / "x.ckpt", weights_only=True)["w"], torch.arange(3))


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failure_mid_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, exc):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old content")

    def half(f):
        f.write(b"new content that is cut in ha")
        f.flush()
        raise exc

    with pytest.raises(type(exc)):
        atomic_write_with(path, half)
    assert path.read_text() == "old content"
    assert os.listdir(tmp_path) == ["metrics.json"], "a temporary file was left behind"


def test_the_rename_is_the_only_switch(tmp_path, monkeypatch):
    """Until the rename the target holds the old content; the temporary file sits in the same folder (a rename
    across file systems would not be atomic)."""
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old")
    seen = []
    real_replace = os.replace

    def spying_replace(src, dst):
        seen.append((Path(src).parent == path.parent, Path(dst) == path, path.read_text(), Path(src).read_text()))
        return real_replace(src, dst)

    monkeypatch.setattr(vio.os, "replace", spying_replace)
    atomic_write_text(path, "new")
    assert seen == [(True, True, "old", "new")]
    assert path.read_text() == "new"


def test_data_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    order = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(vio.os, "fsync", lambda fd: (order.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(vio.os, "replace", lambda a, b: (order.append("replace"), real_replace(a, b))[1])
    atomic_write_text(tmp_path / "a.json", "{}")
    assert order == ["fsync", "replace"]


def test_files_get_the_usual_permissions_under_any_umask(tmp_path):
    """mkstemp's 0600 would hide metrics and checkpoints from a lab group: the file gets 0666 less the umask."""
    atomic_write_text(tmp_path / "m.json", "{}")
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == new_file_mode(tmp_path)
    old = os.umask(0o002)
    vio._umask.cache_clear()
    try:
        atomic_write_text(tmp_path / "g.json", "{}")
        assert stat.S_IMODE((tmp_path / "g.json").stat().st_mode) == 0o664
    finally:
        os.umask(old)
        vio._umask.cache_clear()


def test_concurrent_writers_never_share_a_temporary_file(tmp_path, monkeypatch):
    """Two writers of the same target (two ranks, two threads) each get their own temporary name: the result is
    one writer's whole content, never a mix, and nothing is left behind."""
    path = tmp_path / "summary.csv"
    names, barrier = [], threading.Barrier(2)

    def writer(tag: bytes):
        def write(f):
            names.append(f.name)
            barrier.wait(timeout=10)                        # both temporary files exist at the same time
            f.write(tag * 10_000)
        atomic_write_with(path, write)

    threads = [threading.Thread(target=writer, args=(t,)) for t in (b"a", b"b")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(set(names)) == 2
    assert path.read_bytes() in (b"a" * 10_000, b"b" * 10_000)
    assert os.listdir(tmp_path) == ["summary.csv"]


def test_stale_temporary_files_are_found_by_target_suffix(tmp_path):
    (tmp_path / ".last.ckpt.ab12CD_9.tmp").write_bytes(b"partial")
    (tmp_path / ".metrics.json.ZZZZZZZZ.tmp").write_bytes(b"partial")
    (tmp_path / "last.ckpt").write_bytes(b"whole")
    (tmp_path / ".hidden.tmp").write_bytes(b"not ours")
    assert [p.name for p in stale_temp_files(tmp_path, ".ckpt")] == [".last.ckpt.ab12CD_9.tmp"]
    assert len(stale_temp_files(tmp_path)) == 2
    assert stale_temp_files(tmp_path / "missing") == []


def test_a_failure_before_the_write_closes_the_descriptor_and_removes_the_temporary(tmp_path, monkeypatch):
    def refuse(fd, mode):
        raise PermissionError(1, "Operation not permitted")

    before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(vio.os, "fchmod", refuse)
    with pytest.raises(PermissionError):
        atomic_write_text(tmp_path / "m.json", "{}")
    assert len(os.listdir("/proc/self/fd")) == before and os.listdir(tmp_path) == []
