"""The resumable sweep (see vitlab_optuna_sweeper.py for what differs from the official plugin and why).

The search space, the trial configuration and the grid sampler's handling are the official ``OptunaSweeperImpl``'s;
:meth:`ResumableOptunaSweeperImpl.sweep` replaces its loop. Trials carry three system attributes: the job number
(its output subdirectory), the sweep process that launched it (``host:pid``), and, for a stale trial, that its
parameters were queued again."""

from __future__ import annotations

import functools
import logging
import math
import os
import socket
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, Trial, TrialState

log = logging.getLogger(__name__)

JOB_NUM = "vitlab:job_num"              # the trial's job number: its directory is <sweep dir>/<job num>
SWEEPER = "vitlab:sweeper"              # host:pid of the sweep process that launched the trial
REQUEUED = "vitlab:requeued"            # a stale RUNNING trial, marked FAIL, whose parameters were queued again
RERUN_OF = "vitlab:rerun_of"            # on the queued trial: the stale trial's number
EXIT_PREEMPTED = 75                     # vitlab.lit.fault.EXIT_PREEMPTED: the job checkpointed and wants a requeue



def _has_key(cfg: DictConfig, dotted: str) -> bool:
    """``dotted`` names a node of ``cfg``, whatever its value: a required ``???`` value and an interpolation that
    cannot be resolved yet both count (OmegaConf.select would report them as absent or raise)."""
    parent, _, leaf = dotted.rpartition(".")
    try:
        node = OmegaConf.select(cfg, parent, default=None, throw_on_missing=False) if parent else cfg
    except Exception:                      # an interpolation on the way that does not resolve outside a job
        return False
    try:
        return isinstance(node, DictConfig) and node._get_node(leaf) is not None
    except Exception:                      # a struct config refuses to look up a key it does not have
        return False

class JobsFailInsteadOfExiting:
    """Wraps the task function: a job that exits with a non-zero code (vitlab's ``fail()``: e.g. a value a builder
    refused) is a failed trial instead of the end of the sweep process (``max_failure_rate`` decides). A preempted
    job (exit code 75) still stops the process: its trial stays RUNNING, and the requeued sweep re-runs it in its
    own directory, where the run resumes from its checkpoint. A class, not a closure: launchers pickle it."""

    def __init__(self, task_function: TaskFunction) -> None:
        self.task_function = task_function

    def __call__(self, cfg: DictConfig) -> Any:
        try:
            return self.task_function(cfg)
        except SystemExit as e:
            if e.code in (None, 0, EXIT_PREEMPTED):
                raise
            raise RuntimeError(f"the job exited with code {e.code} (its error is printed above)") from e


