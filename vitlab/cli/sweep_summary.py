"""The summary of a sweep: ``sweep_summary.csv`` (one row per job: status, swept parameters, final metrics, best job
first) and ``sweep_summary.png`` (the metric against each swept parameter, every job's validation curve).

Written at the end of every multirun by :class:`vitlab.cli.sweep_report.SweepReportCallback` (conf/train.yaml,
hydra.callbacks) and by
``vitlab-sweep-report DIR`` for any folder of runs. A job directory is any folder holding ``.hydra/overrides.yaml``,
``metrics.json`` or ``config.yaml`` (what a vitlab-train run writes); the swept parameters are read from each job's
``.hydra/overrides.yaml``, its final metrics from ``metrics.json`` and its curve from ``history.json``
(vitlab.lit.callbacks.RunArtifacts). Reads files only: no torch, no Lightning."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml

from vitlab.io import atomic_write_text, atomic_write_with

log = logging.getLogger(__name__)

SUMMARY_CSV = "sweep_summary.csv"
SUMMARY_PNG = "sweep_summary.png"
JOB_STATUS = "job_status.json"          # written into each job dir of a multirun by SweepReportCallback.on_job_end
# metric names (the last part, split at "_") that are better when lower; anything else is better when higher
LOWER_IS_BETTER = {"loss", "error", "err", "fid", "kid", "mse", "nll", "bpd", "perplexity", "ppl"}
FALLBACK_METRICS = ("val/top1", "val/map", "val/miou", "val/knn_top1", "val/loss")

Mode = Literal["max", "min"]


class NoJobsError(ValueError):
    """The folder holds no job directory."""


@dataclass
class Job:
    path: Path
    name: str                                       # relative to the sweep dir
    num: Optional[int]                              # Hydra's job number
    status: str                                     # ok | failed | preempted | incomplete
    note: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def value(self, metric: Optional[str]) -> Optional[float]:
        v = self.metrics.get(metric) if metric else None
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


@dataclass
class Summary:
    sweep_dir: Path
    jobs: list[Job]                                 # best first, then the jobs without the metric
    params: list[str]                               # the swept parameters (override keys)
    metric: Optional[str]
    mode: Mode

    @property
    def best(self) -> Optional[Job]:
        return self.jobs[0] if self.jobs and self.jobs[0].value(self.metric) is not None else None

    @property
    def metric_columns(self) -> list[str]:
        keys = sorted({k for j in self.jobs for k in j.metrics if k.startswith(("val/", "test/"))})
        return ([self.metric] if self.metric in keys else []) + [k for k in keys if k != self.metric]


# -- reading the sweep ---------------------------------------------------------------------------------------------
def _is_job_dir(d: Path) -> bool:
    return (d / ".hydra" / "overrides.yaml").is_file() or (d / "metrics.json").is_file() or \
        (d / "config.yaml").is_file()


def find_job_dirs(root: Path) -> list[Path]:
    """Every job directory under ``root`` (``root`` itself when it is one); a job dir's own subfolders
    (checkpoints/, csv/, .hydra/) are not searched."""
    root = Path(root)
    if _is_job_dir(root):
        return [root]
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        d = Path(dirpath)
        if d != root and _is_job_dir(d):
            found.append(d)
            dirnames[:] = []
        else:
            dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
    return found


def _read_json(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def parse_value(text: str) -> Any:
    """An override's value as a number, bool or None when it reads as one (``1e-3`` included), else the string."""
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    if t.lower() in ("null", "none"):
        return None
    for cast in (int, float):
        try:
            return cast(t)
        except ValueError:
            pass
    return t.strip("'\"")


def _overrides(path: Path) -> dict[str, Any]:
    items = _read_yaml(path / ".hydra" / "overrides.yaml")
    out = {}
    for item in items if isinstance(items, list) else []:
        key, sep, value = str(item).partition("=")
        if sep:
            out[key.lstrip("+~")] = parse_value(value)
    return out


def _job_num(path: Path) -> Optional[int]:
    if path.name.isdigit():                          # hydra.sweep.subdir is ${hydra.job.num} by default
        return int(path.name)
    hydra_cfg = _read_yaml(path / ".hydra" / "hydra.yaml") or {}
    num = ((hydra_cfg.get("hydra") or {}).get("job") or {}).get("num") if isinstance(hydra_cfg, dict) else None
    return num if isinstance(num, int) else None


