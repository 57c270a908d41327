"""DETR head (vitlab/tasks/detr.py): Hungarian matcher, set criterion, head forward / loss / postprocess, overfit."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vitlab.tasks import DETRHead, HungarianMatcher, SetCriterion
from vitlab.tasks.detr import PositionEmbeddingSine, boxes_to_normalised, padding_mask
from vitlab.tasks import detr as detr_module

K = 3                # classes
S = 64               # canvas (S, S) in pixels


def tiny_head(**kw) -> DETRHead:
    cfg = dict(in_channels=16, num_classes=K, hidden_dim=32, num_queries=8, dec_layers=2, num_heads=4, ffn_dim=64,
               dropout=0.0)
    cfg.update(kw)
    return DETRHead(**cfg)


def giou_by_hand(a: list[float], b: list[float]) -> float:
    """GIoU of two XYXY boxes, written out."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def xyxy(cxcywh: list[float]) -> list[float]:
    cx, cy, w, h = cxcywh
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


# ------------------------------------------------------------------ matcher ---

def test_matcher_matches_brute_force_over_all_assignments():
    g = torch.Generator().manual_seed(0)
    Q, T = 3, 2
    logits = torch.randn(1, Q, K + 1, generator=g) * 2
    pred = torch.tensor([[[0.30, 0.30, 0.20, 0.20], [0.70, 0.60, 0.30, 0.40], [0.50, 0.50, 0.50, 0.50]]])
    tgt = {"boxes": torch.tensor([[0.65, 0.62, 0.28, 0.35], [0.45, 0.50, 0.55, 0.45]]), "labels": torch.tensor([2, 0])}
    wc, wb, wg = 1.0, 5.0, 2.0

    # The cost of every (query, target) pair by hand: -p(class) + L1 + -GIoU, weighted.
    prob = logits[0].softmax(-1)
    cost = [[-wc * prob[q, tgt["labels"][t]].item()
             + wb * sum(abs(pred[0, q, i].item() - tgt["boxes"][t, i].item()) for i in range(4))
             - wg * giou_by_hand(xyxy(pred[0, q].tolist()), xyxy(tgt["boxes"][t].tolist()))
             for t in range(T)] for q in range(Q)]
    # Every injective assignment of the 2 targets to 2 of the 3 queries.
    best = min(itertools.permutations(range(Q), T), key=lambda qs: sum(cost[q][t] for t, q in enumerate(qs)))

    (rows, cols), = HungarianMatcher(wc, wb, wg)({"pred_logits": logits, "pred_boxes": pred}, [tgt])
    assert rows.dtype == cols.dtype == torch.int64
    got = {int(t): int(q) for q, t in zip(rows, cols)}
    assert got == {t: q for t, q in enumerate(best)}
    assert rows.tolist() == sorted(rows.tolist())


