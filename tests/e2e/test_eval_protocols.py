"""vitlab-eval's protocols: classifier (the model's head), knn and linear (frozen features), and split=auto."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from tests.conftest import run_cli
from vitlab.cli.eval import check_choices, resolve_split


@pytest.fixture(scope="module")
def one_epoch_digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits_1epoch")
    p = run_cli("vitlab.cli.train", "experiment=digits_vit", "trainer.max_epochs=1", "run_test=false",
                "trainer.enable_progress_bar=false", f"paths.output_dir={out}", timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_knn_protocol(one_epoch_digits, tmp_path):
    out = tmp_path / "knn.json"
    p = run_cli("vitlab.cli.eval", f"ckpt={one_epoch_digits}", "protocol=knn", f"metrics_file={out}",
                f"hydra.run.dir={tmp_path / 'hydra'}", timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    m = json.loads(out.read_text())
    assert m["protocol"] == "knn" and m["split"] == "test" and m["feature"] == "pooled"    # auto: digits has test
    assert m["knn/k"] == 20 and m["knn/temperature"] == pytest.approx(0.07)
    assert m["num_train"] > m["num_eval"] > 0
    assert m["knn/top1"] > 0.3                                       # 10 classes: well above chance after 1 epoch
    assert m["knn/top1"] <= m["knn/top5"] <= 1.0
    assert "knn/top1" in p.stdout                                    # the printed table


@pytest.mark.slow
def test_linear_protocol(one_epoch_digits, tmp_path):
    out = tmp_path / "linear.json"
    p = run_cli("vitlab.cli.eval", f"ckpt={one_epoch_digits}", "protocol=linear", "split=val", "feature=cls",
                "linear.epochs=20", "max_train_samples=600", f"metrics_file={out}",
                f"hydra.run.dir={tmp_path / 'hydra'}", timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    m = json.loads(out.read_text())
    assert m["protocol"] == "linear" and m["split"] == "val" and m["feature"] == "cls"
    assert m["num_train"] == 600
    for key in ("linear/top1", "linear/top5", "linear/lr", "linear/holdout_top1", "linear/epochs"):
        assert key in m, m
    assert m["linear/top1"] > 0.3 and m["linear/lr"] in [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0]


@pytest.mark.slow
def test_unknown_protocol_exits_2_naming_the_choices(tmp_path):
    p = run_cli("vitlab.cli.eval", f"ckpt={tmp_path / 'none.ckpt'}", "protocol=svm",
                f"hydra.run.dir={tmp_path / 'hydra'}", timeout=120)
    assert p.returncode == 2
    assert "protocol='svm'" in p.stderr and "classifier, knn, linear" in p.stderr


def test_split_auto_prefers_test_and_falls_back_to_val():
    with_test = SimpleNamespace(name="a", has_split=lambda s: s in ("train", "val", "test"))
    without = SimpleNamespace(name="b", has_split=lambda s: s in ("train", "val"))
    assert resolve_split(with_test, "auto") == "test"
    assert resolve_split(without, "auto") == "val"                   # e.g. the shared CIFAR-10 subset
    assert resolve_split(without, "train") == "train"                # explicit splits pass through


@pytest.mark.parametrize("key,value", [("protocol", "svm"), ("feature", "mean"), ("split", "testing")])
def test_bad_choices_fail_with_the_list(key, value, capsys):
    cfg = OmegaConf.create({"protocol": "knn", "feature": "pooled", "split": "auto", key: value})
    with pytest.raises(SystemExit) as e:
        check_choices(cfg)
    assert e.value.code == 2
    assert f"unknown {key}={value!r}" in capsys.readouterr().err
