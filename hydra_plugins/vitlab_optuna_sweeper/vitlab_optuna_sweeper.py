"""``hydra/sweeper=vitlab_optuna``: hydra-optuna-sweeper's sweeper, made resumable.

The official sweeper, run again with the same storage and study name, (a) numbers its jobs from 0 again, so new jobs
overwrite the old jobs' directories; (b) runs ``n_trials`` more trials instead of finishing the study; (c) leaves the
trials of a killed sweep RUNNING forever; (d) cannot open an sqlite file in a folder that does not exist yet; and
(e) counts ``max_failure_rate`` per batch, so with ``n_jobs=1`` one diverged run ends the sweep. Here: a trial's job
number is its trial number; ``n_trials`` is the study's total; trials left RUNNING by a sweep process that is gone
are marked FAIL and run again in their own job directory (with ``rerun_overrides``, e.g. ``ckpt_path=auto``); the
sqlite folder is created; the sweep stops once more than ``max_failure_rate * n_trials`` trials failed. A job that
exits with a non-zero code (vitlab's error exit) is a failed trial; a preempted job (exit code 75) stops the sweep,
and running the same command again resumes it. The search space syntax and the sampler options are the official
plugin's (https://hydra.cc/docs/plugins/optuna_sweeper/)."""

import logging
from typing import Any, List, Optional

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

try:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:                   # optional dependency: see OptunaNotInstalled
    OptunaSweeper = None

INSTALL_HINT = ("hparams_search=... (hydra/sweeper=vitlab_optuna) needs the Optuna sweeper plugin: "
                "pip install 'vitlab[sweep]' (hydra-optuna-sweeper, SQLAlchemy<2)")


if OptunaSweeper is not None:

    class VitlabOptunaSweeper(OptunaSweeper):
        """The official ``OptunaSweeper`` with :class:`ResumableOptunaSweeperImpl` behind it."""

        def __init__(self, sampler: Any, direction: Any, storage: Optional[Any], study_name: Optional[str],
                     n_trials: int, n_jobs: int, max_failure_rate: float, search_space: Optional[DictConfig],
                     custom_search_space: Optional[str], params: Optional[DictConfig],
                     rerun_overrides: Optional[List[str]] = None, fail_stale_trials: bool = True) -> None:
            logging.getLogger("alembic").setLevel(logging.WARNING)    # optuna's RDB storage: INFO lines on import
            from ._impl import ResumableOptunaSweeperImpl     # optuna is imported only when a sweep starts

            self.sweeper = ResumableOptunaSweeperImpl(
                sampler, direction, storage, study_name, n_trials, n_jobs, max_failure_rate, search_space,
                custom_search_space, params, rerun_overrides=rerun_overrides, fail_stale_trials=fail_stale_trials)


class OptunaNotInstalled(Sweeper):
    """Stands in for the sweeper when hydra-optuna-sweeper is not installed: stops with the install command."""

    def __init__(self, **_: Any) -> None:
        raise ImportError(INSTALL_HINT)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        raise ImportError(INSTALL_HINT)

    def sweep(self, arguments: List[str]) -> Any:
        raise ImportError(INSTALL_HINT)