def test_matcher_obvious_case_and_zero_targets():
    # Boxes only: query 2 sits on target 0 and query 0 on target 1, so that is the matching.
    pred = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]],
                         [[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]]])
    logits = torch.zeros(2, 3, K + 1)
    targets = [{"boxes": torch.tensor([[0.8, 0.8, 0.1, 0.1], [0.2, 0.2, 0.1, 0.1]]), "labels": torch.tensor([0, 1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    matcher = HungarianMatcher(cost_class=0.0, cost_bbox=1.0, cost_giou=0.0)
    (r0, c0), (r1, c1) = matcher({"pred_logits": logits, "pred_boxes": pred}, targets)
    assert r0.tolist() == [0, 2] and c0.tolist() == [1, 0]
    assert r1.numel() == c1.numel() == 0 and r1.dtype == torch.int64
    # A batch with no target at all.
    empty = matcher({"pred_logits": logits, "pred_boxes": pred}, [targets[1], targets[1]])
    assert all(r.numel() == 0 and c.numel() == 0 for r, c in empty)
    with pytest.raises(ValueError, match="all costs are 0"):
        HungarianMatcher(0.0, 0.0, 0.0)


# ---------------------------------------------------------------- criterion ---

def test_loss_parts_by_hand_two_queries_one_target():
    # Query 0 predicts the target box exactly; query 1 is elsewhere. The matching is query 0 <-> the target.
    logits = torch.tensor([[[0.5, 2.0, -1.0, 0.0], [1.0, 0.0, 0.0, 1.5]]])          # (1, 2, K+1)
    pred = torch.tensor([[[0.5, 0.5, 0.25, 0.5], [0.1, 0.1, 0.1, 0.1]]])
    label = 1
    targets = [{"boxes": pred[0, :1].clone(), "labels": torch.tensor([label])}]
    crit = SetCriterion(K, HungarianMatcher(), eos_coef=0.1)
    out = crit({"pred_logits": logits, "pred_boxes": pred}, targets)

    logp = logits[0].log_softmax(-1)
    # weighted CE, averaged by the sum of the weights: matched query (weight 1), unmatched -> no-object (0.1).
    ce = (-1.0 * logp[0, label] - 0.1 * logp[1, K]) / (1.0 + 0.1)
    assert out["loss_ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert out["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)          # GIoU = 1 for a perfect box

    # Move the matched prediction: L1 = the summed coordinate errors, GIoU loss = 1 - GIoU, per target box.
    pred2 = pred.clone()
    pred2[0, 0] = torch.tensor([0.55, 0.45, 0.35, 0.4])
    out2 = crit({"pred_logits": logits, "pred_boxes": pred2}, targets)
    l1 = 0.05 + 0.05 + 0.10 + 0.10
    assert out2["loss_bbox"].item() == pytest.approx(l1, rel=1e-5)
    g = giou_by_hand(xyxy(pred2[0, 0].tolist()), xyxy(targets[0]["boxes"][0].tolist()))
    assert out2["loss_giou"].item() == pytest.approx(1 - g, rel=1e-5)


def test_box_losses_are_normalised_by_the_number_of_boxes_across_images_and_processes(monkeypatch):
    pred = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]],
                         [[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]])
    logits = torch.zeros(2, 2, K + 1)
    # Image 0: one box off by 0.1 in cx (L1 0.1); image 1: two exact boxes. 3 boxes -> L1 = 0.1 / 3.
    targets = [{"boxes": torch.tensor([[0.6, 0.5, 0.2, 0.2]]), "labels": torch.tensor([0])},
               {"boxes": pred[1].clone(), "labels": torch.tensor([0, 2])}]
    crit = SetCriterion(K, HungarianMatcher(), eos_coef=0.1)
    assert crit({"pred_logits": logits, "pred_boxes": pred}, targets)["loss_bbox"].item() == pytest.approx(0.1 / 3)

    # Under torch.distributed: the count is summed over ranks then averaged (here: another rank with 5 boxes).
    def fake_all_reduce(t):
        t += 5.0
    monkeypatch.setattr(detr_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(detr_module.dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(detr_module.dist, "get_world_size", lambda: 2)
    out = crit({"pred_logits": logits, "pred_boxes": pred}, targets)
    assert out["loss_bbox"].item() == pytest.approx(0.1 / ((3 + 5) / 2))


def test_head_loss_from_pixel_targets_sums_weighted_parts_with_aux():
    torch.manual_seed(0)
    head = tiny_head(dec_layers=3)
    outputs = head(torch.randn(2, 16, 4, 4))
    targets = [{"boxes": torch.tensor([[8.0, 16.0, 40.0, 48.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.tensor([[0.0, 0.0, 32.0, 32.0], [30.0, 20.0, 60.0, 64.0]]),
                "labels": torch.tensor([0, 1])}]
    out = head.loss(outputs, targets, (S, S))
    assert set(out) == {"loss", "loss_ce", "loss_bbox", "loss_giou"}

    # The same from the criterion on normalised cxcywh targets (what the head converts pixels to).
    assert torch.allclose(boxes_to_normalised(targets[0]["boxes"], (S, S)), torch.tensor([[0.375, 0.5, 0.5, 0.5]]))
    norm = [{"boxes": boxes_to_normalised(t["boxes"], (S, S)), "labels": t["labels"]} for t in targets]
    parts = head.criterion(outputs, norm)
    assert set(parts) == {f"loss_{p}{s}" for p in ("ce", "bbox", "giou") for s in ("", "_0", "_1")}
    total = sum(w * parts[f"{name}{s}"] for name, w in (("loss_ce", 1.0), ("loss_bbox", 5.0), ("loss_giou", 2.0))
                for s in ("", "_0", "_1"))
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-5)
    assert out["loss_ce"].item() == pytest.approx(parts["loss_ce"].item(), rel=1e-6)

    out["loss"].backward()
    assert head.query_embed.weight.grad.abs().sum() > 0 and head.input_proj.weight.grad.abs().sum() > 0


def test_images_without_targets_and_crowd_boxes():
    torch.manual_seed(0)
    head = tiny_head()
    outputs = head(torch.randn(2, 16, 4, 4))
    none = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    out = head.loss(outputs, [none, none], (S, S))
    assert all(torch.isfinite(v) for v in out.values())
    assert out["loss_bbox"].item() == 0 and out["loss_giou"].item() == 0
    # Only the no-object class is supervised: CE = mean over queries of -log p(no object).
    logp = outputs["pred_logits"].log_softmax(-1)[..., K]
    assert out["loss_ce"].item() == pytest.approx(-logp.mean().item(), rel=1e-5)
    out["loss"].backward()

    # A crowd box (iscrowd=1) gets no loss: same as the image without it.
    outputs = head(torch.randn(1, 16, 4, 4))
    keep = {"boxes": torch.tensor([[8.0, 8.0, 24.0, 24.0]]), "labels": torch.tensor([1])}
    crowd = {"boxes": torch.tensor([[8.0, 8.0, 24.0, 24.0], [30.0, 30.0, 60.0, 60.0]]),
             "labels": torch.tensor([1, 2]), "iscrowd": torch.tensor([0, 1], dtype=torch.uint8)}
    a, b = head.loss(outputs, [keep], (S, S)), head.loss(outputs, [crowd], (S, S))
    assert a["loss"].item() == pytest.approx(b["loss"].item(), rel=1e-6)


# --------------------------------------------------------------------- head ---

def test_forward_shapes_and_aux_outputs():
    torch.manual_seed(0)
    head = tiny_head(num_queries=10, dec_layers=2, enc_layers=1)
    out = head(torch.randn(2, 16, 4, 4))
    assert out["pred_logits"].shape == (2, 10, K + 1)
    assert out["pred_boxes"].shape == (2, 10, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert len(out["aux_outputs"]) == 1
    assert out["aux_outputs"][0]["pred_logits"].shape == (2, 10, K + 1)
    assert out["aux_outputs"][0]["pred_boxes"].shape == (2, 10, 4)
    assert tiny_head(aux_loss=False)(torch.randn(1, 16, 4, 4))["aux_outputs"] == []
    with pytest.raises(ValueError, match="must match the feature map"):
        head(torch.randn(2, 16, 4, 4), mask=torch.zeros(2, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="hidden_dim"):
        DETRHead(16, K, hidden_dim=30, num_heads=4)


def test_padding_mask_hides_padded_cells():
    # Valid 40 x 64 of a 64 x 64 canvas on a 4 x 4 map (16 px cells): rows starting at 48 are padding.
    m = padding_mask(torch.tensor([[40, 64], [64, 20]]), (S, S), (4, 4))
    assert m[0].tolist() == [[False] * 4] * 3 + [[True] * 4]
    assert m[1].tolist() == [[False, False, True, True]] * 4
    # Padded cells do not change the predictions (cross-attention masks them; positions count valid cells only).
    torch.manual_seed(0)
    head = tiny_head(enc_layers=1).eval()
    x = torch.randn(2, 16, 4, 4)
    x2 = x.clone()
    x2[0, :, 3] = 100.0
    x2[1, :, :, 2:] = -7.0
    a, b = head(x, mask=m), head(x2, mask=m)
    assert torch.allclose(a["pred_logits"], b["pred_logits"], atol=1e-5)
    assert torch.allclose(a["pred_boxes"], b["pred_boxes"], atol=1e-5)
    # A fully padded image still gives finite outputs.
    full = torch.ones(1, 4, 4, dtype=torch.bool)
    assert torch.isfinite(head(x[:1], mask=full)["pred_logits"]).all()


def test_sine_position_encoding_values():
    pe = PositionEmbeddingSine(num_pos_feats=4)(torch.zeros(1, 2, 2, dtype=torch.bool))   # (1, 8, 2, 2)
    assert pe.shape == (1, 8, 2, 2)
    # Cell (y=1, x=0): y coordinate = 2/2 * 2pi, x = 1/2 * 2pi; channels (sin f0, cos f0, sin f1, cos f1), y first.
    y, x = 2 * math.pi, math.pi
    f1 = 10000 ** (2 / 4)
    expect = [math.sin(y), math.cos(y), math.sin(y / f1), math.cos(y / f1),
              math.sin(x), math.cos(x), math.sin(x / f1), math.cos(x / f1)]
    assert pe[0, :, 1, 0].tolist() == pytest.approx(expect, abs=1e-5)


def test_postprocess_pixels_scores_labels():
    logits = torch.full((1, 3, K + 1), -10.0)
    logits[0, 0, 2] = 5.0                  # query 0: class 2, confident
    logits[0, 1, K] = 5.0                  # query 1: no object
    logits[0, 1, 0] = 1.0
    logits[0, 2, 0] = 3.0                  # query 2: class 0, less confident
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.25], [0.1, 0.1, 0.1, 0.1], [0.25, 0.75, 0.5, 0.5]]])
    head = tiny_head()
    res = head.postprocess({"pred_logits": logits, "pred_boxes": boxes}, (S, S))
    assert len(res) == 1 and res[0]["boxes"].shape == (3, 4)
    prob = logits[0].softmax(-1)
    assert res[0]["labels"].tolist() == [2, 0, 0]                             # by score, 0-based real classes
    assert res[0]["scores"].tolist() == pytest.approx([prob[0, 2].item(), prob[2, 0].item(), prob[1, 0].item()])
    assert res[0]["boxes"][0].tolist() == pytest.approx([16.0, 24.0, 48.0, 40.0])
    assert res[0]["boxes"][1].tolist() == pytest.approx([0.0, 32.0, 32.0, 64.0])
    top = head.postprocess({"pred_logits": logits, "pred_boxes": boxes}, (S, S), top_k=1)
    assert top[0]["labels"].tolist() == [2] and top[0]["boxes"].shape == (1, 4)


# ------------------------------------------------------------------ overfit ---

def test_loss_falls_on_a_tiny_overfit_set():
    torch.manual_seed(0)
    head = tiny_head(num_queries=8)
    feats = torch.randn(2, 16, 4, 4)
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 32.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[4.0, 30.0, 28.0, 60.0], [36.0, 4.0, 60.0, 28.0]]),
                "labels": torch.tensor([0, 2])}]
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    first = None
    for _ in range(150):
        loss = head.loss(head(feats), targets, (S, S))["loss"]
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        final = head.loss(head(feats), targets, (S, S))["loss"].item()
        res = head.postprocess(head(feats), (S, S))
    assert final < 0.5 * first, (first, final)
    from torchvision.ops import box_iou
    top = res[0]
    assert top["labels"][0].item() == 1
    assert box_iou(top["boxes"][:1], targets[0]["boxes"]).item() > 0.5
    # Image 2: its two best detections cover its two boxes.
    iou = box_iou(res[1]["boxes"][:2], targets[1]["boxes"])
    assert iou.max(0).values.min().item() > 0.5
