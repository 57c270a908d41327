"""vitlab-bench: the `data` benchmark end to end on the real CIFAR-10 subset, and the subcommand dispatch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

PIPELINES = {"torchvision reference", "vitlab per-sample", "in-memory per-sample", "in-memory batched"}


@pytest.mark.slow
def test_bench_data_writes_rows_and_ratios(cifar_subset: Path, tmp_path: Path):
    out = tmp_path / "bench.json"
    proc = run_cli("vitlab.cli.bench", "data", "data=cifar10", f"data.root={cifar_subset}", "workers=[0]",
                   "num_batches=3", "warmup_batches=1", "batch_size=32", "in_memory_limit=256", "device=cpu",
                   "threads=1", "repeats=2", f"output_file={out}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["img_size"] == 32 and result["batch_size"] == 32 and result["device"].startswith("cpu")
    assert result["torch"] and result["date"] and result["dataset"].startswith("cifar10")
    assert result["in_memory"]["images"] == 256
    rows = result["rows"]
    assert {r["pipeline"] for r in rows} == PIPELINES and all(r["workers"] == 0 for r in rows)
    for r in rows:
        assert r["images"] == 3 * 32                                  # the timed batches only
        assert r["images_per_s"] > 0 and r["images_per_s_per_worker"] == r["images_per_s"]   # 0 workers: 1 process
        assert r["ratio_vs_reference"] > 0 and len(r["images_per_s_runs"]) == 2
    by_name = {r["pipeline"]: r for r in rows}
    assert by_name["vitlab per-sample"]["reference"] == "torchvision reference"
    assert by_name["in-memory batched"]["reference"] == "in-memory per-sample"
    ratio = by_name["in-memory batched"]["images_per_s"] / by_name["in-memory per-sample"]["images_per_s"]
    assert by_name["in-memory batched"]["ratio_vs_reference"] == pytest.approx(ratio, rel=1e-2)
    assert "in-memory batched" in proc.stdout and "images/s" in proc.stdout   # progress lines and the table


@pytest.mark.parametrize("args", [("nope",), ()])
def test_bad_or_missing_subcommand_exits_2_with_usage(args):
    proc = run_cli("vitlab.cli.bench", *args, timeout=60)
    assert proc.returncode == 2
    assert "usage: vitlab-bench <subcommand>" in proc.stderr and "data" in proc.stderr
    assert ("unknown subcommand 'nope'" if args else "no subcommand given") in proc.stderr


def test_wrong_key_stops_before_any_work(cifar_subset: Path):
    proc = run_cli("vitlab.cli.bench", "data", f"data.root={cifar_subset}", "num_batchs=3", timeout=60)
    assert proc.returncode == 2 and "num_batchs" in proc.stderr and "num_batches" in proc.stderr
