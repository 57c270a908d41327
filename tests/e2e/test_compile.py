"""model.compile=true trains end to end (inductor on the CPU), logs what it did, and writes checkpoints whose
parameter names are the eager model's, so vitlab-eval reads them without compiling."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_compiled_backbone_trains_and_its_checkpoint_evaluates_eagerly(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("vitlab.cli.train", "experiment=digits_vit", "model.compile=true", "backbone.depth=2",
                   "trainer.max_epochs=1", "trainer.limit_train_batches=4",
                   "run_test=false", "trainer.enable_progress_bar=false", f"paths.output_dir={out}", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "model: torch.compile(backbone, mode=default)" in proc.stdout + proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train/global_step"] == 4 and 0 <= metrics["val/top1"] <= 1
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert not any("_orig_mod" in k for k in state) and "recipe.backbone.blocks.0.attn.qkv.weight" in state
    ev = tmp_path / "eval.json"
    pe = run_cli("vitlab.cli.eval", f"ckpt={out / 'checkpoints' / 'last.ckpt'}", "split=val",
                 f"metrics_file={ev}", timeout=300)
    assert pe.returncode == 0, pe.stdout[-3000:] + pe.stderr[-3000:]
    # the eager model with the compiled run's weights gives the compiled run's validation accuracy
    assert json.loads(ev.read_text())["val/top1"] == pytest.approx(metrics["val/top1"], abs=1e-6)
