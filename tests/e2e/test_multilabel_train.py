"""task=multilabel end to end through the real CLI, on a list of PNG images the test writes (each holds any subset of
three coloured squares): training learns it, metrics.json has the multi-label keys, best.ckpt follows
val/map_macro, and vitlab-eval rebuilds the model from the checkpoint alone and gets the same numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

TINY = ["backbone=vit_tiny", "backbone.patch_size=4", "backbone.embed_dim=32", "backbone.depth=2",
        "backbone.num_heads=2", "data.img_size=16", "data.batch_size=32", "data.eval_batch_size=64",
        "data.num_workers=0", "data.augment.policy=none", "trainer.enable_progress_bar=false", "logger=csv",
        "optim.lr=3e-3", "sched.warmup_epochs=0"]
NAMES = ("red", "green", "blue")


def _write(root, n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        present = [c for c in range(3) if rng.random() < 0.5]
        img = np.zeros((16, 16, 3), np.uint8) + rng.integers(0, 30, (16, 16, 3), dtype=np.uint8)
        for c in present:
            y, x = (c // 2) * 8, (c % 2) * 8
            img[y:y + 8, x:x + 8, c] = 230
        name = f"s{seed}_{i}.png"
        Image.fromarray(img).save(root / name)
        rows.append(f"{name},{' '.join(NAMES[c] for c in present)}")
    path = root / f"list{seed}.csv"
    path.write_text("path,labels\n" + "\n".join(rows) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = tmp_path_factory.mktemp("colours")
    train, val = _write(data, 192, 0), _write(data, 64, 1)
    out = tmp_path_factory.mktemp("run")
    p = run_cli("vitlab.cli.train", "task=multilabel", "data=multilabel", f"data.root={data}",
                f"data.source.train_list={train}", f"data.source.val_list={val}", f"data.source.test_list={val}",
                "trainer.max_epochs=6", f"paths.output_dir={out}", *TINY, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, data, val


def test_multilabel_trains_and_reports_its_metrics(run):
    out, _, _ = run
    m = json.loads((out / "metrics.json").read_text())
    for key in ("val/map_macro", "val/map_micro", "val/f1_macro", "val/f1_micro", "test/map_macro",
                "val/best_map_macro"):
        assert key in m, sorted(m)
    assert m["val/map_macro"] > 0.9 and m["val/f1_micro"] > 0.8, m        # chance mAP is ~0.5
    history = json.loads((out / "history.json").read_text())["epochs"]
    assert history[-1]["val/map_macro"] > history[0]["val/map_macro"]


def test_the_checkpoint_evaluates_to_the_same_numbers(run, tmp_path):
    out, data, val = run
    m = json.loads((out / "metrics.json").read_text())
    ckpt = out / "checkpoints" / "best.ckpt"
    res = tmp_path / "eval.json"
    p = run_cli("vitlab.cli.eval", f"ckpt={ckpt}", "split=val", f"metrics_file={res}",
                "trainer.enable_progress_bar=false")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    got = json.loads(res.read_text())
    assert got["val/map_macro"] == pytest.approx(m["val/best_map_macro"], abs=1e-5)
    # the frozen-feature protocols score one class per image: refused, with the fix
    p = run_cli("vitlab.cli.eval", f"ckpt={ckpt}", "protocol=knn", "split=val", "trainer.enable_progress_bar=false")
    assert p.returncode == 2 and "one class label per image" in p.stderr and "protocol=classifier" in p.stderr
