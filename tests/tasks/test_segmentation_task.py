"""SegmentationTask: heads' shapes, the ignore-aware loss, overfitting, whole / slide inference, the metrics against
hand-computed cases, evaluation at another mask resolution, and the drawn overlays."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from vitlab.data.base import DataInfo
from vitlab.backbones import vit
from vitlab.tasks.segmentation import SegmentationTask, confusion_scores, metric_names, slide_windows

D, P, S, C = 32, 8, 64, 4
HEADS = ("linear", "upernet", "segvit")
SEGVIT = {"num_heads": 2, "num_layers": 1}
DATA = DataInfo(num_classes=C, img_size=S, task="segmentation")


def make(head: str = "linear", num_classes: int = C, **kw) -> tuple[torch.nn.Module, SegmentationTask]:
    torch.manual_seed(0)
    opts = SegmentationTask.backbone_options({"head": head, "taps": kw.get("taps", 4)}, DATA)
    opts.pop("img_size"), opts.pop("in_chans")
    backbone = vit("Ti", patch_size=P, embed_dim=D, depth=4, num_heads=2, img_size=S, **opts)
    kw.setdefault("channels", 32)
    if head == "segvit":
        kw.setdefault("segvit", SEGVIT)
    task = SegmentationTask(D, num_classes, P, S, head=head, **kw)
    return backbone, task


def one_hot_logits(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class map (B, H, W) -> logits (B, C, H, W) whose argmax is that map."""
    return F.one_hot(pred, num_classes).permute(0, 3, 1, 2).float() * 5


# ------------------------------------------------------------------ shapes ---
@pytest.mark.parametrize("head", HEADS)
def test_heads_give_logits_at_the_image_size(head):
    backbone, task = make(head)
    task.eval()
    with torch.no_grad():
        assert task.predict(backbone, torch.randn(2, 3, S, S)).shape == (2, C, S, S)
        assert task.predict(backbone, torch.randn(1, 3, 40, 72)).shape == (1, C, 40, 72)   # another size
        assert task.predict(backbone, torch.randn(1, 3, 37, 50)).shape == (1, C, 37, 50)   # not a patch multiple
    task.train()
    out = task.training_step(backbone, {"image": torch.randn(2, 3, S, S), "mask": torch.randint(0, C, (2, S, S))})
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert any(p.grad is not None for p in task.head.parameters())
    assert backbone.patch_embed.proj.weight.grad is not None


def test_backbone_options_and_part_names():
    geometry = {"img_size": S, "in_chans": 3}
    assert SegmentationTask.backbone_options({"head": "linear"}, DATA) == geometry
    assert SegmentationTask.backbone_options({"head": "upernet", "taps": 4}, DATA) == {**geometry, "out_indices": 4}
    assert SegmentationTask.backbone_options({"head": "segvit", "taps": [1, 2, 3]}, DATA) == \
        {**geometry, "out_indices": [1, 2, 3]}
    batch = {"image": torch.randn(2, 3, S, S), "mask": torch.randint(0, C, (2, S, S))}
    backbone, task = make("upernet")
    out = task.training_step(backbone, batch)
    assert set(out) == {"loss", "loss_seg", "loss_aux"}
    assert torch.allclose(out["loss"], out["loss_seg"] + 0.4 * out["loss_aux"])
    backbone, task = make("upernet", aux_weight=0.0)
    assert set(task.training_step(backbone, batch)) == {"loss", "loss_seg"}
    backbone, task = make("segvit")
    assert set(task.training_step(backbone, batch)) == {"loss", "loss_cls", "loss_mask", "loss_dice"}
    assert task.kind == "segmentation" and task.monitor == "val/miou"