def _status(path: Path, metrics: dict) -> tuple[str, str]:
    recorded = _read_json(path / JOB_STATUS) or {}
    if recorded.get("status") == "failed":
        return "failed", str(recorded.get("error", ""))
    if not metrics and (path / "nonfinite_report.json").is_file():
        return "failed", "non-finite loss (nonfinite_report.json)"
    if metrics:
        return "ok", ""
    if (path / "preempted.json").is_file():
        return "preempted", "checkpointed on a preemption signal: the same command resumes it"
    return "incomplete", "no metrics.json: still running, killed, or stopped before training ended"


def read_job(path: Path, root: Path) -> Job:
    metrics = _read_json(path / "metrics.json") or {}
    status, note = _status(path, metrics)
    name = "." if path == root else path.relative_to(root).as_posix()
    return Job(path, name, _job_num(path), status, note, _overrides(path), metrics)


def _sweep_settings(root: Path) -> tuple[list[str], set[str]]:
    """From the sweep's multirun.yaml: the keys the sweep set (command-line sweeps like ``optim.lr=1e-3,3e-4``, the
    sweeper's ``params``) and the keys that are no hyperparameters (the Optuna sweeper's ``rerun_overrides``)."""
    cfg = _read_yaml(root / "multirun.yaml")
    hydra_cfg = cfg.get("hydra") if isinstance(cfg, dict) else None
    if not isinstance(hydra_cfg, dict):
        return [], set()
    swept: list[str] = []
    task = (hydra_cfg.get("overrides") or {}).get("task") or []
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        for o in OverridesParser.create().parse_overrides([str(t) for t in task]):
            if o.is_sweep_override():
                swept.append(o.get_key_element().lstrip("+~"))
    except Exception:                               # an override this Hydra cannot parse: keep the varying keys
        pass
    sweeper = hydra_cfg.get("sweeper") or {}
    swept += [str(k) for k in (sweeper.get("params") or {})]
    ignored = {str(o).partition("=")[0].lstrip("+~") for o in (sweeper.get("rerun_overrides") or [])}
    return swept, ignored


def swept_params(jobs: Sequence[Job], declared: Sequence[str] = (), ignored: set[str] = frozenset()) -> list[str]:
    """The declared sweep keys, then every other override key whose value differs between jobs (or is missing in
    some), in the order they first appear."""
    seen: list[str] = []
    for j in jobs:
        seen += [k for k in j.params if k not in seen]
    varying = [k for k in seen if len({repr(j.params.get(k, "<unset>")) for j in jobs}) > 1]
    out = []
    for k in [*declared, *varying]:
        if k not in out and k not in ignored and not k.startswith("hydra."):
            out.append(k)
    return out


def default_metric(jobs: Sequence[Job]) -> Optional[str]:
    """The runs' monitored metric (``val/best_<name>``, written when a metric picks best.ckpt), else the first of
    val/top1, val/map, val/miou, val/knn_top1, val/loss, else any val/ metric the jobs have."""
    keys = [k for j in jobs for k in j.metrics]
    best = sorted({k for k in keys if k.startswith("val/best_")}, key=lambda k: (-keys.count(k), k))
    if best:
        return best[0]
    for k in FALLBACK_METRICS:
        if k in keys:
            return k
    val = sorted({k for k in keys if k.startswith("val/")})
    return val[0] if val else None


def metric_mode(metric: Optional[str], jobs: Sequence[Job] = ()) -> Mode:
    """``min`` or ``max``: the run's ``recipe.monitor_mode`` when its ``recipe.monitor`` is this metric (config.yaml),
    else by the name: loss, error, FID, ... are better lower."""
    if not metric:
        return "max"
    base = metric.rpartition("/")[2].removeprefix("best_")
    for j in jobs:
        cfg = _read_yaml(j.path / "config.yaml") if (j.path / "config.yaml").is_file() else None
        recipe = cfg.get("recipe") if isinstance(cfg, dict) else None
        if isinstance(recipe, dict):
            monitor, mode = recipe.get("monitor"), recipe.get("monitor_mode")
            if isinstance(monitor, str) and monitor.rpartition("/")[2] == base and mode in ("min", "max"):
                return mode
            break                                   # one config is enough: the jobs of a sweep share the recipe
    return "min" if LOWER_IS_BETTER & set(base.lower().split("_")) else "max"


