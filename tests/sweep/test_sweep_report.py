"""The sweep report on synthetic sweep directories (no training): CSV rows, columns and order, statuses, the metric's
direction, the plot's scales, the CLI's table and errors, and the Hydra callback's never-raise contract."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from omegaconf import OmegaConf

from tests.conftest import run_cli
from vitlab.cli.sweep_report import main as report_main
from vitlab.cli.sweep_report import SweepReportCallback
from vitlab.cli.sweep_summary import (JOB_STATUS, make_figure, metric_mode, parse_value, summarize,
                                 use_log_x, write_report)


def make_job(d: Path, overrides: list[str], metrics: dict | None = None, curve: list[float] | None = None,
             config: dict | None = None, status: dict | None = None, num: int | None = None) -> Path:
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if num is not None:
        (d / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    if curve is not None:
        epochs = [{"epoch": i, "step": 10 * (i + 1), "val/top1": v, "val/loss": 1 - v} for i, v in enumerate(curve)]
        (d / "history.json").write_text(json.dumps({"steps": [], "epochs": epochs}))
    if config is not None:
        (d / "config.yaml").write_text(yaml.safe_dump(config))
    if status is not None:
        (d / JOB_STATUS).write_text(json.dumps(status))
    return d


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A basic-sweeper sweep over optim.lr (1e-4..1e-2) and augment (categorical): 3 finished jobs, one failed, one
    that never finished, and one in a nested, non-numeric folder."""
    root = tmp_path / "sweep"
    root.mkdir()
    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": [
        "optim.lr=1e-4,1e-3,1e-2", "augment=simple,deit", "trainer.max_epochs=3"]}, "sweeper": {"params": None}}}))
    fixed = ["trainer.max_epochs=3"]
    make_job(root / "0", ["optim.lr=1e-4", "augment=simple", *fixed],
             {"val/best_top1": 0.50, "val/top1": 0.48, "test/top1": 0.47, "train/epochs": 3, "train/global_step": 30},
             curve=[0.3, 0.4, 0.5])
    make_job(root / "1", ["optim.lr=1e-3", "augment=deit", *fixed],
             {"val/best_top1": 0.90, "val/top1": 0.90, "test/top1": 0.88, "train/epochs": 3, "train/global_step": 30},
             curve=[0.5, 0.8, 0.9])
    make_job(root / "2", ["optim.lr=1e-2", "augment=simple", *fixed],
             {"val/best_top1": 0.70, "val/top1": 0.65, "test/top1": 0.66, "train/epochs": 3, "train/global_step": 30},
             curve=[0.6, 0.7, 0.65])
    make_job(root / "3", ["optim.lr=1e-2", "augment=deit", *fixed],
             status={"status": "failed", "error": "FloatingPointError: non-finite loss at step 7"})
    make_job(root / "4", ["optim.lr=1e-3", "augment=simple", *fixed])
    make_job(root / "nested" / "late", ["optim.lr=3e-3", "augment=deit", *fixed],
             {"val/best_top1": 0.80, "val/top1": 0.80, "train/epochs": 3, "train/global_step": 30}, num=5)
    return root


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_has_one_row_per_job_best_first_with_params_metrics_and_status(sweep):
    csv_path, png_path = write_report(sweep)
    assert (csv_path, png_path) == (sweep / "sweep_summary.csv", sweep / "sweep_summary.png")
    rows = read_csv(csv_path)
    header = next(csv.reader(open(csv_path)))
    # the swept keys (not the constant trainer.max_epochs), the sort metric first among the metrics
    assert header[:6] == ["job", "num", "status", "optim.lr", "augment", "val/best_top1"]
    assert "trainer.max_epochs" not in header and header[-3:] == ["epoch", "step", "note"]
    assert [r["job"] for r in rows] == ["1", "nested/late", "2", "0", "3", "4"]      # by val/best_top1, then the rest
    assert [r["num"] for r in rows] == ["1", "5", "2", "0", "3", "4"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "ok", "failed", "incomplete"]
    assert "non-finite loss" in rows[4]["note"] and rows[5]["note"]
    assert float(rows[0]["optim.lr"]) == pytest.approx(1e-3) and rows[0]["augment"] == "deit"
    assert float(rows[0]["test/top1"]) == pytest.approx(0.88) and rows[1]["test/top1"] == ""
    assert rows[0]["epoch"] == "3" and rows[0]["step"] == "30"
    assert rows[4]["val/best_top1"] == ""