def test_wrong_options_name_the_fix():
    with pytest.raises(ValueError, match="task.taps=4"):
        make("upernet", taps=3)
    with pytest.raises(ValueError, match="valid"):
        make("segvit", segvit={"num_layer": 2})
    with pytest.raises(ValueError, match="linear, upernet, segvit"):
        make("fcn")
    _, task = make("upernet")
    plain = vit("Ti", patch_size=P, embed_dim=D, depth=2, num_heads=2, img_size=S)   # no out_indices
    with pytest.raises(KeyError, match="out_indices"):
        task.predict(plain, torch.randn(1, 3, S, S))


# -------------------------------------------------------------------- loss ---
def test_loss_ignores_ignore_index_pixels():
    _, task = make("linear")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, C, 6, 6, generator=g)
    mask = torch.randint(0, C, (2, 6, 6), generator=g)
    mask[0, :3] = 255
    mask[1, :, 4:] = 255
    base = task.pixel_ce(logits, mask)
    changed = logits.clone()
    changed[(mask == 255).unsqueeze(1).expand_as(logits)] = 100.0 * torch.randn(int((mask == 255).sum()) * C,
                                                                                 generator=g)
    assert torch.allclose(task.pixel_ce(changed, mask), base)
    # hand-computed: the mean of -log softmax over the labelled pixels only
    keep = mask != 255
    by_hand = -(logits.log_softmax(1).gather(1, mask.clamp(max=C - 1).unsqueeze(1))[:, 0][keep]).mean()
    assert torch.allclose(base, by_hand)
    assert task.pixel_ce(logits, torch.full_like(mask, 255)) == 0        # all ignored: 0, not NaN


def test_training_step_scores_only_the_labelled_pixels():
    """The step's loss is the CE of the upsampled logits over the labelled pixels; labelling the ignored region
    changes it."""
    backbone, task = make("linear")
    task.eval()                                                          # no dropout / BN batch statistics
    image = torch.randn(2, 3, S, S)
    mask = torch.randint(0, C, (2, S, S))
    ignored = mask.clone()
    ignored[:, :20] = 255
    loss = task.training_step(backbone, {"image": image, "mask": ignored})["loss"]
    with torch.no_grad():
        logits = task.predict(backbone, image)                           # (2, C, S, S), the same upsampling
    keep = ignored != 255
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[keep], ignored[keep])
    assert torch.allclose(loss, expected, atol=1e-6)
    assert not torch.allclose(task.training_step(backbone, {"image": image, "mask": mask})["loss"], loss)


def synthetic_batch() -> dict:
    """2 images with 2-3 flat coloured regions each; class = colour (red 0, green 1, blue 2)."""
    colours = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])
    mask = torch.zeros(2, S, S, dtype=torch.long)
    mask[0, :, 32:] = 1                                                  # left red, right green
    mask[1, :24] = 2                                                     # top blue, bottom red,
    mask[1, 40:, 16:48] = 1                                              # a green block
    image = colours[mask].permute(0, 3, 1, 2).contiguous()               # (2, 3, S, S)
    image = image + 0.1 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0))
    mask[0, :8, :8] = 255                                                # an unlabelled corner
    return {"image": image, "mask": mask}


