"""DetectionTask: a tiny ViT + feature pyramid + torchvision's detectors (and DETR); COCO mAP by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_iou

from vitlab.data.base import DataInfo
from vitlab.backbones import vit
from vitlab.tasks.detection import DEFAULT_SCALES, DetectionTask, sanitize

K, S = 3, 64                                   # classes, canvas
DETR_ARGS = dict(hidden_dim=32, num_queries=10, dec_layers=2, num_heads=2, ffn_dim=64, dropout=0.0)
# fewer sampled anchors / RoIs than torchvision's defaults (256 / 512): the tiny tests run faster
RCNN_OPTS = dict(rpn_batch_size_per_image=64, box_batch_size_per_image=64)
PARTS = {
    "faster_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
    "mask_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "loss_mask"},
    "retinanet": {"loss_classification", "loss_bbox_regression"},
    "fcos": {"loss_classification", "loss_bbox_regression", "loss_bbox_ctrness"},
    "detr": {"loss_ce", "loss_bbox", "loss_giou"},
}
DETECTORS = list(PARTS)


def backbone(**kw) -> torch.nn.Module:
    return vit("Ti", patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=S, **kw)


def task(detector: str = "faster_rcnn", **kw) -> DetectionTask:
    kw.setdefault("detr", DETR_ARGS if detector == "detr" else None)
    if detector in ("faster_rcnn", "mask_rcnn"):
        kw.setdefault("detector_options", RCNN_OPTS)
    return DetectionTask(in_dim=32, num_classes=K, patch_size=8, img_size=S, detector=detector, neck_channels=32,
                         **kw)


def squares_batch(boxes: list[list[list[float]]], labels: list[list[int]], crowd=None, scale=None) -> dict:
    """Bright squares (the boxes) on a dark background, as the collate of a detection source gives them."""
    n = len(boxes)
    image = torch.full((n, 3, S, S), -1.0)
    bx = [torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes]
    masks = []
    for i, b in enumerate(bx):
        m = torch.zeros(len(b), S, S, dtype=torch.uint8)
        for j, (x0, y0, x1, y1) in enumerate(b.long().tolist()):
            image[i, :, y0:y1, x0:x1] = 2.0
            m[j, y0:y1, x0:x1] = 1
        masks.append(m)
    crowd = crowd or [[0] * len(b) for b in boxes]
    return {"image": image, "boxes": bx, "labels": [torch.tensor(c, dtype=torch.int64) for c in labels],
            "iscrowd": [torch.tensor(c, dtype=torch.uint8) for c in crowd], "masks": masks,
            "image_id": torch.arange(n), "image_size": torch.tensor([[S, S]] * n),
            "scale": torch.tensor(scale or [1.0] * n), "orig_size": torch.tensor([[S, S]] * n)}


def two_images(**kw) -> dict:
    return squares_batch([[[8, 8, 32, 32]], [[36, 12, 60, 36], [8, 40, 28, 60]]], [[2], [0, 1]], **kw)


# ------------------------------------------------------------------ training ---

@pytest.mark.parametrize("detector", DETECTORS)
def test_training_step_parts_and_backprop(detector):
    torch.manual_seed(0)
    bb, t = backbone(), task(detector)
    out = t.training_step(bb, two_images())
    assert set(out) == {"loss"} | PARTS[detector]
    assert torch.isfinite(out["loss"])
    if detector != "detr":                     # DETR's total also folds in the weighted aux-layer losses
        assert out["loss"].item() == pytest.approx(sum(out[k].item() for k in PARTS[detector]), rel=1e-5)
    out["loss"].backward()
    assert bb.patch_embed.proj.weight.grad is not None and bb.patch_embed.proj.weight.grad.abs().sum() > 0
    # the backbone belongs to the recipe: not in the task's checkpoint keys, detached again after the call
    n_backbone = sum(p.numel() for p in bb.parameters())
    task_ids = {id(p) for p in t.parameters()}
    assert not any(id(p) in task_ids for p in bb.parameters()) and n_backbone > 0
    assert not any("patch_embed" in k or "blocks." in k for k in t.state_dict())
    assert t._body._backbone is None


@pytest.mark.parametrize("detector", DETECTORS)
def test_images_without_boxes_train(detector):
    torch.manual_seed(0)
    bb, t = backbone(), task(detector)
    batch = squares_batch([[], []], [[], []])
    out = t.training_step(bb, batch)
    assert torch.isfinite(out["loss"]) and set(out) == {"loss"} | PARTS[detector]
    out["loss"].backward()
    if detector in ("faster_rcnn", "mask_rcnn"):
        assert out["loss_box_reg"].item() == 0.0 and out["loss_rpn_box_reg"].item() == 0.0


def test_crowd_boxes_give_no_training_loss():
    """A crowd box is dropped from the targets: the loss equals the one of an image without that box."""
    bb, t = backbone(), task("faster_rcnn")
    with_crowd = squares_batch([[[8, 8, 32, 32], [36, 36, 60, 60]]], [[2, 1]], crowd=[[0, 1]])
    without = squares_batch([[[8, 8, 32, 32]]], [[2]])
    without["image"] = with_crowd["image"]                 # the same pixels, only the targets differ
    torch.manual_seed(1)
    a = t.training_step(bb, with_crowd)
    torch.manual_seed(1)
    b = t.training_step(bb, without)
    for k in a:
        assert a[k].item() == pytest.approx(b[k].item(), rel=1e-6), k


def test_mask_rcnn_needs_masks():
    batch = two_images()
    del batch["masks"]
    with pytest.raises(ValueError, match="data.source.with_masks=true"):
        task("mask_rcnn").training_step(backbone(), batch)


def test_taps_neck_trains():
    """neck_source=taps: backbone_options asks for one tap per level; the detector trains on them."""
    data = DataInfo(num_classes=3, img_size=64, task="detection")
    geometry = {"img_size": 64, "in_chans": 3}
    assert DetectionTask.backbone_options({"detector": "fcos", "neck_source": "taps"}, data) == \
        {**geometry, "out_indices": len(DEFAULT_SCALES["fcos"])}
    assert DetectionTask.backbone_options({"detector": "faster_rcnn"}, data) == geometry
    opts = DetectionTask.backbone_options({"detector": "fcos", "neck_source": "taps", "scales": [2, 1]}, data)
    assert opts == {**geometry, "out_indices": 2}
    opts.pop("img_size"), opts.pop("in_chans")
    bb = backbone(**opts)                                            # depth 2: both blocks tapped
    out = task("fcos", neck_source="taps", scales=[2, 1]).training_step(bb, two_images())
    assert torch.isfinite(out["loss"])


def test_hierarchical_backbone_through_fpn():
    """neck_source=pyramid: torchvision's FPN over a timm backbone's levels, + P6, P7 for RetinaNet."""
    from vitlab.backbones.timm_features import timm_backbone

    bb = timm_backbone("resnet10t", img_size=S)                     # strides 2, 4, 8, 16
    t = DetectionTask(bb.embed_dim, K, bb.patch_size, S, detector="retinanet", neck_channels=32,
                      neck_source="pyramid", pyramid_channels=bb.pyramid_channels,
                      pyramid_strides=bb.pyramid_strides)
    assert t._body.strides == [*bb.pyramid_strides, 2 * bb.pyramid_strides[-1], 4 * bb.pyramid_strides[-1]]
    out = t.training_step(bb, two_images())
    assert torch.isfinite(out["loss"]) and set(out) == {"loss"} | PARTS["retinanet"]


# ---------------------------------------------------------------- evaluation ---

@pytest.mark.parametrize("detector", DETECTORS)
def test_evaluation_in_original_pixels_and_zero_based_labels(detector):
    torch.manual_seed(0)
    bb = backbone().eval()
    t = task(detector, score_threshold=0.0, detections_per_image=30).eval()
    batch = two_images(scale=[0.5, 2.0], crowd=[[1], [0, 0]])
    out = t.evaluation_step(bb, batch)
    dets = t.predict(bb, batch["image"])                   # canvas pixels
    assert len(out["preds"]) == len(out["target"]) == 2
    for i, scale in enumerate((0.5, 2.0)):
        p, d, tg = out["preds"][i], dets[i], out["target"][i]
        assert len(p["boxes"]) > 0 and set(p) >= {"boxes", "scores", "labels"}
        torch.testing.assert_close(p["boxes"], d["boxes"] / scale)
        torch.testing.assert_close(tg["boxes"], batch["boxes"][i] / scale)
        assert tg["iscrowd"].tolist() == batch["iscrowd"][i].tolist()
        labels = p["labels"]
        assert labels.min() >= 0 and labels.max() < K, "labels must come back 0-based, in [0, num_classes)"
        if detector in ("faster_rcnn", "mask_rcnn"):       # background removed: an unshifted 1..K would lack 0
            assert (labels == 0).any()
        assert d["boxes"].min() >= 0 and d["boxes"].max() <= S
    if detector == "mask_rcnn":
        assert dets[0]["masks"].shape == (len(dets[0]["boxes"]), 1, S, S)
    assert not t.training                          # the caller's mode is kept


def test_predict_restores_training_mode():
    bb, t = backbone(), task("fcos")
    assert t.training
    t.predict(bb, two_images()["image"])
    assert t.training and t.detector.training


def test_forward_is_not_the_entry_point():
    with pytest.raises(TypeError, match="predict"):
        task("fcos")({"patch_2d": torch.zeros(1, 32, 8, 8)})


@pytest.mark.parametrize("kwargs, match", [
    (dict(detector="yolo"), "choose one of"),
    (dict(detector="fcos", neck_channels=48), "multiple of 32"),
    (dict(anchor_sizes=[32, 64]), "one per level"),
    (dict(class_names=["a", "b"]), "class names"),
])
def test_bad_arguments_name_the_fix(kwargs, match):
    kwargs = {"in_dim": 32, "num_classes": K, "patch_size": 8, "img_size": S, "neck_channels": 32, **kwargs}
    with pytest.raises(ValueError, match=match):
        DetectionTask(**kwargs)


# ---------------------------------------------------------------- mAP by hand ---

def _map(preds: list[dict], target: list[dict], **kw) -> dict:
    t = task("fcos", **kw)
    metric = t.metrics()
    metric.update(preds, target)
    return t.compute_metrics(metric)


def _p(boxes, labels, scores=None) -> dict:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    scores = torch.tensor(scores if scores is not None else [0.9] * len(boxes))
    return {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64), "scores": scores}


def _t(boxes, labels, crowd=None) -> dict:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64),
            "iscrowd": torch.tensor(crowd if crowd is not None else [0] * len(boxes), dtype=torch.int64)}


BIG_A, BIG_B = [0, 0, 100, 100], [200, 0, 300, 100]   # area 10^4 (> 96^2): COCO's "large"


def test_map_perfect_predictions_is_one():
    m = _map([_p([BIG_A, BIG_B], [0, 1])], [_t([BIG_A, BIG_B], [0, 1])])
    for k in ("map", "map_50", "map_75", "map_large", "mar_100"):
        assert m[k].item() == pytest.approx(1.0), k
    # no small / medium objects: COCO gives -1, which is dropped rather than logged
    assert "map_small" not in m and "map_medium" not in m


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_map_half_recall(backend):
    """One of two objects found exactly, no false positive: precision 1 up to recall 0.5, then nothing. COCO
    interpolates precision at 101 recall points 0, 0.01, ..., 1: the 51 points <= 0.5 score 1, so AP = 51/101 at
    every IoU threshold; the average recall is 0.5."""
    if backend == "faster_coco_eval":                # the optional backend (pip install -e ".[coco-fast]"; in dev)
        pytest.importorskip("faster_coco_eval", reason="faster-coco-eval is not installed (vitlab[coco-fast])")
    m = _map([_p([BIG_A], [0])], [_t([BIG_A, BIG_B], [0, 0])], map_backend=backend)
    assert m["map"].item() == pytest.approx(51 / 101, abs=1e-4)
    assert m["map_50"].item() == pytest.approx(51 / 101, abs=1e-4)
    assert m["mar_100"].item() == pytest.approx(0.5, abs=1e-4)


def test_map_shifted_box_counts_at_50_not_75():
    """Prediction [0, 0, 100, 62] against [0, 0, 100, 100]: IoU = 6200 / 10000 = 0.62. It is a match at the IoU
    thresholds 0.50, 0.55, 0.60 (AP 1) and a miss plus a false positive at 0.65 ... 0.95 (AP 0): map = 3/10."""
    m = _map([_p([[0, 0, 100, 62]], [0])], [_t([BIG_A], [0])])
    assert m["map_50"].item() == pytest.approx(1.0)
    assert m["map_75"].item() == pytest.approx(0.0)
    assert m["map"].item() == pytest.approx(0.3, abs=1e-4)


def test_map_crowd_targets_are_not_misses():
    found = [_p([BIG_A], [0])]
    assert _map(found, [_t([BIG_A, BIG_B], [0, 0], crowd=[0, 1])])["map"].item() == pytest.approx(1.0)
    assert _map(found, [_t([BIG_A, BIG_B], [0, 0], crowd=[0, 0])])["map"].item() == pytest.approx(51 / 101, abs=1e-4)


def test_map_per_class_names():
    names = ["Traffic Light", "dog", "potted-plant"]
    # class 0 perfect, class 1 missed (AP 0), class 2 absent from both (COCO: -1, dropped)
    m = _map([_p([BIG_A], [0])], [_t([BIG_A, BIG_B], [0, 1])], class_names=names)
    assert m["map_traffic_light"].item() == pytest.approx(1.0)
    assert m["map_dog"].item() == pytest.approx(0.0)
    assert "map_potted_plant" not in m
    assert m["map"].item() == pytest.approx(0.5)
    assert sanitize("Potted-Plant 2") == "potted_plant_2"
    assert not any(k.startswith("map_") and k[4:] in names for k in _map([_p([BIG_A], [0])], [_t([BIG_A], [0])],
                                                                         per_class_map=False))


# ------------------------------------------------------------------ pictures ---

def test_visualize_rows_of_uint8_pictures():
    torch.manual_seed(0)
    bb, t = backbone(), task("fcos", draw_score_threshold=0.0)
    batch = squares_batch([[[8, 8, 32, 32]]] * 9, [[1]] * 9)        # 9 images: at most 8 are drawn
    rows = t.visualize(bb, batch)["detections"]
    assert len(rows) == 2
    plain = t.to_uint8(batch["image"][:8])
    for row in rows:
        assert row.dtype == torch.uint8 and row.shape == (8, 3, S, S)
        assert not torch.equal(row, plain)                          # boxes were drawn on the pictures
    # the ground-truth box outline lies on its edges
    assert not torch.equal(rows[0][:, :, 8, 8:32], plain[:, :, 8, 8:32])


# ------------------------------------------------------------------- overfit ---

def test_faster_rcnn_overfits_two_images():
    """2 images, 1-2 bright squares each: Adam for 30 steps halves the loss (it falls to ~1/4), and the top
    detection of each image lands on one of its squares with that square's class (labels shifted back to 0-based)."""
    torch.manual_seed(0)
    bb, t = backbone(), task("faster_rcnn")
    batch = two_images()
    opt = torch.optim.Adam([*bb.parameters(), *t.parameters()], lr=1e-3)
    losses = []
    for _ in range(30):
        out = t.training_step(bb, batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    dets = t.predict(bb, batch["image"])
    for d, boxes, labels in zip(dets, batch["boxes"], batch["labels"]):
        assert len(d["boxes"]) > 0
        iou = box_iou(d["boxes"][:1], boxes)[0]                      # top detection vs every ground-truth box
        j = int(iou.argmax())
        assert iou[j] > 0.5 and int(d["labels"][0]) == int(labels[j])


def test_roi_align_reads_patch14_pyramids_at_their_exact_strides():
    """torchvision rounds each level's scale to a power of two; a patch-14 ViT's levels are at strides 7, 14, 28,
    56: the pooler must use those exactly, or every RoI is read at 7/8 of its position."""
    from vitlab.tasks import DetectionTask

    task = DetectionTask(in_dim=32, num_classes=3, patch_size=14, img_size=112, neck_channels=16,
                         scales=(2.0, 1.0, 0.5, 0.25))
    pool = task.detector.roi_heads.box_roi_pool
    assert pool.scales == pytest.approx([1 / 7, 1 / 14, 1 / 28, 1 / 56])
    # and it trains: RoIs of a patch-14 pyramid are pooled without torchvision's power-of-two inference
    backbone = vit("Ti", patch_size=14, embed_dim=32, depth=2, num_heads=2, img_size=112)
    batch = {"image": torch.randn(1, 3, 112, 112), "boxes": [torch.tensor([[10.0, 10.0, 60.0, 70.0]])],
             "labels": [torch.tensor([1])], "iscrowd": [torch.zeros(1, dtype=torch.uint8)],
             "image_size": torch.tensor([[112, 112]]), "scale": torch.ones(1)}
    assert torch.isfinite(task.training_step(backbone, batch)["loss"])
    # patch 16: torchvision's own inference is left alone (exact powers of two)
    task16 = DetectionTask(in_dim=32, num_classes=3, patch_size=16, img_size=128, neck_channels=16)
    assert task16.detector.roi_heads.box_roi_pool.scales is None


def test_evaluation_targets_carry_the_annotated_area_for_the_size_buckets():
    """COCO buckets objects by their annotated (mask) area: a 200x200 box whose object covers 30x30 pixels is a
    small object, and a perfect detection of it scores map_small 1 with no medium / large objects at all."""
    from vitlab.tasks import DetectionTask

    task = DetectionTask(in_dim=32, num_classes=3, patch_size=8, img_size=64, neck_channels=16)
    box = torch.tensor([[0.0, 0.0, 200.0, 200.0]])
    metric = task.metrics()
    metric.update([{"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}],
                  [{"boxes": box, "labels": torch.tensor([1]), "iscrowd": torch.tensor([0]),
                    "area": torch.tensor([900.0])}])
    m = task.compute_metrics(metric)
    assert m["map_small"].item() == pytest.approx(1.0)
    assert "map_large" not in m                                       # -1: no large object
    # and evaluation_step hands the batch's areas (original pixels, not divided by the scale) to the metric
    backbone = vit("Ti", patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=64)
    batch = {"image": torch.randn(1, 3, 64, 64), "boxes": [torch.tensor([[4.0, 4.0, 40.0, 40.0]])],
             "labels": [torch.tensor([1])], "iscrowd": [torch.zeros(1, dtype=torch.uint8)],
             "area": [torch.tensor([1000.0])], "image_size": torch.tensor([[64, 64]]), "scale": torch.tensor([0.5])}
    with torch.no_grad():
        out = task.eval().evaluation_step(backbone, batch)
    assert out["target"][0]["area"].tolist() == [1000.0]
    assert out["target"][0]["boxes"].tolist() == [[8.0, 8.0, 80.0, 80.0]]
