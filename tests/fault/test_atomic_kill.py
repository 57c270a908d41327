"""A process killed while it writes a checkpoint leaves the previous one whole; the next start removes the
temporary file the killed write left (only vitlab's own pattern, only in checkpoints/)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

from tests.conftest import REPO
from vitlab.lit.fault import remove_stale_temp_files

# saves step 0, 1, 2, ... of a ~48 MB checkpoint through AtomicCheckpointIO (fsync'ed: slow enough to be caught
# mid-write), printing the step once its save returned
SAVER = textwrap.dedent("""
    import sys, torch
    from vitlab.lit.callbacks import AtomicCheckpointIO
    io, path = AtomicCheckpointIO(), sys.argv[1]
    weights = torch.randn(12_000_000)
    for step in range(10_000):
        io.save_checkpoint({"global_step": step, "weights": weights + step}, path)
        print(step, flush=True)
""")


def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    path = ckpt_dir / "last.ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "0"                # one whole checkpoint exists
        deadline = time.monotonic() + 120
        while True:                                                 # then kill the next write while it is under way
            temps = [p for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")]
            if temps and temps[0].stat().st_size > 0:
                os.kill(proc.pid, signal.SIGKILL)
                break
            assert proc.poll() is None and time.monotonic() < deadline, "the saver ended or never started a write"
            time.sleep(0.001)
    finally:
        proc.kill()
        proc.wait()
    saved = [int(line) for line in proc.stdout.read().split()]
    last_done = saved[-1] if saved else 0

    ckpt = torch.load(path, weights_only=True)                      # whole, and the last one that completed
    assert ckpt["global_step"] == last_done and ckpt["weights"].numel() == 12_000_000
    temps = [p for p in ckpt_dir.iterdir() if p.name != "last.ckpt"]
    assert len(temps) == 1 and temps[0].name.startswith(".last.ckpt.") and temps[0].name.endswith(".tmp")
    assert temps[0].stat().st_size < path.stat().st_size            # it was cut mid-write

    (ckpt_dir / "notes.tmp").write_text("not ours")                 # other files stay
    (ckpt_dir / ".best.ckpt.ab12cd34.tmp.keep").write_text("not the pattern")
    removed = remove_stale_temp_files(ckpt_dir)
    assert removed == temps
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [".best.ckpt.ab12cd34.tmp.keep", "last.ckpt", "notes.tmp"]
    assert torch.load(path, weights_only=True)["global_step"] == ckpt["global_step"]
