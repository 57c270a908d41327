"""The ``hydra/sweeper=vitlab_optuna`` config: the official Optuna sweeper's options plus two of ours.

Hydra imports this module when it scans its plugins (modules named ``_*`` are skipped: optuna itself is imported
only when a sweep starts). Without the optional ``vitlab[sweep]`` dependencies the option still exists, and
selecting it stops with the install command instead of Hydra's "Could not find 'hydra/sweeper/vitlab_optuna'"."""

from dataclasses import dataclass, field
from typing import List

from hydra.core.config_store import ConfigStore

try:
    from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
except ImportError:                   # hydra-optuna-sweeper is an optional dependency (pip install 'vitlab[sweep]')
    OptunaSweeperConf = None


if OptunaSweeperConf is not None:

    @dataclass
    class VitlabOptunaSweeperConf(OptunaSweeperConf):
        """hydra-optuna-sweeper's ``OptunaSweeperConf`` (sampler, direction, storage, study_name, n_trials, n_jobs,
        max_failure_rate, params, ...) with a sweep that can be stopped and run again (see the sweeper's docstring).
        ``n_trials`` counts the study's finished trials; ``max_failure_rate`` is a fraction of ``n_trials``."""

        _target_: str = "hydra_plugins.vitlab_optuna_sweeper.vitlab_optuna_sweeper.VitlabOptunaSweeper"
        # extra overrides for the re-run of a trial that a stopped sweep left RUNNING; the re-run goes to that
        # trial's own job directory, so vitlab's `ckpt_path=auto` resumes it from its last checkpoint
        rerun_overrides: List[str] = field(default_factory=list)
        # mark trials left RUNNING by a sweep process that is gone as FAIL and queue their parameters again;
        # false when several sweep processes on different hosts share one study
        fail_stale_trials: bool = True

    node = VitlabOptunaSweeperConf
else:
    node = {"_target_": "hydra_plugins.vitlab_optuna_sweeper.vitlab_optuna_sweeper.OptunaNotInstalled"}

ConfigStore.instance().store(group="hydra/sweeper", name="vitlab_optuna", node=node, provider="vitlab")
