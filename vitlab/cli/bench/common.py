"""What the benchmarks share: the program name, composing a bench config, timing a loader, CPU facts, writing
the results. Imports nothing of the benchmarks themselves (they import it: no cycles)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vitlab.cli.common import config_dir, validate_command_line

PROG = "vitlab-bench"


def cpu_model() -> str:
    from vitlab.env import cpu_model     # one definition, shared with the run's environment.json

    return cpu_model()


def time_loader(make_loader: Callable[[], Iterable], step: Callable[[Any], int], warmup: int, n: int,
                 sync: Callable[[], None]) -> tuple[float, int]:
    """Run ``warmup`` then ``n`` batches through ``step`` (re-iterating the loader if it runs out).

    Returns (seconds for the ``n`` timed batches, images in them). A fresh loader per measurement, so worker
    start-up falls in the warm-up; iterators are dropped at the end, which shuts their workers down.
    """
    loader = make_loader()
    it = iter(loader)
    done, images, t0 = 0, 0, 0.0
    while done < warmup + n:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        if done == warmup:
            sync()
            t0 = time.perf_counter()
        count = step(batch)
        if done >= warmup:
            images += count
        done += 1
    sync()
    seconds = time.perf_counter() - t0
    del it, loader
    return seconds, images


def compose(config_name: str, overrides: Sequence[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    validate_command_line(config_name, overrides)            # wrong keys / group options: exit 2, named
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def write_results(path: str | None, results: dict) -> None:
    """Write a benchmark's results as JSON to ``path`` (nothing when it is null), creating its folder."""
    if not path:
        return
    from vitlab.io import atomic_write_text

    out = Path(path)
    atomic_write_text(out, json.dumps(results, indent=2, default=str) + "\n")       # str(): paths, dtypes
    print(f"[bench] results written to {out}", flush=True)