def test_png_decodes_and_lists_the_failed_jobs(sweep):
    from PIL import Image

    _, png = write_report(sweep)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] >= 800 and 250 <= im.size[1] <= 2000
    summary = summarize(sweep)
    fig = make_figure(summary)
    title = fig._suptitle.get_text()
    assert "failed: job 3" in title and "incomplete: job 4" in title and "best (red star) job 1" in title
    # a panel per swept parameter + the curves panel (every job with a history.json)
    labels = [ax.get_xlabel() for ax in fig.axes if ax.axison]
    assert labels == ["optim.lr", "augment", "epoch"]
    curves = [ax for ax in fig.axes if ax.get_xlabel() == "epoch"][0]
    assert len(curves.get_lines()) == 3


def test_log_x_for_wide_positive_ranges_and_categories_for_strings(sweep, tmp_path):
    assert use_log_x([1e-4, 1e-3, 1e-2]) and use_log_x([1, 10])
    assert not use_log_x([0.1, 0.5]) and not use_log_x([0.0, 1e-3, 1e-2]) and not use_log_x(["a", "b"])
    assert not use_log_x([-1e-2, 1e-4])
    fig = make_figure(summarize(sweep))
    by_label = {ax.get_xlabel(): ax for ax in fig.axes}
    assert by_label["optim.lr"].get_xscale() == "log"
    assert by_label["augment"].get_xscale() == "linear"
    assert [t.get_text() for t in by_label["augment"].get_xticklabels()] == ["deit", "simple"]

    narrow = tmp_path / "narrow"
    for i, wd in enumerate([0.01, 0.05]):
        make_job(narrow / str(i), [f"optim.weight_decay={wd}"], {"val/best_top1": 0.5 + i / 10})
    fig = make_figure(summarize(narrow))
    assert {ax.get_xlabel(): ax.get_xscale() for ax in fig.axes if ax.axison} == {"optim.weight_decay": "linear"}


def test_loss_metrics_rank_lowest_first(tmp_path):
    for i, loss in enumerate([0.9, 0.2, 0.5]):
        make_job(tmp_path / str(i), [f"optim.lr={10.0 ** -(i + 2)}"], {"val/best_loss": loss, "val/loss": loss})
    s = summarize(tmp_path)
    assert s.metric == "val/best_loss" and s.mode == "min"
    assert [j.name for j in s.jobs] == ["1", "2", "0"]
    # --mode max reverses it
    assert [j.name for j in summarize(tmp_path, mode="max").jobs] == ["0", "2", "1"]


def test_mode_comes_from_the_runs_recipe_monitor_mode(tmp_path):
    """A metric whose name says nothing (val/best_score): the run's config.yaml tells the direction."""
    cfg = {"recipe": {"monitor": "val/score", "monitor_mode": "min"}}
    for i, v in enumerate([0.3, 0.1]):
        make_job(tmp_path / str(i), [f"seed={i}"], {"val/best_score": v}, config=cfg)
    s = summarize(tmp_path)
    assert (s.metric, s.mode) == ("val/best_score", "min") and s.jobs[0].name == "1"
    assert metric_mode("val/best_top1") == "max" and metric_mode("val/best_loss") == "min"
    assert metric_mode("val/fid") == "min" and metric_mode("test/miou") == "max"


