"""SLURM and Hydra's launchers: which job this is, how to requeue it, where a requeued job finds its run."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Optional, Union

log = logging.getLogger("vitlab")


def requeue_pointer(root_dir: Union[str, Path], job: str) -> Path:
    """Where a preempted plain-SLURM job notes its run directory, for the requeued job (a new Hydra start, whose
    default run directory would be a new timestamp) to find it again: see :class:`RunDirectoryCheck`."""
    return Path(root_dir) / ".vitlab" / "requeue" / f"slurm-{job}.json"


def basic_multirun() -> bool:
    """A ``-m`` sweep whose jobs run one after the other in this process (basic sweeper and launcher): exit 75
    ends the whole sweep, and a rerun (or a requeue) of the sweep command starts a new sweep from its first job."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return False
        hc = HydraConfig.get()
        return hc.mode == RunMode.MULTIRUN and "BasicLauncher" in str(hc.launcher.get("_target_", "")) \
            and "BasicSweeper" in str(hc.sweeper.get("_target_", ""))
    except Exception:                    # noqa: BLE001 - another Hydra: assume not
        return False


def slurm_job_key() -> Optional[str]:
    """The id ``scontrol requeue`` takes (``<array job>_<task>`` for an array task); None outside a batch job
    (an interactive allocation cannot be requeued)."""
    if os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def scontrol_requeue(job: str) -> bool:
    """``scontrol requeue <job>``; a failure is logged (the checkpoint is written either way)."""
    try:
        res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("preemption: `scontrol requeue %s` failed: %s; the job is not requeued (resume it with the same "
                  "command)", job, e)
        return False
    if res.returncode != 0:
        log.error("preemption: `scontrol requeue %s` exited with %d: %s; the job is not requeued (resume it with "
                  "the same command)", job, res.returncode, (res.stderr or res.stdout).strip())
        return False
    log.warning("preemption: SLURM job %s requeued", job)
    return True
