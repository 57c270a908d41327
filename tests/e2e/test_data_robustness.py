"""From the command line: unreadable images and shards are skipped with a warning naming them, up to a limit;
the augmentation presets train end to end."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

TINY = ["backbone=vit_tiny", "backbone.patch_size=8", "backbone.embed_dim=32", "backbone.depth=1",
        "backbone.num_heads=2", "data.img_size=16", "trainer.enable_progress_bar=false", "trainer.max_epochs=1",
        "data.num_workers=2", "data.batch_size=8", "run_test=false", "logger=[]"]


@pytest.fixture(scope="module")
def folder_with_bad_files(tmp_path_factory):
    """2 classes x 24 real-looking JPEGs in train/, 2 x 6 in val/, plus a truncated JPEG and a text file named .jpg."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 6)):
        for c in ("cat", "dog"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(d / f"{i:03d}.jpg")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (root / "train" / "cat" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "train" / "dog" / "notes.jpg").write_text("not an image\n")
    return root


def test_unreadable_images_are_skipped_and_named(folder_with_bad_files, tmp_path):
    p = run_cli("vitlab.cli.train", *TINY, "data=imagefolder", f"data.root={folder_with_bad_files}",
                "data.max_corrupt_fraction=0.1", f"paths.output_dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    log = p.stdout + p.stderr
    assert "skipping unreadable image" in log
    assert "truncated.jpg" in log and "notes.jpg" in log
    assert json.loads((tmp_path / "metrics.json").read_text())["train/global_step"] == 6    # 50 images, batch 8


def test_too_many_unreadable_images_stop_with_a_clear_message(folder_with_bad_files, tmp_path):
    p = run_cli("vitlab.cli.train", *TINY, "data=imagefolder", f"data.root={folder_with_bad_files}",
                "data.max_corrupt_fraction=0.01", f"paths.output_dir={tmp_path}")
    assert p.returncode == 2, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("vitlab: error:") and "data.max_corrupt_fraction=0.01" in last
    assert "resume with ckpt_path" in last


def test_a_truncated_shard_is_skipped_and_named(tmp_path):
    from vitlab.data import Digits
    from vitlab.data.shards import write_shards

    shards = tmp_path / "shards"
    write_shards(Digits(), shards, max_count=200, progress=False)
    bad = shards / "train-000002.tar"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2 + 100])      # cut mid-member
    p = run_cli("vitlab.cli.train", *TINY, "data=webdataset", f"data.urls={shards}", "data.img_size=16",
                "data.augment.policy=crop_flip", f"paths.output_dir={tmp_path / 'run'}", "data.batch_size=32")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "train-000002.tar" in p.stdout + p.stderr


@pytest.mark.parametrize("preset", ["simple", "deit", "deit3"])
def test_augmentation_presets_train_end_to_end(preset, tmp_path):
    p = run_cli("vitlab.cli.train", "experiment=digits_vit", f"augment={preset}", "debug=fast",
                "trainer.enable_progress_bar=false", "logger=[]", f"paths.output_dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = (tmp_path / "config.yaml").read_text()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["val/loss"])
    if preset == "deit":
        assert "rand-m9-mstd0.5-inc1" in cfg and "repeated_aug: 3" in cfg
    if preset == "deit3":
        assert "auto_augment: 3a" in cfg and "loss: bce" in cfg


def test_batched_augmentation_on_the_training_device_trains(tmp_path):
    p = run_cli("vitlab.cli.train", "experiment=digits_vit", "data.batched_augment=true", "data.mixup.cutmix_alpha=1.0",
                "debug=fast", "trainer.enable_progress_bar=false", "logger=[]", f"paths.output_dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert np.isfinite(metrics["train/loss"]) and 0.0 <= metrics["test/top1"] <= 1.0
