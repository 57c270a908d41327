"""What the fault-tolerance files share: exit code, marker names, the run-directory error, this process's rank."""

from __future__ import annotations

import json
import os
from pathlib import Path

EXIT_PREEMPTED = 75                 # EX_TEMPFAIL (sysexits.h): stopped on purpose, run the same command again
MARKER = "preempted.json"           # in the run directory while a preempted run waits to be resumed
HISTORY = "preemptions.jsonl"       # every consumed marker, one line each (when the run was stopped and resumed)


class RunDirError(Exception):
    """The run directory cannot hold the run (the message names the directory, the cause and the fix)."""


def env_rank() -> int:
    """This process's global rank before any trainer exists (Lightning reads the same variables)."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
