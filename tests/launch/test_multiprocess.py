"""Real multi-process launches on CPU (gloo): one run directory per job, never one per rank; every rank trains rank 0's
resolved config (the same config_sha256 in environment.json); no hangs (every launch runs under a timeout).

- Lightning starts the ranks (trainer=ddp trainer.devices=2) inside a Hydra multirun;
- torchrun starts them: one node under a multirun, and two "nodes" (two torchrun agents on localhost);
- a bad command line under torchrun, and a multirun that fails on rank 0: every rank exits with the error's code;
- submitit's local executor runs a multirun whose jobs have two tasks each.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from vitlab.env import config_sha256

pytestmark = pytest.mark.slow

TINY = ["experiment=digits_vit", "backbone.embed_dim=32", "backbone.depth=1", "backbone.num_heads=2",
        "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu"]
TIMEOUT = 240
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TRAIN = ["-m", "vitlab.cli.train"]


def _env() -> dict:
    e = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    e.pop("WANDB_API_KEY", None)
    return e


def _run(cmd: list[str], cwd: Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """Run in ``cwd`` (a stray directory made relative to the working directory would show there)."""
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env(),
                          stdin=subprocess.DEVNULL)


def _out(p: subprocess.CompletedProcess) -> str:
    return p.stdout[-4000:] + p.stderr[-4000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_job(job: Path, ranks: int, lr: float | None = None) -> dict:
    """One job's directory: metrics, the config it wrote, and an environment record in which every rank
    trained exactly that config."""
    assert (job / "metrics.json").is_file(), job
    saved = OmegaConf.load(job / "config.yaml")
    if lr is not None:
        assert saved.optim.lr == pytest.approx(lr)
    record = json.loads((job / "environment.json").read_text())
    assert record["distributed"]["world_size"] == ranks
    assert [r["rank"] for r in record["ranks"]] == list(range(ranks))
    assert len({r["pid"] for r in record["ranks"]}) == ranks                  # distinct processes
    assert {r["config_sha256"] for r in record["ranks"]} == {config_sha256(OmegaConf.to_container(saved))}
    assert not list(job.rglob("train_ddp_process_*"))     # no child ran Hydra (Lightning's names for them)
    return record


def _multirun_checks(tmp_path: Path, sweep: Path, ranks: int) -> list[dict]:
    assert _dirs(tmp_path) == [sweep.name]                # nothing made beside the sweep (e.g. outputs/)
    assert _dirs(sweep) == ["0", "1"]                     # one directory per job, none per rank
    records = [_check_job(sweep / "0", ranks, 1e-3), _check_job(sweep / "1", ranks, 3e-4)]
    assert records[0]["ranks"][0]["config_sha256"] != records[1]["ranks"][0]["config_sha256"]
    return records


def test_multirun_with_lightning_ddp_makes_one_directory_per_job(tmp_path):
    """Lightning re-runs the command line for its children: they must not start sweeps or directories of their own,
    and the second job must start fresh processes on a fresh port (not wait on the first job's)."""
    sweep = tmp_path / "sweep"
    p = _run([sys.executable, *TRAIN, "-m", *TINY, "trainer=ddp", "trainer.devices=2", "optim.lr=0.001,0.0003",
              f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert p.returncode == 0, _out(p)
    records = _multirun_checks(tmp_path, sweep, ranks=2)
    assert records[0]["ranks"][1]["pid"] != records[1]["ranks"][1]["pid"]   # each job's own child, reaped after


def test_torchrun_multirun_one_node(tmp_path):
    """Ranks > 0 never run Hydra: they train each job rank 0's sweep sends, in one process, over one group."""
    sweep = tmp_path / "sweep"
    p = _run([*TORCHRUN, "--standalone", "--nproc-per-node", "2", *TRAIN, "-m", *TINY, "trainer=ddp",
              "trainer.devices=2", "optim.lr=0.001,0.0003", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert p.returncode == 0, _out(p)
    records = _multirun_checks(tmp_path, sweep, ranks=2)
    assert records[0]["ranks"][1]["pid"] == records[1]["ranks"][1]["pid"]


def test_torchrun_two_nodes_on_localhost(tmp_path):
    out, port = tmp_path / "run", _free_port()
    args = [*TINY, "trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2", f"paths.output_dir={out}"]
    agents = [subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--node-rank", str(n), "--nproc-per-node", "1",
                                "--master-addr", "127.0.0.1", "--master-port", str(port), *TRAIN, *args],
                               cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, stdin=subprocess.DEVNULL) for n in (0, 1)]
    try:
        logs = [a.communicate(timeout=TIMEOUT)[0] for a in agents]
    finally:
        for a in agents:
            a.kill()
    assert [a.returncode for a in agents] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert _dirs(tmp_path) == ["run"]
    record = _check_job(out, ranks=2)
    assert [r["node_rank"] for r in record["ranks"]] == [0, 1]
    assert record["distributed"]["num_nodes"] == 2


def _torchrun_exit_codes(output: str) -> dict[int, int]:
    """rank -> exit code, from torchrun's failure summary."""
    found = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", output)
    return {int(r): int(c) for r, c in found}


def test_a_bad_override_under_torchrun_fails_on_every_rank(tmp_path):
    # --monitor-interval 10: torchrun first looks after both ranks have checked the command line, so neither is
    # killed for the other's failure
    p = _run([*TORCHRUN, "--standalone", "--nproc-per-node", "2", "--monitor-interval", "10", *TRAIN,
              "trainer.devcies=2"], cwd=tmp_path, timeout=120)
    assert p.returncode != 0
    assert "unknown config key 'trainer.devcies'" in p.stderr and "trainer.devices" in p.stderr
    assert _torchrun_exit_codes(p.stderr) == {0: 2, 1: 2}
    assert _dirs(tmp_path) == []


def test_a_multirun_failing_on_rank_0_stops_the_other_ranks(tmp_path):
    """Only rank 0 runs the sweep, so only it sees the bad key; it tells the others, which leave with its code
    instead of waiting for a job that never comes."""
    # --monitor-interval 10: torchrun would stop rank 1 itself once rank 0 failed; looking late, it finds that
    # rank 1 has already left on its own
    p = _run([*TORCHRUN, "--standalone", "--nproc-per-node", "2", "--monitor-interval", "10", *TRAIN, "-m", *TINY,
              "trainer.devcies=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, timeout=120)
    assert p.returncode != 0
    assert "devcies" in p.stderr
    codes = _torchrun_exit_codes(p.stderr)
    assert codes[1] == 1                                  # rank 1 left by itself, with rank 0's (Hydra's) code
    assert codes[0] in (1, -15)                           # -15: torchrun stopped rank 0 after rank 1 had left


def test_submitit_local_multirun_with_two_tasks_per_job(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    p = _run([sys.executable, *TRAIN, "-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
              *TINY, "trainer=ddp", "trainer.devices=2", "optim.lr=0.001,0.0003", f"hydra.sweep.dir={sweep}"],
             cwd=tmp_path)
    assert p.returncode == 0, _out(p)
    _multirun_checks(tmp_path, sweep, ranks=2)
