"""The Hydra callback that checks the run (or sweep) directory before Hydra makes it."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf, read_write

from vitlab.lit.fault.common import MARKER, RunDirError, read_json
from vitlab.lit.fault.disk import check_output_dir
from vitlab.lit.fault.slurm import requeue_pointer, slurm_job_key


class RunDirectoryCheck(HydraCallback):
    """Before Hydra makes the run directory (``hydra.run.dir``, or ``hydra.sweep.dir`` for -m): it must be creatable
    and writable, else exit 2 with the fix (Hydra's own error is a traceback). A requeued plain-SLURM job whose
    preempted run noted its directory goes back to it (its default directory would be a new timestamp)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        job = slurm_job_key()
        if job and int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
            try:
                root = config.paths.root_dir
            except Exception:                  # noqa: BLE001 - another config layout: nothing to find
                root = None
            pointer = requeue_pointer(root, job) if root is not None else None
            run_dir = read_json(pointer).get("run_dir") if pointer is not None and pointer.is_file() else None
            if run_dir and (Path(run_dir) / MARKER).is_file():
                with read_write(config.hydra.run):
                    config.hydra.run.dir = run_dir
                print(f"[vitlab] requeued SLURM job {job}: back to the preempted run's directory {run_dir}",
                      file=sys.stderr, flush=True)
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")

    @staticmethod
    def _check(config: DictConfig, key: str) -> None:
        try:
            path = str(OmegaConf.select(config, key))
        except Exception:                      # noqa: BLE001 - an unresolvable dir is Hydra's to report
            return
        try:
            check_output_dir(path)
        except RunDirError as e:
            print(f"vitlab: error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