def create_sqlite_parent(storage: Any) -> None:
    """sqlite:///relative/or//absolute/file.db: create the file's folder (sqlite cannot open a file in a folder that
    does not exist: "unable to open database file")."""
    if not isinstance(storage, str) or not storage.startswith("sqlite:///"):
        return
    path = storage[len("sqlite:///"):].split("?", 1)[0]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(owner: Optional[str]) -> bool:
    """Whether the sweep process that launched a trial is still running (only knowable on this host; not this
    process: a sweep run again in the same process, as in tests, finds its own earlier trials stale)."""
    host, _, pid = str(owner or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:             # alive, another user's
        return True
    return True


def reseed_sampler(sampler: Any, offset: int) -> None:
    """Move a seeded sampler's random streams on by ``offset`` (the trials the study already has), deterministically.
    A resumed sweep builds its sampler from the same seed: without this the first new trials would repeat the first
    old ones (TPE's startup trials are random samples from that seed)."""
    for obj in (sampler, getattr(sampler, "_random_sampler", None), getattr(sampler, "_independent_sampler", None)):
        rng = getattr(obj, "_rng", None)
        if isinstance(rng, np.random.RandomState):
            base = int(rng.randint(0, 2**31 - 1))          # the seed's first draw: the same in every run
            obj._rng = np.random.RandomState((base + offset) % 2**32)


def _job_overrides(overrides: Sequence[str], extra: Sequence[str]) -> Tuple[str, ...]:
    """``overrides`` plus those of ``extra`` whose key the trial does not set already (Hydra refuses a key twice)."""
    parser = OverridesParser.create()
    have = {o.get_key_element().lstrip("+~") for o in parser.parse_overrides(list(overrides))}
    added = [e for e in extra if parser.parse_overrides([e])[0].get_key_element().lstrip("+~") not in have]
    return tuple(overrides) + tuple(added)


class ResumableOptunaSweeperImpl(OptunaSweeperImpl):
    def __init__(self, *args: Any, rerun_overrides: Optional[Sequence[str]] = None, fail_stale_trials: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rerun_overrides = [str(o) for o in (rerun_overrides or [])]
        self.fail_stale_trials = bool(fail_stale_trials)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=JobsFailInsteadOfExiting(task_function),
                      config=config)

    # -- the search space (as the official sweep(): the sweeper's params, then the command line's) --------------
    def _search_space(self, arguments: List[str]) -> Tuple[Dict[str, BaseDistribution], Dict[str, Any]]:
        self._process_searchspace_config()
        params_conf = self._parse_sweeper_params_config()
        params_conf.extend(arguments)
        distributions, fixed_params = create_params_from_overrides(params_conf)
        search_space = dict(self.search_space_distributions or {})
        search_space.update(distributions)
        if isinstance(self.sampler, functools.partial) and self.sampler.func == optuna.samplers.GridSampler:
            grid = {name: self._to_grid_sampler_choices(d) for name, d in search_space.items()}
            self.sampler = self.sampler(grid)
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))
            log.info("Updating num of trials to %d due to using GridSampler.", self.n_trials)
        for name in fixed_params:
            search_space.pop(name, None)
        return search_space, fixed_params

    def _check_keys(self, search_space: Dict[str, BaseDistribution]) -> None:
        """Every searched key names a config value or a config group, before any trial exists (a typo would
        otherwise fail in every job, and each failed launch would leave its trial to run again)."""
        choices = OmegaConf.select(self.config, "hydra.runtime.choices", default=None) or {}
        unknown = [k for k in search_space if not k.startswith("+") and k not in choices
                   and not _has_key(self.config, k)]
        if unknown:
            raise ValueError(f"hydra.sweeper.params: {', '.join(unknown)} is not a key of the config (nor a config "
                             f"group). Fix the name (e.g. optim.lr), or write +KEY to add a new key on purpose.")

    # -- the study's state ---------------------------------------------------------------------------------------
    def _requeue_stale_trials(self, study: optuna.Study) -> int:
        """Trials left RUNNING by a sweep process that is gone: mark them FAIL (flagged, so they do not count) and
        queue their parameters again, for the same job directory. Returns how many RUNNING trials are live elsewhere."""
        live = 0
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not self.fail_stale_trials or _alive(t.system_attrs.get(SWEEPER)):
                live += 1
                continue
            job_num = int(t.system_attrs.get(JOB_NUM, t.number))
            storage = study._storage               # optuna 2.x has no public API to fail another process's trial
            storage.set_trial_system_attr(t._trial_id, REQUEUED, True)
            storage.set_trial_state(t._trial_id, TrialState.FAIL)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                # study.enqueue_trial(t.params), carrying the job number and the trial it replaces
                study.add_trial(optuna.trial.create_trial(
                    state=TrialState.WAITING,
                    system_attrs={"fixed_params": dict(t.params), JOB_NUM: job_num, RERUN_OF: t.number}))
            log.warning("Trial %d (job %d) was left RUNNING by a sweep that stopped: marked FAIL; its parameters %s "
                        "run again in job %d", t.number, job_num, dict(t.params), job_num)
        return live

    @staticmethod
    def _finished(study: optuna.Study) -> List[FrozenTrial]:
        """The trials that count towards n_trials: finished ones, except stale trials queued again."""
        return [t for t in study.get_trials(deepcopy=False)
                if t.state.is_finished() and not t.system_attrs.get(REQUEUED)]

    # -- running trials --------------------------------------------------------------------------------------------
    def _job_num(self, trial: Trial) -> int:
        num = int(trial.system_attrs.get(JOB_NUM, trial.number))
        trial.set_system_attr(JOB_NUM, num)
        trial.set_system_attr(SWEEPER, _owner())
        job_dir = Path(str(self.config.hydra.sweep.dir)) / str(num)
        if RERUN_OF not in trial.system_attrs and (job_dir / "metrics.json").is_file():
            log.warning("Job directory %s already holds a finished run that study '%s' does not know (was its "
                        "storage replaced?): trial %d writes over it. Use another hydra.sweep.dir for a new study.",
                        job_dir, self.study_name, trial.number)
        return num

    def _launch(self, overrides: List[Tuple[str, ...]], nums: List[int]) -> List[JobReturn]:
        """Launch with job number == ``nums[i]``: one launch per run of consecutive numbers (re-runs of stale trials
        go back to their own directories)."""
        returns: List[JobReturn] = []
        start = 0
        for i in range(1, len(nums) + 1):
            if i == len(nums) or nums[i] != nums[i - 1] + 1:
                returns.extend(self.launcher.launch(overrides[start:i], initial_job_idx=nums[start]))
                start = i
        self.job_idx = max(nums) + 1
        return returns

    def _tell(self, study: optuna.Study, trials: List[Trial], returns: List[JobReturn],
              directions: List[str]) -> List[Exception]:
        failures = []
        for trial, ret in zip(trials, returns):
            values: Optional[List[float]] = None
            try:
                raw = ret.return_value                         # raises the job's exception when it failed
                try:
                    values = [float(v) for v in (raw if len(directions) > 1 else [raw])]
                except (ValueError, TypeError):
                    raise ValueError(f"Return value must be float-castable (one per direction). Got '{raw}'.") \
                        .with_traceback(sys.exc_info()[2])
                if len(values) != len(directions):
                    raise ValueError(f"The number of the values and the number of the objectives are mismatched. "
                                     f"Expect {len(directions)}, but actually {len(values)}.")
                if not all(math.isfinite(v) for v in values):  # a diverged run that returned NaN: a failed trial
                    raise ValueError(f"the job returned a non-finite value {values}")
                try:
                    study.tell(trial=trial, state=TrialState.COMPLETE, values=values)
                except RuntimeError as e:                      # GridSampler stops the study when the grid is done
                    if "`Study.stop` is supposed to be invoked" not in str(e):
                        raise
            except Exception as e:
                study.tell(trial=trial, state=TrialState.FAIL, values=None)
                log.warning("Failed experiment (trial %d): %s", trial.number, e)
                failures.append(e)
        return failures

    def sweep(self, arguments: List[str]) -> None:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        search_space, fixed_params = self._search_space(arguments)
        self._check_keys(search_space)
        directions = self._get_directions()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")     # as Hydra's basic sweeper: the sweep's config
        create_sqlite_parent(self.storage)
        study = optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=self.sampler,
                                    directions=directions, load_if_exists=True)
        log.info(f"Study name: {study.study_name}")
        log.info(f"Storage: {self.storage}")
        log.info(f"Sampler: {type(self.sampler).__name__}")
        log.info(f"Directions: {directions}")

        live = self._requeue_stale_trials(study)
        known = len(study.trials)
        if known:
            reseed_sampler(self.sampler, known)
        finished = len(self._finished(study))
        to_go = self.n_trials - finished - live
        if finished or live:
            log.info("Resuming study '%s': %d of n_trials=%d trials finished%s; %d to run", study.study_name,
                     finished, self.n_trials, f", {live} running in another sweep" if live else "", max(to_go, 0))
        if to_go <= 0:
            log.info("Nothing to run: raise hydra.sweeper.n_trials to run more trials of this study")

        try:
            while to_go > 0:
                batch = min(to_go, self.n_jobs)
                trials = [study.ask() for _ in range(batch)]
                overrides = list(self._configure_trials(trials, search_space, fixed_params))
                nums = [self._job_num(t) for t in trials]
                overrides = [_job_overrides(o, self.rerun_overrides) if RERUN_OF in t.system_attrs else tuple(o)
                             for o, t in zip(overrides, trials)]
                try:
                    returns = self._launch(overrides, nums)
                except Exception:                  # e.g. a job config that does not compose: no trial to run again
                    for t in trials:
                        study.tell(t, state=TrialState.FAIL)
                    raise
                failures = self._tell(study, trials, returns, directions)
                failed = sum(t.state == TrialState.FAIL for t in self._finished(study))
                if failures and failed > self.max_failure_rate * self.n_trials:
                    log.error(f"{failed} trials failed, more than max_failure_rate={self.max_failure_rate} x "
                              f"n_trials={self.n_trials}: stopping the sweep (raise hydra.sweeper.max_failure_rate "
                              f"to allow more failures)")
                    for ret in returns:
                        ret.return_value  # delegate raising to JobReturn, with actual traceback
                    raise RuntimeError(f"{failed} trials failed: {failures[-1]}")   # a non-finite return value
                to_go -= batch
        except Exception:
            self._write_report_quietly()             # Hydra's on_multirun_end callbacks do not run after an error
            raise
        self._save_results(study, directions)

    # -- the results -------------------------------------------------------------------------------------------------
    def _save_results(self, study: optuna.Study, directions: List[str]) -> None:
        """optimization_results.yaml in the sweep dir, as the official plugin writes it (with n_trials done)."""
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        results: Dict[str, Any] = {"name": "optuna"}
        if len(directions) < 2:
            best = study.best_trial if complete else None
            results.update(best_params=best.params if best else {}, best_value=best.value if best else None)
            if best is not None:
                results["best_job"] = best.system_attrs.get(JOB_NUM, best.number)
                log.info(f"Best parameters: {best.params}")
                log.info(f"Best value: {best.value}")
        else:
            best_trials = study.best_trials if complete else []
            results["solutions"] = [{"params": t.params, "values": t.values} for t in best_trials]
            log.info(f"Number of Pareto solutions: {len(best_trials)}")
            for t in best_trials:
                log.info(f"    Values: {t.values}, Params: {t.params}")
        results["n_trials"] = {"complete": len(complete), "finished": len(self._finished(study))}
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")

    def _write_report_quietly(self) -> None:
        try:
            from vitlab.cli.sweep_summary import write_report

            write_report(str(self.config.hydra.sweep.dir))
        except Exception as e:                  # the report must never hide the sweep's own error
            log.warning("no sweep report: %s", e)
