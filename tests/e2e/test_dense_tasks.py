"""End to end: the command-line contract of the dense tasks on the shared real data.

    vitlab-train task=detection data=voc data.root=DIR        (BCCD, Pascal VOC layout)
    vitlab-train task=detection data=coco data.root=DIR       (tiny-coco: images with no annotations)
    vitlab-train task=segmentation data=camvid data.root=DIR  (SegNet's CamVid)

Each run is a few steps of a 2-block ViT on small images: metrics.json carries val/map (+ val/map_50) or val/miou,
the drawn predictions are saved as PNG, best.ckpt follows the task's metric, and vitlab-eval reproduces the
validation numbers from the checkpoint alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA, run_cli

pytestmark = pytest.mark.slow

BCCD = SHARED_DATA / "bccd" / "BCCD"
TINY_COCO = SHARED_DATA / "tiny-coco"
CAMVID = SHARED_DATA / "camvid"

# a 2-block (detection) or 4-block (segmentation: UPerNet reads 4 taps) ViT, 4 training steps, 2 validation batches
SMALL = ["backbone.embed_dim=64", "backbone.num_heads=2", "trainer.max_epochs=1",
         "trainer.limit_train_batches=4", "trainer.limit_val_batches=2", "data.batch_size=2", "data.eval_batch_size=2",
         "data.num_workers=0", "trainer.enable_progress_bar=false", "run_test=false"]
DETECTION = ["task=detection", "backbone.depth=2", "data.img_size=128", "task.neck_channels=32"]
SEGMENTATION = ["task=segmentation", "backbone.depth=4", "data.img_size=128", "task.channels=32",
                "data.augment.eval_size=128"]


def needs(path: Path) -> None:
    if not path.is_dir():
        pytest.skip(f"the shared dataset {path} is not here (set VITLAB_SHARED_DATA)")


def train(out: Path, *args: str, timeout: float = 900) -> dict:
    p = run_cli("vitlab.cli.train", *SMALL, *args, f"paths.output_dir={out}", timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-4000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def voc_run(tmp_path_factory) -> Path:
    needs(BCCD)
    out = tmp_path_factory.mktemp("voc")
    train(out, *DETECTION, "data=voc", f"data.root={BCCD}")
    return out


def test_detection_on_voc_writes_map_and_drawn_predictions(voc_run):
    from PIL import Image

    metrics = json.loads((voc_run / "metrics.json").read_text())
    assert 0.0 <= metrics["val/map"] <= 1.0 and 0.0 <= metrics["val/map_50"] <= 1.0
    assert metrics["val/map_50"] >= metrics["val/map"]
    history = json.loads((voc_run / "history.json").read_text())["epochs"]
    assert history[-1]["val/map"] == pytest.approx(metrics["val/map"])
    assert "val/best_map" in metrics                                   # best.ckpt followed val/map
    assert {"train/loss_classifier", "train/loss_box_reg", "train/loss_objectness"} <= set(metrics)
    assert any(k.startswith("val/map_") and k.endswith(("rbc", "wbc", "platelets")) for k in metrics)
    pngs = sorted((voc_run / "visuals").glob("detections_epoch*.png"))
    assert pngs, "no drawn predictions were saved"
    with Image.open(pngs[-1]) as im:
        assert im.format == "PNG" and im.mode == "RGB"
    cfg = (voc_run / "config.yaml").read_text()
    assert "monitor: auto" in cfg


def test_detection_checkpoint_evaluates_to_the_same_map(voc_run, tmp_path):
    metrics = json.loads((voc_run / "metrics.json").read_text())
    out = tmp_path / "eval.json"
    p = run_cli("vitlab.cli.eval", f"ckpt={voc_run / 'checkpoints' / 'last.ckpt'}", "split=val",
                f"metrics_file={out}", "trainer.limit_test_batches=2", "trainer.enable_progress_bar=false")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-4000:]
    got = json.loads(out.read_text())
    assert got["val/map"] == pytest.approx(metrics["val/map"], abs=1e-6)
    assert got["val/map_50"] == pytest.approx(metrics["val/map_50"], abs=1e-6)


def test_detection_on_coco_with_unannotated_images(tmp_path):
    needs(TINY_COCO)
    metrics = train(tmp_path, *DETECTION, "data=coco", f"data.root={TINY_COCO}", "task.per_class_map=false")
    assert 0.0 <= metrics["val/map"] <= 1.0 and "val/map_50" in metrics
    assert metrics["train/loss"] > 0


def test_detr_trains_from_the_command_line(tmp_path):
    needs(BCCD)
    metrics = train(tmp_path, *DETECTION, "data=voc", f"data.root={BCCD}", "task.detector=detr",
                    "task.detr={num_queries: 20, dec_layers: 2, hidden_dim: 32, num_heads: 2, ffn_dim: 64}")
    assert {"train/loss_ce", "train/loss_bbox", "train/loss_giou"} <= set(metrics)
    assert 0.0 <= metrics["val/map"] <= 1.0


@pytest.fixture(scope="module")
def camvid_run(tmp_path_factory) -> Path:
    needs(CAMVID)
    out = tmp_path_factory.mktemp("camvid")
    train(out, *SEGMENTATION, "data=camvid", f"data.root={CAMVID}")
    return out


def test_segmentation_on_camvid_writes_miou_and_overlays(camvid_run):
    metrics = json.loads((camvid_run / "metrics.json").read_text())
    assert 0.0 <= metrics["val/miou"] <= 1.0 and 0.0 <= metrics["val/pixel_acc"] <= 1.0
    assert "val/best_miou" in metrics and "val/iou_road" in metrics
    assert metrics["train/loss"] > 0
    # the epoch's row in history.json holds that epoch's mIoU (logged after the callbacks' epoch-end hooks)
    history = json.loads((camvid_run / "history.json").read_text())["epochs"]
    assert history[-1]["val/miou"] == pytest.approx(metrics["val/miou"])
    assert sorted((camvid_run / "visuals").glob("segmentation_epoch*.png"))


def test_segmentation_checkpoint_evaluates_to_the_same_miou(camvid_run, tmp_path):
    metrics = json.loads((camvid_run / "metrics.json").read_text())
    out = tmp_path / "eval.json"
    p = run_cli("vitlab.cli.eval", f"ckpt={camvid_run / 'checkpoints' / 'last.ckpt'}", "split=val",
                f"metrics_file={out}", "trainer.limit_test_batches=2", "trainer.enable_progress_bar=false")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-4000:]
    got = json.loads(out.read_text())
    assert got["val/miou"] == pytest.approx(metrics["val/miou"], abs=1e-6)


def test_sliding_window_segmentation_with_the_linear_head(tmp_path):
    needs(CAMVID)
    metrics = train(tmp_path, *SEGMENTATION, "data=camvid", f"data.root={CAMVID}", "task.head=linear",
                    "task.inference=slide", "data.augment.eval_size=180")
    assert 0.0 <= metrics["val/miou"] <= 1.0


@pytest.mark.parametrize("args,expected", [
    (["task=detection", "data=digits"], "task=detection cannot train on the"),
    (["task=segmentation", "data=voc", f"data.root={BCCD}"], "use task=detection with this data"),
    (["task=classification", "data=camvid", f"data.root={CAMVID}"], "use task=segmentation with this data"),
])
def test_a_task_that_does_not_fit_the_data_stops_with_the_fix(args, expected, tmp_path):
    p = run_cli("vitlab.cli.train", *args, f"paths.output_dir={tmp_path}", "trainer.max_epochs=1")
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert expected in p.stderr


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_dense_task_under_two_process_ddp(task, tmp_path):
    """Gloo DDP on the CPU: the ranks end with the same weights, and the epoch metric (mAP / mIoU) is gathered from
    both ranks' shares of the validation set by torchmetrics before it is logged. Both read only part of the
    backbone's outputs (a ViTDet backbone's fc_norm feeds only the pooled vector; UPerNet reads the pre-norm taps,
    not the final norm): DDP runs with find_unused_parameters for dense tasks."""
    if task == "detection":
        needs(BCCD)
        args = [*DETECTION, "data=voc", f"data.root={BCCD}", "backbone.class_token=false", "backbone.global_pool=avg"]
        key = "val/map"
    else:
        needs(CAMVID)
        args = [*SEGMENTATION, "data=camvid", f"data.root={CAMVID}"]
        key = "val/miou"
    metrics = train(tmp_path, *args, "trainer=ddp", "trainer.devices=2")
    assert metrics["ddp/world_size"] == 2
    assert metrics["ddp/max_param_divergence"] == 0.0
    assert 0.0 <= metrics[key] <= 1.0
