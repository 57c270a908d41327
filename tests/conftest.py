"""Shared test helpers: paths to the repo, its configs and the shared real datasets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SHARED_DATA = Path(os.environ.get("VITLAB_SHARED_DATA", REPO.parent / "shared" / "data"))


def run_cli(module: str, *args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m <module> args...` from the repo root; return the finished process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg", **(env or {})}
    full_env.pop("WANDB_API_KEY", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=full_env, stdin=subprocess.DEVNULL)


@pytest.fixture
def cifar_subset() -> Path:
    root = SHARED_DATA / "cifar10-subset"
    if not (root / "cifar-10-batches-py" / "data_batch_1").is_file():
        pytest.skip(f"the shared CIFAR-10 subset is not at {root} (set VITLAB_SHARED_DATA)")
    return root