@pytest.mark.parametrize("head,steps,fall", [("linear", 40, 0.5), ("upernet", 40, 0.5), ("segvit", 40, 0.5)])
def test_losses_fall_on_a_tiny_overfit_set(head, steps, fall):
    backbone, task = make(head, num_classes=3, dropout=0.0)
    batch = synthetic_batch()
    params = list(backbone.parameters()) + list(task.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    losses = []
    for _ in range(steps):
        loss = task.training_step(backbone, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = losses[0], sum(losses[-3:]) / 3
    assert last < (1 - fall) * first, (head, losses[0], losses[-3:])
    assert last < first
    task.eval()                                                          # and it segments the training images
    with torch.no_grad():
        pred = task.predict(backbone, batch["image"]).argmax(1)
    keep = batch["mask"] != 255
    assert (pred[keep] == batch["mask"][keep]).float().mean() > 0.9


# --------------------------------------------------------------- inference ---
@pytest.mark.parametrize("head", ["linear", "segvit"])
def test_slide_with_one_window_equals_whole(head):
    backbone, task = make(head)
    task.eval()
    x = torch.randn(2, 3, S, S)
    with torch.no_grad():
        whole = task.predict(backbone, x)
        task.inference = "slide"
        slide = task.predict(backbone, x)
    assert torch.allclose(whole, slide, atol=1e-6)


def test_slide_windows_follow_mmseg():
    # 70 x 100, windows 64 every 42: ceil((70 - 64) / 42) + 1 = 2 rows, ceil((100 - 64) / 42) + 1 = 2 columns
    wins = slide_windows(70, 100, 64, 42)
    assert wins == [(0, 64, 0, 64), (0, 64, 36, 100), (6, 70, 0, 64), (6, 70, 36, 100)]
    count = torch.zeros(70, 100)
    for y1, y2, x1, x2 in wins:
        count[y1:y2, x1:x2] += 1
    assert count.min() >= 1
    assert count[0, 0] == 1 and count[30, 50] == 4 and count[69, 99] == 1 and count[3, 50] == 2
    assert slide_windows(40, 50, 64, 42) == [(0, 40, 0, 50)]             # smaller: one (padded) window
    for H, W in [(64, 64), (65, 129), (200, 91)]:
        wins = slide_windows(H, W, 64, 42)
        ny = math.ceil(max(H - 64, 0) / 42) + 1
        nx = math.ceil(max(W - 64, 0) / 42) + 1
        assert len(wins) == ny * nx
        assert all(y2 - y1 == min(64, H) and x2 - x1 == min(64, W) for y1, y2, x1, x2 in wins)


def test_slide_averages_the_windows_on_large_and_odd_images(monkeypatch):
    _, task = make("linear", inference="slide", slide_stride=42)
    seen = []

    def fake_whole(backbone, crop):                                      # a per-pixel function of the crop
        seen.append(tuple(crop.shape[-2:]))
        return crop[:, :1].expand(-1, C, -1, -1) * 2

    monkeypatch.setattr(task, "_whole", fake_whole)
    for H, W in [(70, 100), (40, 50), (130, 64)]:
        seen.clear()
        x = torch.randn(2, 3, H, W)
        out = task.predict(None, x)
        assert out.shape == (2, C, H, W)
        assert torch.allclose(out, x[:, :1].expand(-1, C, -1, -1) * 2, atol=1e-6)   # sum / count = the value
        assert set(seen) == {(S, S)} and len(seen) == len(slide_windows(H, W, S, 42))


def test_slide_runs_the_real_backbone_on_a_large_image():
    backbone, task = make("upernet", inference="slide")
    task.eval()
    with torch.no_grad():
        out = task.predict(backbone, torch.randn(1, 3, 90, 75))
    assert out.shape == (1, C, 90, 75) and torch.isfinite(out).all()


# ----------------------------------------------------------------- metrics ---
def run_eval(task, pred_map, mask, image_size=None, mask_size=None, monkeypatch=None):
    B, H, W = pred_map.shape
    # the task predicts each image on its valid region: the stand-in returns that crop of the fixed logits
    monkeypatch.setattr(task, "predict", lambda backbone, images: one_hot_logits(pred_map, task.num_classes)[
        : images.shape[0], :, : images.shape[-2], : images.shape[-1]])
    batch = {"image": torch.zeros(B, 3, H, W), "mask": mask}
    if image_size is not None:
        batch["image_size"], batch["mask_size"] = torch.tensor(image_size), torch.tensor(mask_size)
    return task.evaluation_step(None, batch)


def test_metrics_hand_computed(monkeypatch):
    """A 2x3 image, classes 0..2 present, class 3 absent, one ignored pixel:
        target [[0, 0, 1], [1, 255, 2]]    pred [[0, 1, 1], [1, 2, 2]]
    class 0: tp 1, union 2 -> 1/2;  class 1: tp 2, union 3 -> 2/3;  class 2: tp 1, union 1 -> 1;  class 3: left out.
    mIoU = (1/2 + 2/3 + 1) / 3;  pixel acc = 4/5;  mean acc = (1/2 + 1 + 1) / 3."""
    _, task = make("linear", class_names=["Sky", "Traffic Light", "road/way", "car"])
    target = torch.tensor([[[0, 0, 1], [1, 255, 2]]])
    pred = torch.tensor([[[0, 1, 1], [1, 2, 2]]])
    out = run_eval(task, pred, target, monkeypatch=monkeypatch)
    assert out["preds"].tolist() == [0, 1, 1, 1, 2] and out["target"].tolist() == [0, 0, 1, 1, 2]
    metric = task.metrics()
    metric.update(out["preds"], out["target"])
    m = task.compute_metrics(metric)
    assert m["miou"].item() == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["pixel_acc"].item() == pytest.approx(4 / 5)
    assert m["macc"].item() == pytest.approx((1 / 2 + 1 + 1) / 3)
    assert m["iou_sky"].item() == pytest.approx(1 / 2)
    assert m["iou_traffic_light"].item() == pytest.approx(2 / 3)
    assert m["iou_road_way"].item() == pytest.approx(1.0)
    assert math.isnan(m["iou_car"].item())
    assert all(v.dim() == 0 for v in m.values())

    # the same image again, now class 3 predicted on the class-2 pixel: class 3's union is 1 and its IoU 0
    # counts; class 2 drops to 0 (tp 0, union 1). Accumulated over both updates:
    # class 0: tp 2 / union 4;  class 1: 4 / 6;  class 2: tp 1 / union 2;  class 3: 0 / 1.
    pred2 = torch.tensor([[[0, 1, 1], [1, 2, 3]]])
    out2 = run_eval(task, pred2, target, monkeypatch=monkeypatch)
    metric.update(out2["preds"], out2["target"])
    m = task.compute_metrics(metric)
    assert m["miou"].item() == pytest.approx((2 / 4 + 4 / 6 + 1 / 2 + 0) / 4)
    assert m["iou_car"].item() == 0.0
    assert m["pixel_acc"].item() == pytest.approx(7 / 10)
    assert m["macc"].item() == pytest.approx((2 / 4 + 4 / 4 + 1 / 2) / 3)   # class 3 not in the target


def test_eval_loss_is_ce_on_the_scored_pixels(monkeypatch):
    _, task = make("linear")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, C, 4, 5, generator=g)
    mask = torch.randint(0, C, (1, 4, 5), generator=g)
    mask[0, 0] = 255
    monkeypatch.setattr(task, "predict", lambda backbone, images: logits)
    out = task.evaluation_step(None, {"image": torch.zeros(1, 3, 4, 5), "mask": mask})
    keep = mask != 255
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[keep], mask[keep])
    assert torch.allclose(out["loss"], expected)


