"""Fault tolerance: a preempted run checkpoints and requeues, a stopped run resumes, and a run directory that
cannot hold the run stops it before any work.

- :class:`PreemptionHandler` (a callback, added by ``build_trainer`` from ``cfg.fault``): the signals in
  ``fault.preempt_signals`` (and submitit's preemption signal inside a submitit job) are recorded; at the next
  optimizer-step boundary (at an epoch's last batch: after the epoch's end) every rank agrees,
  ``checkpoints/last.ckpt`` is written mid-epoch (the loader position is in it), ``<run>/preempted.json`` says
  what happened, and :class:`Preempted` ends the fit. ``train()`` turns it
  into the requeue (submitit's own handler, or ``scontrol requeue`` under SLURM) and the exit code
  :data:`EXIT_PREEMPTED`, and logs the command that resumes the run (:func:`resume_command`). A ``-m`` sweep on
  Hydra's basic launcher is not requeued: its jobs run in one process, and only the Optuna sweeper
  (``hydra/sweeper=vitlab_optuna``) resumes a sweep.
- :func:`resolve_ckpt_path`: ``ckpt_path=auto`` and the resume of a requeued job (``ckpt_path=null`` with a marker).
- :class:`EpochAggregates`: the epoch's running training sums in every checkpoint, so a run resumed mid-epoch
  reports the same epoch metrics as an uninterrupted one.
- :func:`check_output_dir`, :func:`check_free_space`, :func:`disk_full_message`, :class:`RunDirectoryCheck`
  (a Hydra callback: before Hydra makes the run directory): clear errors for an unwritable or full disk.
- :func:`remove_stale_temp_files`: what a save killed mid-write left behind (see :mod:`vitlab.io`).

One job per file: ``common`` (exit code, markers, errors, rank), ``disk`` (run directory and free space),
``resume`` (which checkpoint a run starts from), ``slurm`` (job ids, requeue), ``preemption`` (the signal handler
callback and the exit), ``aggregates`` (epoch sums in checkpoints), ``hydra_callback`` (the run directory check).
"""

from __future__ import annotations

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from vitlab.lit.fault.aggregates import EpochAggregates
from vitlab.lit.fault.common import EXIT_PREEMPTED, HISTORY, MARKER, RunDirError, env_rank, human
from vitlab.lit.fault.disk import (DISK_FULL, check_free_space, check_output_dir, checkpoint_bytes, disk_full_message,
                                   parse_size, remove_stale_temp_files)
from vitlab.lit.fault.hydra_callback import RunDirectoryCheck
from vitlab.lit.fault.preemption import Preempted, PreemptionHandler, exit_preempted
from vitlab.lit.fault.resume import prepare_run_dir, resolve_ckpt_path, resume_command
from vitlab.lit.fault.slurm import scontrol_requeue, slurm_job_key

__all__ = ["DISK_FULL", "EXIT_PREEMPTED", "HISTORY", "MARKER", "EpochAggregates", "Preempted", "PreemptionHandler",
           "RunDirError", "RunDirectoryCheck", "check_free_space", "check_output_dir", "checkpoint_bytes",
           "disk_full_message", "env_rank", "exit_preempted", "fault_callbacks", "human", "parse_size",
           "prepare_run_dir", "remove_stale_temp_files", "resolve_ckpt_path", "resume_command", "scontrol_requeue",
           "slurm_job_key"]


def fault_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """:class:`EpochAggregates` and the :class:`PreemptionHandler` of the ``fault:`` block. build_trainer adds them
    after the configured callbacks, so the run's history already holds a step when its preemption checkpoint is
    written, and the epoch's sums are whole again before it."""
    f = cfg.get("fault") or {}
    signals = f.get("preempt_signals", ["SIGUSR1", "SIGTERM"])
    signals = OmegaConf.to_container(signals) if OmegaConf.is_config(signals) else (signals or [])
    handler = PreemptionHandler(cfg.paths.output_dir, signals, f.get("requeue", "auto"), f.get("sync_every_n_steps", 1),
                                root_dir=cfg.paths.get("root_dir", "."))
    return [EpochAggregates(), handler]
