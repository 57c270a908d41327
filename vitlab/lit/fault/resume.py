"""Where a run starts from: ``ckpt_path=auto``, a requeued job's own resume, and the command that resumes a run."""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path
from typing import Optional, Union

from omegaconf import DictConfig

from vitlab.lit.fault.common import MARKER, env_rank, read_json
from vitlab.lit.fault.disk import check_output_dir, remove_stale_temp_files

log = logging.getLogger("vitlab")


def resolve_ckpt_path(cfg: DictConfig, output_dir: Union[str, Path]) -> Optional[str]:
    """The checkpoint a run starts from: an explicit ``ckpt_path`` as given; ``auto``: the run directory's
    checkpoints/last.ckpt when there is one (else a fresh run); ``null``: a fresh run, unless the run directory holds
    a preemption marker and its checkpoint (a requeued job resumes by itself). The marker is consumed by
    :class:`PreemptionHandler` once training restarts, so a later crash is not taken for a preemption."""
    value = cfg.get("ckpt_path")
    out = Path(output_dir)
    last, marker = out / "checkpoints" / "last.ckpt", out / MARKER
    say = log.info if env_rank() == 0 else log.debug
    if value not in (None, "auto"):
        return str(value)
    if value == "auto":
        if last.is_file():
            say("ckpt_path=auto: resuming from %s", last)
            return str(last)
        say("ckpt_path=auto: no checkpoint at %s yet: a fresh run", last)
        return None
    if marker.is_file():
        if last.is_file():
            info = read_json(marker)
            if env_rank() == 0:
                log.warning("RESUMING A PREEMPTED RUN: %s says it stopped on %s at step %s (%s); continuing from %s. "
                            "(ckpt_path=null resumes a preempted run by itself; to start afresh, use another "
                            "paths.output_dir)", marker, info.get("signal", "?"), info.get("step", "?"),
                            info.get("time", "?"), last)
            return str(last)
        say("%s exists but %s does not: a fresh run", marker, last)
    return None


def resume_command(output_dir: Union[str, Path]) -> str:
    """The command that resumes a preempted run: its default run directory is a new timestamp, so "the same
    command" alone starts afresh; ``paths.output_dir=<this run>`` goes back to it, and the marker there picks the
    checkpoint. The job's own overrides are kept (without -m: for a sweep's job, this one job), ``ckpt_path`` and
    the run directory's keys are left out."""
    overrides: list[str] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            skip = ("paths.output_dir", "ckpt_path", "hydra.run.dir")
            overrides = [o for o in HydraConfig.get().overrides.task if o.split("=", 1)[0].lstrip("+~") not in skip]
    except Exception:                    # noqa: BLE001 - the hint must not fail: the run dir alone is enough
        pass
    where = f"paths.output_dir={os.path.abspath(output_dir)}"
    return " ".join(shlex.quote(a) for a in ["vitlab-train", *overrides, where])


def prepare_run_dir(cfg: DictConfig, output_dir: Union[str, Path]) -> Optional[str]:
    """Before building the run (every rank): the run directory takes a write, a killed save's temporary files are
    removed (rank 0), and the checkpoint to start from is decided. Raises :class:`RunDirError`."""
    out = Path(output_dir)
    check_output_dir(out)
    if env_rank() == 0:
        remove_stale_temp_files(out / "checkpoints")
    return resolve_ckpt_path(cfg, out)