def test_confusion_scores_agree_with_torchmetrics():
    g = torch.Generator().manual_seed(1)
    preds, target = torch.randint(0, 5, (500,), generator=g), torch.randint(0, 4, (500,), generator=g)  # 4 unseen
    target[:50] = 4
    _, task = make("linear", num_classes=6)                              # class 5: in neither
    metric = task.metrics()
    metric.update(preds, target)
    s = confusion_scores(metric.compute()["confmat"])
    jac = MulticlassJaccardIndex(6, average=None)(preds, target)
    assert torch.allclose(s["iou"][:5].float(), jac[:5], atol=1e-6) and math.isnan(s["iou"][5].item())
    assert s["pixel_acc"].item() == pytest.approx(MulticlassAccuracy(6, average="micro")(preds, target).item())
    m = task.compute_metrics(metric)
    assert m["miou"].item() == pytest.approx(jac[:5].mean().item(), abs=1e-6)
    assert set(m) == {"miou", "pixel_acc", "macc"} | {f"iou_{i}" for i in range(6)}


def test_metric_names_sanitise_and_deduplicate():
    assert metric_names(["Traffic Light", "traffic-light", "", "Person (rider)"], 5) == [
        "traffic_light", "traffic_light_1", "2", "person_rider", "4"]


def test_eval_with_mask_at_another_resolution(monkeypatch):
    """Image 64x64 padded, valid 48x64; its mask at the original 24x32 inside a padded 30x40 tensor. The logits'
    valid region is resized to 24x32: left half (image columns < 32) class 1, right half class 2."""
    _, task = make("linear")
    pred = torch.zeros(1, S, S, dtype=torch.long)
    pred[0, :48, :32], pred[0, :48, 32:] = 1, 2                           # padding rows 48.. stay class 0
    mask = torch.full((1, 30, 40), 255)
    mask[0, :24, :32] = 1
    mask[0, :24, 16:32] = 2                                              # right half of the valid mask
    mask[0, 0, 0] = 255                                                  # one ignored pixel inside
    out = run_eval(task, pred, mask, [[48, 64]], [[24, 32]], monkeypatch)
    assert out["target"].numel() == 24 * 32 - 1                          # only the valid, labelled pixels
    assert (out["preds"] == out["target"]).all()
    assert out["preds"].tolist().count(2) == 24 * 16


