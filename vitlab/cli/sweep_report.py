"""vitlab-sweep-report: summarize a sweep (or any folder of runs) into sweep_summary.csv and sweep_summary.png.

    vitlab-sweep-report multirun/2024-05-01/12-00-00
    vitlab-sweep-report multirun/optuna/digits_optuna --metric test/top1
    vitlab-sweep-report outputs --metric val/loss --mode min

A multirun writes the same report when it ends (hydra.callbacks.sweep_report in conf/train.yaml); this command
writes it again, e.g. while a sweep is still running or after one stopped early.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from vitlab.cli.common import fail
from vitlab.io import atomic_write_json
from vitlab.cli.sweep_summary import JOB_STATUS, _job_label, summarize, write_summary

log = logging.getLogger("vitlab")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def top_table(summary, n: int = 5) -> str:
    """The best ``n`` jobs: rank, job, status, the metric and the swept parameters, as aligned columns."""
    head = ["#", "job", "status", summary.metric or "metric", *summary.params]
    rows = [[str(i + 1), j.name, j.status, _fmt(j.metrics.get(summary.metric)) if summary.metric else "",
             *(_fmt(j.params.get(k)) for k in summary.params)] for i, j in enumerate(summary.jobs[:n])]
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [head, *rows])


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="vitlab-sweep-report", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("dir", help="the sweep directory (hydra.sweep.dir) or any folder holding run directories")
    p.add_argument("--metric", help="the metric to rank by, a key of metrics.json (default: the runs' monitored "
                                    "val/best_* metric, else val/top1)")
    p.add_argument("--mode", choices=("max", "min"), help="higher or lower is better (default: from the run's "
                                                          "recipe.monitor_mode, else the metric's name)")
    p.add_argument("--top", type=int, default=5, help="how many of the best jobs to print (default: 5)")
    args = p.parse_args(argv)

    from vitlab.cli.sweep_summary import NoJobsError, summarize, write_summary

    try:
        summary = summarize(args.dir, args.metric, args.mode)
    except NoJobsError as e:
        fail(str(e))
    csv_path, png_path = write_summary(summary)
    counts = {s: sum(j.status == s for j in summary.jobs) for s in ("ok", "failed", "preempted", "incomplete")}
    print(f"{len(summary.jobs)} jobs (" + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + "); "
          f"ranked by {summary.metric or 'job number (no metric found)'} ({summary.mode})")
    print(top_table(summary, args.top))
    print(f"wrote {csv_path}")
    print(f"wrote {png_path}")


if __name__ == "__main__":
    main(sys.argv[1:])


class SweepReportCallback(Callback):
    """Writes the sweep report at the end of a multirun, and each job's ``job_status.json`` (completed, or failed
    with its error: the report's status column) into the job's directory. Never raises: a failing report must not
    fail the sweep."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:                                    # a re-run in the same directory (a resumed Optuna trial) starts clean
            (Path(config.hydra.runtime.output_dir) / JOB_STATUS).unlink(missing_ok=True)
        except Exception as e:
            log.warning("sweep report: could not clear %s: %s", JOB_STATUS, e)

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        try:
            if job_return is None:
                return
            value = getattr(job_return, "_return_value", None)
            failed = str(getattr(job_return, "status", "")).endswith("FAILED")
            record: dict[str, Any] = {"status": "failed" if failed else "completed"}
            if failed:
                record["error"] = f"{type(value).__name__}: {value}".splitlines()[0][:500]
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                if math.isfinite(value):
                    record["return_value"] = float(value)
                else:                               # a sweeper's objective is NaN: the Optuna sweeper fails the trial
                    record.update(status="failed", error=f"the job returned {value}")
            out = Path(config.hydra.runtime.output_dir)
            atomic_write_json(out / JOB_STATUS, record, indent=1, sort_keys=False)
        except Exception as e:
            log.warning("sweep report: could not write %s: %s", JOB_STATUS, e)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            summary = summarize(str(config.hydra.sweep.dir))
            csv_path, png_path = write_summary(summary)
        except Exception as e:
            log.warning("no sweep report for %s: %s (vitlab-sweep-report DIR writes it later)",
                        config.hydra.sweep.get("dir"), e)
            return
        best = summary.best
        log.info("sweep summary: %s, %s%s", csv_path, png_path,
                 f" (best: {_job_label(best)}, {summary.metric} {best.value(summary.metric):.4g})" if best else "")