def summarize(sweep_dir, metric: Optional[str] = None, mode: Optional[Mode] = None) -> Summary:
    """Read every job under ``sweep_dir``; sort by ``metric`` (default: :func:`default_metric`), best first."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise NoJobsError(f"{root} is not a directory: pass a sweep's directory (its hydra.sweep.dir, e.g. "
                          f"multirun/<date>/<time>) or a folder of run directories")
    paths = find_job_dirs(root)
    if not paths:
        raise NoJobsError(f"no job directory under {root}: looked for folders holding .hydra/overrides.yaml, "
                          f"metrics.json or config.yaml (the run directories vitlab-train writes)")
    jobs = [read_job(p, root) for p in paths]
    jobs.sort(key=lambda j: (j.num is None, j.num if j.num is not None else 0, j.name))
    if metric is not None and not any(metric in j.metrics for j in jobs):
        have = sorted({k for j in jobs for k in j.metrics if k.startswith(("val/", "test/"))})
        raise NoJobsError(f"no job under {root} has the metric '{metric}' in its metrics.json; metrics there: "
                          f"{', '.join(have) or 'none (no job finished)'}")
    metric = metric or default_metric(jobs)
    mode = mode or metric_mode(metric, [j for j in jobs if j.status == "ok"])
    sign = -1.0 if mode == "max" else 1.0
    scored = sorted((j for j in jobs if j.value(metric) is not None), key=lambda j: sign * j.value(metric))
    rest = [j for j in jobs if j.value(metric) is None]
    declared, ignored = _sweep_settings(root)
    return Summary(root, scored + rest, swept_params(jobs, declared, ignored), metric, mode)


# -- writing it ---------------------------------------------------------------------------------------------------
def _cell(v: Any) -> Any:
    return "" if v is None else v


def csv_text(summary: Summary) -> str:
    """One header row, one row per job (best first): job, num, status, the swept parameters, the final metrics
    (the sort metric first), epoch, step, note."""
    metrics = summary.metric_columns
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["job", "num", "status", *summary.params, *metrics, "epoch", "step", "note"])
    for j in summary.jobs:
        w.writerow([j.name, _cell(j.num), j.status, *(_cell(j.params.get(k)) for k in summary.params),
                    *(_cell(j.metrics.get(k)) for k in metrics), _cell(j.metrics.get("train/epochs")),
                    _cell(j.metrics.get("train/global_step")), j.note])
    return buf.getvalue()


def use_log_x(values: Sequence[Any]) -> bool:
    """Log scale for a numeric parameter whose values are all positive and span at least 10x (learning rates)."""
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return bool(nums) and len(nums) == len(values) and min(nums) > 0 and max(nums) / min(nums) >= 10


def _is_numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _curve_key(metric: Optional[str]) -> Optional[str]:
    """The per-epoch key in history.json behind a final metric: val/best_top1 -> val/top1, test/x -> val/x."""
    if not metric:
        return None
    prefix, _, name = metric.rpartition("/")
    return f"val/{name.removeprefix('best_')}" if prefix in ("val", "test") else metric


def _curves(summary: Summary) -> tuple[Optional[str], list[tuple[Job, list[float], list[float]]]]:
    for key in dict.fromkeys([_curve_key(summary.metric), "val/loss"]):
        found = []
        for j in summary.jobs:
            hist = _read_json(j.path / "history.json") or {}
            pts = [(e["epoch"] + 1, e[key]) for e in hist.get("epochs", []) if isinstance(e, dict)
                   and key in e and "epoch" in e]
            if pts:
                found.append((j, [p[0] for p in pts], [p[1] for p in pts]))
        if found:
            return key, found
    return None, []


def _job_label(j: Job) -> str:
    return f"job {j.num}" if j.num is not None else j.name


def make_figure(summary: Summary):
    """The summary plot: a panel per swept parameter (the metric against it; log x for wide positive ranges,
    categories for anything not numeric; the best job starred) and a panel of every job's validation curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    curve_key, curves = _curves(summary)
    panels: list[Optional[str]] = list(summary.params) + ([None] if curves else [])
    cols = min(3, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.5 * rows + 0.8), squeeze=False)
    metric, best = summary.metric, summary.best
    scored = [j for j in summary.jobs if j.value(metric) is not None]
    for ax, key in zip(axes.flat, panels):
        if key is None:
            for j, x, y in curves:
                is_best = best is not None and j is best
                ax.plot(x, y, "o-" if len(x) < 20 else "-", lw=2.2 if is_best else 1.0, ms=3,
                        alpha=1.0 if is_best else 0.6, label=_job_label(j) + (" (best)" if is_best else ""),
                        zorder=3 if is_best else 2)
            ax.set_xlabel("epoch"), ax.set_ylabel(curve_key), ax.set_title(f"{curve_key} per epoch", fontsize=10)
            if len(curves) <= 8:
                ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            continue
        have = [j for j in scored if key in j.params]
        xs, ys = [j.params[key] for j in have], [j.value(metric) for j in have]
        ax.set_xlabel(key), ax.set_ylabel(metric or ""), ax.grid(alpha=0.3)
        ax.set_title(f"{metric} vs {key}", fontsize=10)
        if not xs:
            ax.text(0.5, 0.5, "no job has the metric", ha="center", va="center", transform=ax.transAxes)
            continue
        if _is_numeric(xs):
            pos = xs
            if use_log_x(xs):
                ax.set_xscale("log")
            else:                                       # learning rates on a linear axis: few, short tick labels
                ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
                ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
        else:                                           # categories, in alphabetical order
            cats = sorted({str(x) for x in xs})
            pos = [cats.index(str(x)) for x in xs]
            ax.set_xticks(range(len(cats)))
            ax.set_xticklabels(cats, rotation=30 if sum(len(c) for c in cats) > 24 else 0, fontsize=8)
            ax.set_xlim(-0.5, len(cats) - 0.5)
        ax.scatter(pos, ys, s=28, alpha=0.8, zorder=2)
        if best is not None and best in have:
            i = have.index(best)
            ax.scatter([pos[i]], [ys[i]], marker="*", s=220, c="tab:red", zorder=3)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no swept parameter and no history.json curve", ha="center", va="center")
    fig.suptitle(_title(summary), fontsize=10)
    fig.tight_layout()
    return fig