def test_metric_defaults_to_val_top1_without_a_monitored_metric(tmp_path):
    for i, v in enumerate([0.2, 0.6]):
        make_job(tmp_path / str(i), [f"optim.lr={i + 1}e-3"], {"val/top1": v, "val/loss": 1 - v})
    s = summarize(tmp_path)
    assert (s.metric, s.mode, s.jobs[0].name) == ("val/top1", "max", "1")
    assert s.params == ["optim.lr"]


def test_override_values_are_typed():
    assert parse_value("1e-3") == pytest.approx(1e-3) and parse_value("3") == 3 and parse_value("true") is True
    assert parse_value("null") is None and parse_value("vit_small") == "vit_small" and parse_value("'a b'") == "a b"


def test_cli_prints_the_top_jobs_and_writes_both_files(sweep, capsys):
    report_main([str(sweep), "--top", "2"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("6 jobs (4 ok, 1 failed, 1 incomplete); ranked by val/best_top1 (max)")
    assert lines[1].split() == ["#", "job", "status", "val/best_top1", "optim.lr", "augment"]
    assert lines[2].split()[:4] == ["1", "1", "ok", "0.9"] and lines[3].split()[:2] == ["2", "nested/late"]
    assert f"wrote {sweep / 'sweep_summary.csv'}" in out and (sweep / "sweep_summary.png").is_file()


def test_cli_errors_name_what_it_looked_for(tmp_path, sweep, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        report_main([str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no job directory under" in err and ".hydra/overrides.yaml" in err
    with pytest.raises(SystemExit) as e:
        report_main([str(sweep), "--metric", "val/nope"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "'val/nope'" in err and "val/best_top1" in err     # names the metrics there
    assert not (tmp_path / "empty" / "sweep_summary.csv").exists()


def test_entry_point_runs_as_a_module(sweep):
    p = run_cli("vitlab.cli.sweep_report", str(sweep), "--metric", "test/top1", timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = read_csv(sweep / "sweep_summary.csv")
    assert [r["job"] for r in rows][:3] == ["1", "2", "0"] and "ranked by test/top1 (max)" in p.stdout


def _cfg(**hydra) -> OmegaConf:
    return OmegaConf.create({"hydra": hydra})


def test_callback_writes_the_job_status_and_the_report_and_never_raises(tmp_path, sweep):
    cb = SweepReportCallback()
    job = tmp_path / "job"
    job.mkdir()
    cfg = _cfg(runtime={"output_dir": str(job)})
    failed = SimpleNamespace(status="JobStatus.FAILED", _return_value=FloatingPointError("non-finite loss\nmore"))
    cb.on_job_end(cfg, job_return=failed)
    assert json.loads((job / JOB_STATUS).read_text()) == {"status": "failed",
                                                          "error": "FloatingPointError: non-finite loss"}
    cb.on_job_start(cfg, task_function=None)          # a re-run in the same directory starts without it
    assert not (job / JOB_STATUS).exists()
    cb.on_job_end(cfg, job_return=SimpleNamespace(status="JobStatus.COMPLETED", _return_value=math.nan))
    assert json.loads((job / JOB_STATUS).read_text())["status"] == "failed"
    cb.on_job_end(cfg, job_return=SimpleNamespace(status="JobStatus.COMPLETED", _return_value=0.75))
    assert json.loads((job / JOB_STATUS).read_text()) == {"status": "completed", "return_value": 0.75}

    cb.on_multirun_end(_cfg(sweep={"dir": str(sweep)}))
    assert (sweep / "sweep_summary.csv").is_file() and (sweep / "sweep_summary.png").is_file()
    cb.on_multirun_end(_cfg(sweep={"dir": str(tmp_path / "missing")}))    # logs a warning, no exception
    cb.on_job_end(_cfg(runtime={"output_dir": "/proc/no/such/dir"}), job_return=failed)
    assert not (tmp_path / "missing").exists()
