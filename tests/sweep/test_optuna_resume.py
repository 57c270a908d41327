"""The resumable Optuna sweeper (hydra/sweeper=vitlab_optuna) with a trivial task (tests/sweep/toy_app.py), swept
in this process through Hydra's own multirun: a resumed study finishes n_trials in total without overwriting a job
directory, a sweep process killed mid-trial (a real SIGKILL) re-runs that trial in its own directory, failed jobs
are failed trials within max_failure_rate, a preempted job stops the sweep with its exit code."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hydra_plugins.vitlab_optuna_sweeper._impl import _alive
from tests.conftest import REPO
from tests.sweep.toy_app import CONFIG, SCRIPT, toy_task

COMPLETE, FAIL, RUNNING = TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING


class Toy:
    """The toy app's folder: ``toy(*overrides)`` sweeps in this process, ``toy.script(*overrides)`` in a child."""

    def __init__(self, root: Path):
        self.root, self.sweep_dir = root, root / "sweep"
        (root / "config.yaml").write_text(CONFIG)
        (root / "app.py").write_text(SCRIPT.format(repo=str(REPO)))

    def __call__(self, *overrides: str) -> None:
        from hydra._internal.hydra import Hydra
        from hydra._internal.utils import create_config_search_path
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.hydra_config import HydraConfig

        GlobalHydra.instance().clear()
        hydra = Hydra.create_main_hydra2(task_name="toy", config_search_path=create_config_search_path(str(self.root)))
        try:                                  # Hydra's logging config off: pytest keeps its handlers (caplog)
            hydra.multirun(config_name="config", task_function=toy_task,
                           overrides=[f"hydra.sweep.dir={self.sweep_dir}", "hydra/job_logging=none",
                                      "hydra/hydra_logging=none", *overrides])
        finally:
            GlobalHydra.instance().clear()
            HydraConfig.instance().cfg = None    # later in-process runs must not see this sweep's job config

    def script(self, *overrides: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
        return subprocess.run([sys.executable, "app.py", "-m", f"hydra.sweep.dir={self.sweep_dir}", *overrides],
                              cwd=self.root, capture_output=True, text=True, timeout=180, env=env,
                              stdin=subprocess.DEVNULL)

    def study(self) -> optuna.Study:
        return optuna.load_study(study_name="toy", storage=f"sqlite:///{self.sweep_dir}/not/yet/there/optuna.db")

    def states(self) -> list[TrialState]:
        return [t.state for t in self.study().trials]

    def job_dirs(self) -> list[str]:
        return sorted((p.name for p in self.sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=int)

    def result(self, job: str) -> dict:
        return json.loads((self.sweep_dir / job / "result.json").read_text())

    def snapshot(self, job: str) -> tuple[bytes, int]:
        f = self.sweep_dir / job / "result.json"
        return f.read_bytes(), f.stat().st_mtime_ns

    def report(self) -> dict[str, dict]:
        with open(self.sweep_dir / "sweep_summary.csv", newline="") as f:
            return {r["job"]: r for r in csv.DictReader(f)}


@pytest.fixture
def toy(tmp_path, caplog) -> Toy:
    caplog.set_level(logging.INFO, logger="hydra_plugins.vitlab_optuna_sweeper._impl")
    return Toy(tmp_path)


def test_a_resumed_study_runs_the_remaining_trials_in_new_job_dirs(toy, caplog):
    toy()
    assert (toy.sweep_dir / "not" / "yet" / "there" / "optuna.db").is_file()     # the sqlite folder was created
    assert toy.job_dirs() == ["0", "1"] and toy.states() == [COMPLETE] * 2
    before = {n: toy.snapshot(n) for n in ("0", "1")}

    toy("hydra.sweeper.n_trials=3")                 # the study's total: one more trial, not three more
    assert "2 of n_trials=3 trials finished; 1 to run" in caplog.text
    trials = toy.study().trials
    assert [t.state for t in trials] == [COMPLETE] * 3 and toy.job_dirs() == ["0", "1", "2"]
    assert {n: toy.snapshot(n) for n in ("0", "1")} == before                    # not written again
    for t in trials:                                # job number == trial number
        assert toy.result(str(t.number))["x"] == t.params["x"] == t.value
        assert t.system_attrs["vitlab:job_num"] == t.number
    xs = [t.params["x"] for t in trials]
    assert len(set(xs)) == 3                        # the resumed (re-seeded) sampler does not repeat trial 0

    caplog.clear()
    toy("hydra.sweeper.n_trials=3")                 # nothing left to run: the results are written again
    assert "Nothing to run" in caplog.text and len(toy.study().trials) == 3
    results = (toy.sweep_dir / "optimization_results.yaml").read_text()
    assert f"best_value: {max(xs)}" in results and f"best_job: {xs.index(max(xs))}" in results
    assert list(toy.report()) == [str(i) for i in sorted(range(3), key=lambda i: -xs[i])]    # best first


def test_a_trial_left_running_by_a_killed_sweep_runs_again_in_its_own_dir(toy, caplog):
    p = toy.script("hydra.sweeper.n_trials=3", "kill_at=[1]")        # SIGKILL of the sweep process in trial 1
    assert p.returncode == -signal.SIGKILL, p.stdout[-2000:] + p.stderr[-2000:]
    assert toy.states() == [COMPLETE, RUNNING]
    killed_x = toy.study().trials[1].params["x"]
    first = toy.snapshot("0")

    toy("hydra.sweeper.n_trials=3")
    assert "Trial 1 (job 1) was left RUNNING by a sweep that stopped" in caplog.text
    trials = toy.study().trials
    # trial 1 failed and was queued again as trial 2, which ran in job dir 1; trial 3 is new; 3 trials count
    assert [t.state for t in trials] == [COMPLETE, FAIL, COMPLETE, COMPLETE]
    assert trials[1].system_attrs["vitlab:requeued"] and trials[2].params["x"] == killed_x
    assert [t.system_attrs["vitlab:job_num"] for t in (trials[2], trials[3])] == [1, 3]
    assert toy.job_dirs() == ["0", "1", "3"] and toy.snapshot("0") == first
    assert toy.result("1") == {**toy.result("1"), "x": killed_x, "resumed": True}    # rerun_overrides applied
    assert toy.result("3")["resumed"] is False
    assert {r["status"] for r in toy.report().values()} == {"ok"}


def test_failed_jobs_are_failed_trials_within_max_failure_rate(toy):
    """A raised error, sys.exit(2) (vitlab's error exit) and a NaN objective each fail their trial; the sweep goes
    on while failures <= max_failure_rate x n_trials; the report says which failed and why."""
    toy("hydra.sweeper.n_trials=4", "hydra.sweeper.max_failure_rate=0.75", "raise_at=[0]", "exit_at=[1]",
        "nan_at=[2]")
    assert toy.states() == [FAIL, FAIL, FAIL, COMPLETE]
    rows = toy.report()
    assert rows["3"]["status"] == "ok" and [rows[n]["status"] for n in "012"] == ["failed"] * 3
    assert "FloatingPointError: non-finite loss in job 0" in rows["0"]["note"]
    assert "exited with code 2" in rows["1"]["note"] and "nan" in rows["2"]["note"]


def test_too_many_failures_stop_the_sweep_with_a_report(toy, caplog):
    with pytest.raises(FloatingPointError, match="non-finite loss in job 1"):     # the job's own error
        toy("hydra.sweeper.n_trials=4", "hydra.sweeper.max_failure_rate=0.25", "raise_at=[0,1]")
    assert "2 trials failed, more than max_failure_rate=0.25 x n_trials=4" in caplog.text
    assert toy.states() == [FAIL, FAIL] and toy.job_dirs() == ["0", "1"]
    assert [r["status"] for r in toy.report().values()] == ["failed", "failed"]


def test_a_preempted_job_stops_the_sweep_with_its_exit_code(toy):
    """Exit code 75 (vitlab.lit.fault: checkpointed, requeue me) is no failed trial: the sweep process exits with it
    and the trial stays RUNNING, so the requeued command re-runs it in its own directory (where the run resumes)."""
    with pytest.raises(SystemExit) as e:
        toy("hydra.sweeper.n_trials=3", "exit_at=[1]", "exit_code=75")
    assert e.value.code == 75 and toy.states() == [COMPLETE, RUNNING]


def test_a_running_trial_of_a_live_sweep_on_this_host_is_left_alone():
    host = socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert _alive(f"{host}:{sleeper.pid}")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not _alive(f"{host}:{sleeper.pid}")                  # gone
    assert not _alive(f"{host}:{os.getpid()}")                  # this process: its earlier sweep has ended
    assert not _alive(f"another-{host}:{os.getppid()}")         # elsewhere: unknowable, taken as stale
    assert not _alive(None)


def test_an_unknown_search_key_stops_before_any_trial(toy):
    with pytest.raises(ValueError, match=r"hydra.sweeper.params: xx is not a key of the config .*\+KEY"):
        toy("+hydra.sweeper.params.xx='interval(0,1)'")
    assert not (toy.sweep_dir / "not" / "yet" / "there" / "optuna.db").exists()