def _title(summary: Summary) -> str:
    lines = [f"{summary.sweep_dir.name or summary.sweep_dir}: {len(summary.jobs)} jobs, "
             f"{summary.metric or 'no metric'} ({summary.mode})"]
    if summary.best is not None:
        b = summary.best
        lines[0] += f"; best (red star) {_job_label(b)}: {b.value(summary.metric):.4g}"
    for status in ("failed", "preempted", "incomplete"):
        names = [_job_label(j) for j in summary.jobs if j.status == status]
        if names:
            shown = ", ".join(names[:12]) + (f", ... ({len(names)})" if len(names) > 12 else "")
            lines.append(f"{status}: {shown}")
    return "\n".join(lines)


def write_summary(summary: Summary) -> tuple[Path, Path]:
    import matplotlib.pyplot as plt

    csv_path, png_path = summary.sweep_dir / SUMMARY_CSV, summary.sweep_dir / SUMMARY_PNG
    atomic_write_text(csv_path, csv_text(summary))
    fig = make_figure(summary)
    try:
        atomic_write_with(png_path, lambda f: fig.savefig(f, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return csv_path, png_path


def write_report(sweep_dir, metric: Optional[str] = None, mode: Optional[Mode] = None) -> tuple[Path, Path]:
    """Summarize the sweep in ``sweep_dir`` into ``sweep_summary.csv`` and ``sweep_summary.png`` there; returns
    their paths. Raises :class:`NoJobsError` when the folder holds no job (or no job has ``metric``)."""
    return write_summary(summarize(sweep_dir, metric, mode))


# -- Hydra callback ------------------------------------------------------------------------------------------------
