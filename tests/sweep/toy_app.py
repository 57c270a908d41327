"""A trivial Hydra task for the Optuna sweeper's tests (no torch: a trial costs milliseconds). Its config
(CONFIG) selects hydra/sweeper=vitlab_optuna with a seeded random sampler over x in [0, 1]."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

CONFIG = textwrap.dedent('''
    defaults:
      - override hydra/sweeper: vitlab_optuna
      - override hydra/sweeper/sampler: random
      - _self_
    x: 0.5
    resumed: false
    kill_at: []
    raise_at: []
    exit_at: []
    exit_code: 2
    nan_at: []
    hydra:
      sweep:
        dir: ???
        subdir: ${hydra.job.num}
      job:
        chdir: false
      sweeper:
        study_name: toy
        storage: sqlite:///${hydra.sweep.dir}/not/yet/there/optuna.db
        direction: maximize
        n_trials: 2
        n_jobs: 1
        max_failure_rate: 0.0
        rerun_overrides: [resumed=true]
        sampler:
          seed: 0
        params:
          x: interval(0, 1)
      callbacks:
        sweep_report:
          _target_: vitlab.cli.sweep_report.SweepReportCallback
''')

# the same task as a script (for a sweep process that is killed for real); run from the folder holding config.yaml
SCRIPT = textwrap.dedent('''
    import os, sys
    sys.path.insert(0, {repo!r})
    import hydra
    from tests.sweep.toy_app import toy_task

    if __name__ == "__main__":
        here = os.path.dirname(os.path.abspath(__file__))
        hydra.main(version_base="1.3", config_path=here, config_name="config")(toy_task)()
''')


def toy_task(cfg) -> float:
    """A trial: writes result.json (x, job number, whether it is a re-run, a timestamp), then raises, exits or kills
    its process when its job number is listed in the config; otherwise writes metrics.json and returns x."""
    hc = HydraConfig.get()
    num, out = hc.job.num, Path(hc.runtime.output_dir)
    (out / "result.json").write_text(json.dumps({"x": cfg.x, "num": num, "resumed": cfg.resumed,
                                                 "t": time.time_ns()}))
    if num in cfg.kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    if num in cfg.raise_at:
        raise FloatingPointError(f"non-finite loss in job {num}")
    if num in cfg.exit_at:
        sys.exit(cfg.exit_code)
    value = math.nan if num in cfg.nan_at else cfg.x
    (out / "metrics.json").write_text(json.dumps({"val/best_score": value}))
    return value