def test_eval_runs_end_to_end_with_padding_and_resizing():
    backbone, task = make("segvit")
    task.eval()
    batch = {"image": torch.randn(2, 3, 48, 64), "mask": torch.randint(0, C, (2, 50, 70)),
             "image_size": torch.tensor([[48, 64], [40, 48]]), "mask_size": torch.tensor([[50, 70], [30, 36]])}
    batch["mask"][1, 30:], batch["mask"][1, :, 36:] = 255, 255
    with torch.no_grad():
        out = task.evaluation_step(backbone, batch)
    assert out["preds"].shape == out["target"].shape == (50 * 70 + 30 * 36,)
    assert torch.isfinite(out["loss"])


def test_eval_does_not_depend_on_how_images_are_batched():
    """A 48x64 image gives the same predictions alone and in a batch padded to 64x64 with a larger image: it is
    predicted on its own valid region, so the padding tokens the ViT would attend to never enter."""
    backbone, task = make("linear")
    task.eval()
    torch.manual_seed(1)
    small, large = torch.randn(3, 48, 64), torch.randn(3, 64, 64)
    alone = {"image": small[None], "mask": torch.randint(0, C, (1, 48, 64)), "image_size": torch.tensor([[48, 64]]),
             "mask_size": torch.tensor([[48, 64]])}
    padded = torch.zeros(2, 3, 64, 64)
    padded[0, :, :48], padded[1] = small, large
    mask = torch.full((2, 64, 64), 255)
    mask[0, :48], mask[1] = alone["mask"][0], torch.randint(0, C, (64, 64))
    together = {"image": padded, "mask": mask, "image_size": torch.tensor([[48, 64], [64, 64]]),
                "mask_size": torch.tensor([[48, 64], [64, 64]])}
    with torch.no_grad():
        a, b = task.evaluation_step(backbone, alone), task.evaluation_step(backbone, together)
    n = 48 * 64
    assert torch.equal(a["preds"], b["preds"][:n])


# ----------------------------------------------------------------- drawing ---
def test_visualize_gives_uint8_rows():
    backbone, task = make("linear")
    task.eval()
    B = 10
    mask = torch.randint(0, C, (B, 32, 32))                              # the eval mask at half resolution
    mask[:, :4] = 255
    batch = {"image": torch.randn(B, 3, S, S), "mask": mask,
             "image_size": torch.tensor([[S, S]] * B), "mask_size": torch.tensor([[32, 32]] * B)}
    rows = task.visualize(backbone, batch)["segmentation"]
    assert len(rows) == 3
    for r in rows:
        assert r.dtype == torch.uint8 and r.shape == (8, 3, S, S)      # at most 8, at the image's size
    images, gt, _ = rows
    assert torch.equal(gt[:, :, :8], images[:, :, :8])                   # ignored rows (mask rows 0..3) unpainted
    assert not torch.equal(gt[:, :, 8:], images[:, :, 8:])
    expected = torch.tensor(task.palette[int(mask[0, 10, 10])], dtype=torch.float)
    painted = gt[0, :, 20, 20].float()                                   # mask pixel (10, 10) -> image (20, 20)
    assert torch.allclose(painted, 0.5 * images[0, :, 20, 20].float() + 0.5 * expected, atol=1.01)


