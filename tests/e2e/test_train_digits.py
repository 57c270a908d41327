"""End to end on real data: the default experiment trains to >= 95% test top-1; eval reproduces it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits_run")
    p = run_cli("vitlab.cli.train", "experiment=digits_vit", f"paths.output_dir={out}", timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


def test_default_experiment_reaches_95_percent(digits_run):
    metrics = json.loads((digits_run / "metrics.json").read_text())
    assert metrics["test/top1"] >= 0.95, metrics
    for key in ("val/top1", "val/loss", "val/best_top1", "test/top1", "test/top5", "train/global_step"):
        assert key in metrics


def test_run_directory_holds_checkpoints_config_and_curves(digits_run):
    from PIL import Image
    from omegaconf import OmegaConf

    assert (digits_run / "checkpoints" / "last.ckpt").is_file()
    assert (digits_run / "checkpoints" / "best.ckpt").is_file()
    cfg = OmegaConf.load(digits_run / "config.yaml")
    assert cfg.paths.output_dir == str(digits_run) and cfg.backbone.patch_size == 4
    with Image.open(digits_run / "curves.png") as im:
        assert im.format == "PNG" and im.size[0] > 400
    assert not list((digits_run / "checkpoints").glob("*.tmp"))


def test_eval_reproduces_the_test_metric(digits_run, tmp_path):
    out = tmp_path / "eval.json"
    p = run_cli("vitlab.cli.eval", f"ckpt={digits_run / 'checkpoints' / 'best.ckpt'}", "data=digits", "split=test",
                f"metrics_file={out}", f"hydra.run.dir={tmp_path / 'hydra'}", timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "test/top1" in p.stdout                              # the printed table
    evaluated = json.loads(out.read_text())
    trained = json.loads((digits_run / "metrics.json").read_text())
    assert evaluated["test/top1"] == pytest.approx(trained["test/top1"], abs=1e-6)
    assert evaluated["test/loss"] == pytest.approx(trained["test/loss"], abs=1e-5)


def test_vitlab_load_rebuilds_the_model_from_the_checkpoint_alone(digits_run):
    import vitlab
    from vitlab.data import Digits, DictDataset, build_transforms

    model = vitlab.load(str(digits_run / "checkpoints" / "best.ckpt"))
    src = Digits()
    ds = DictDataset(src.dataset("test"), build_transforms(False, 16, src.mean, src.std, "none"))
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    y = torch.stack([ds[i]["label"] for i in range(len(ds))])
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    trained = json.loads((digits_run / "metrics.json").read_text())
    assert acc == pytest.approx(trained["test/top1"], abs=1e-6)


def test_eval_on_a_split_the_data_lacks_fails_clearly(digits_run, cifar_subset, tmp_path):
    p = run_cli("vitlab.cli.eval", f"ckpt={digits_run / 'checkpoints' / 'best.ckpt'}", "data=cifar10",
                f"data.root={cifar_subset}", "split=test", f"hydra.run.dir={tmp_path / 'hydra'}", timeout=300)
    assert p.returncode == 2
    assert "no test batch" in p.stderr and "split=val" in p.stderr
