"""Sweeps of real vitlab-train runs (tiny ViT on digits, a few batches): the multirun contract (a directory, a
metrics.json and a config per job, the summary written at the end), and an Optuna hparams_search run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF

TINY = ["backbone.embed_dim=32", "backbone.depth=1", "backbone.num_heads=2", "backbone.patch_size=4",
        "data.img_size=16", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false"]


def vitlab_train(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The installed entry point, run from ``cwd`` (relative paths land there, not in the repo)."""
    exe = Path(sys.executable).with_name("vitlab-train")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    env.pop("WANDB_API_KEY", None)
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env,
                          stdin=subprocess.DEVNULL)


def summary_rows(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "sweep_summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_multirun_runs_each_job_in_its_own_directory_and_writes_the_summary(tmp_path):
    sweep_dir = tmp_path / "sweep"
    p = vitlab_train(tmp_path, "-m", "optim.lr=0.001,0.0003", f"hydra.sweep.dir={sweep_dir}", *TINY)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["sweep"]                 # nothing written beside the sweep
    jobs = sorted(d.name for d in sweep_dir.iterdir() if d.is_dir())
    assert jobs == ["0", "1"]
    lrs = {}
    for job in jobs:
        d = sweep_dir / job
        metrics = json.loads((d / "metrics.json").read_text())
        cfg = OmegaConf.load(d / "config.yaml")
        assert cfg.paths.output_dir == str(d)                       # each job wrote into its own directory
        assert (d / "checkpoints" / "last.ckpt").is_file() and "val/best_top1" in metrics
        lrs[job] = cfg.optim.lr
        assert f"optim.lr={cfg.optim.lr}" in OmegaConf.load(d / ".hydra" / "overrides.yaml")
    assert lrs == {"0": 0.001, "1": 0.0003}
    rows = summary_rows(sweep_dir)                                 # written by hydra.callbacks.sweep_report
    assert sorted(r["job"] for r in rows) == ["0", "1"] and {r["status"] for r in rows} == {"ok"}
    assert {float(r["optim.lr"]) for r in rows} == {0.001, 0.0003}
    assert float(rows[0]["val/best_top1"]) >= float(rows[1]["val/best_top1"])         # best first
    assert (sweep_dir / "sweep_summary.png").stat().st_size > 10_000


def test_hparams_search_runs_an_optuna_study_of_vitlab_runs(tmp_path):
    """hparams_search=digits_optuna: no -m needed; the trials' values are the runs' val/best_top1; the study,
    its results and the summary are in the sweep dir."""
    import optuna

    sweep_dir = tmp_path / "optuna"
    p = vitlab_train(tmp_path, "hparams_search=digits_optuna", "hydra.sweeper.n_trials=2",
                     f"hydra.sweep.dir={sweep_dir}", *TINY)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    study = optuna.load_study(study_name="digits_optuna", storage=f"sqlite:///{sweep_dir}/optuna.db")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for t in study.trials:
        metrics = json.loads((sweep_dir / str(t.number) / "metrics.json").read_text())
        cfg = OmegaConf.load(sweep_dir / str(t.number) / "config.yaml")
        assert t.value == pytest.approx(metrics["val/best_top1"])
        assert cfg.optim.lr == pytest.approx(t.params["optim.lr"]) and 1e-3 <= cfg.optim.lr <= 3e-2
    results = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert results.best_value == pytest.approx(study.best_value)
    rows = summary_rows(sweep_dir)
    assert rows[0]["job"] == str(study.best_trial.number)
    assert {"optim.lr", "optim.weight_decay", "backbone.drop_path_rate", "sched.warmup_epochs"} <= set(rows[0])


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml")))
def test_every_hparams_search_option_composes_a_resumable_optuna_sweep(option):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"hparams_search={option}"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("vitlab_optuna_sweeper.VitlabOptunaSweeper")
    assert str(cfg.hydra.mode).endswith("MULTIRUN") and sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.sampler.seed is not None and sweeper.direction == "maximize"
    # no timestamp in the sweep dir: the same command finds the same study again
    assert cfg.hydra.sweep.dir == f"./multirun/optuna/{sweeper.study_name}"
    assert sweeper.storage == f"sqlite:///{cfg.hydra.sweep.dir}/optuna.db"
    assert list(sweeper.rerun_overrides) == ["ckpt_path=auto"] and "ckpt_path" in cfg
    for key in sweeper.params:                                     # every searched key exists in the config
        assert OmegaConf.select(cfg, key) is not None, key
    text = (CONF / "hparams_search" / f"{option}.yaml").read_text()
    assert text.startswith("# @package _global_") and "vitlab-train hparams_search=" + option in text