def test_hierarchical_pyramid_inputs():
    """A hierarchical backbone's features["pyramid"] feeds UPerNet and SegViT directly; linear reads its last."""
    chans, strides = [8, 16, 24, 32], [4, 8, 16, 32]

    def backbone(x):
        B, _, H, W = x.shape
        assert H % 32 == 0 and W % 32 == 0                               # padded to the coarsest stride
        return {"pyramid": [F.avg_pool2d(x, s).repeat(1, c // 2, 1, 1)[:, :c] for c, s in zip(chans, strides)]}

    for head in HEADS:
        task = SegmentationTask(D, C, 4, S, head=head, channels=16, segvit=SEGVIT, pyramid_channels=chans,
                                pyramid_strides=strides)
        out = task.training_step(backbone, {"image": torch.randn(2, 3, S, S), "mask": torch.randint(0, C, (2, S, S))})
        assert torch.isfinite(out["loss"])
        task.eval()
        assert task.predict(backbone, torch.randn(1, 3, 40, 50)).shape == (1, C, 40, 50)


def test_real_camvid_batch_evaluates_at_the_original_resolution():
    """Two CamVid val frames resized to a shorter side of 64 (eval_size), masks kept at 360 x 480: every labelled
    pixel of the original masks is scored, with whole and with slide inference, and the overlays are drawn."""
    from tests.conftest import SHARED_DATA
    from vitlab.data.segmentation import CamVid

    root = SHARED_DATA / "camvid"
    if not (root / "val").is_dir():
        pytest.skip(f"CamVid not found at {root} (see {SHARED_DATA}/README.md)")
    source = CamVid(str(root))
    raw = source.dataset("val")
    tf = source.build_transform(False, S, eval_size=64, size_divisor=P)
    batch = source.collate([tf(dict(raw[i])) for i in range(2)])
    assert tuple(batch["mask"].shape[-2:]) == (360, 480) and batch["image"].shape[-2] == 64
    backbone, task = make("linear", num_classes=source.num_classes, class_names=source.class_names,
                          palette=source.palette)
    task.eval()
    labelled = int((batch["mask"] != 255).sum())
    with torch.no_grad():
        whole = task.evaluation_step(backbone, batch)
        task.inference = "slide"
        slide = task.evaluation_step(backbone, batch)
        rows = task.visualize(backbone, batch)["segmentation"]
    for out in (whole, slide):
        assert out["preds"].shape == out["target"].shape == (labelled,)
        assert torch.isfinite(out["loss"])
    metric = task.metrics()
    metric.update(whole["preds"], whole["target"])
    m = task.compute_metrics(metric)
    assert 0 <= m["miou"] <= 1 and "iou_signsymbol" in m and "iou_sky" in m
    assert all(r.shape == batch["image"].shape and r.dtype == torch.uint8 for r in rows)


def test_upernet_at_one_image_per_device_stops_with_the_fix():
    """UPerNet's global pooling branch batch-normalises one value per channel and image: at batch 1 it cannot
    train (mmseg relies on SyncBN with >= 2 images per GPU); the step says so instead of BatchNorm's ValueError."""
    task = SegmentationTask(in_dim=32, num_classes=3, patch_size=8, img_size=64, head="upernet", channels=16)
    backbone = vit("Ti", patch_size=8, embed_dim=32, depth=4, num_heads=2, img_size=64, out_indices=4)
    batch = {"image": torch.randn(1, 3, 64, 64), "mask": torch.randint(0, 3, (1, 64, 64))}
    with pytest.raises(ValueError, match="raise data.batch_size"):
        task.training_step(backbone, batch)
