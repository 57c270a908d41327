"""The vit_cifar10 experiment runs end to end through the CLI on the shared CIFAR-10 subset (a few batches)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_vit_cifar10_debug_run_on_the_subset(tmp_path, cifar_subset):
    p = run_cli("vitlab.cli.train", "experiment=vit_cifar10", "debug=fast", f"data.root={cifar_subset}",
                f"paths.output_dir={tmp_path}", "logger=many", timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= metrics["val/top1"] <= 1.0
    assert "test/top1" not in metrics               # the subset has no test batch: no test stage
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert (tmp_path / "csv" / "metrics.csv").is_file()
    assert "global batch = 128" in p.stdout + p.stderr
