"""The segmentation decoders in vitlab/tasks/seg_heads.py: shapes, SegViT's mask scores and its loss by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vitlab.tasks.seg_heads import PPM, ATMHead, FCNHead, LinearSegHead, UPerHead, dice_loss, sigmoid_focal_loss

C = 3


def test_linear_ppm_upernet_fcn_shapes():
    x = torch.randn(2, 16, 8, 8)
    assert LinearSegHead(16, C)(x).shape == (2, C, 8, 8)
    assert PPM(16, 4, (1, 2, 3, 6))(x).shape == (2, 16 + 4 * 4, 8, 8)
    feats = [torch.randn(2, c, 32 // 2 ** i, 40 // 2 ** i) for i, c in enumerate([8, 16, 24, 32])]
    assert UPerHead([8, 16, 24, 32], 12, C)(feats).shape == (2, C, 32, 40)         # at the finest level
    assert FCNHead(24, 12, C)(feats[2]).shape == (2, C, 8, 10)


def test_atm_head_outputs_one_prediction_per_stage():
    head = ATMHead([16, 16, 16], C, dim=16, num_heads=2, num_layers=2).eval()
    taps = [torch.randn(2, 16, 4, 6) for _ in range(3)]
    out = head(taps)
    assert len(out["class_logits"]) == len(out["mask_logits"]) == 3
    assert all(c.shape == (2, C, C + 1) for c in out["class_logits"])
    assert all(m.shape == (2, C, 4, 6) for m in out["mask_logits"])
    # hierarchical inputs of several sizes: masks summed on the finest grid (the last stage read)
    head = ATMHead([8, 16], C, dim=16, num_heads=2, num_layers=1).eval()
    out = head([torch.randn(1, 8, 8, 8), torch.randn(1, 16, 4, 4)])
    assert [tuple(m.shape[-2:]) for m in out["mask_logits"]] == [(8, 8), (8, 8)]
    with pytest.raises(ValueError, match="out_indices=2"):
        head([torch.randn(1, 8, 8, 8)])


def test_atm_masks_accumulate_over_stages():
    """Stage k's mask logits are the sum of the similarity maps of stages 1..k (SegViT's outputs_seg_masks)."""
    head = ATMHead([16, 16], C, dim=16, num_heads=2, num_layers=1).eval()
    sims = []
    for layers in head.decoders:                                          # record each stage's similarity map
        layers[-1].cross_attn.register_forward_hook(lambda m, i, o: sims.append(o[1]))
    out = head([torch.randn(1, 16, 3, 3), torch.randn(1, 16, 3, 3)])
    assert torch.allclose(out["mask_logits"][0].flatten(2), sims[0])
    assert torch.allclose(out["mask_logits"][1].flatten(2), sims[0] + sims[1], atol=1e-6)


def test_scores_by_hand():
    """Two queries, two classes (+ no object), one pixel: score_c = sum_q softmax(cls_q)[c] * sigmoid(mask_q)."""
    cls = torch.tensor([[[math.log(3.0), 0.0, 0.0], [0.0, 0.0, math.log(2.0)]]])   # (1, Q=2, 3)
    masks = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1)                      # sigmoid: 1/2, 3/4
    s = ATMHead.scores(cls, masks)                                                   # (1, 2, 1, 1)
    # query 0: probs (3/5, 1/5, 1/5); query 1: (1/4, 1/4, 1/2)
    assert s[0, 0, 0, 0].item() == pytest.approx(3 / 5 * 1 / 2 + 1 / 4 * 3 / 4)
    assert s[0, 1, 0, 0].item() == pytest.approx(1 / 5 * 1 / 2 + 1 / 4 * 3 / 4)


def test_dice_and_focal_by_hand():
    logits = torch.zeros(1, 4)                                           # sigmoid 1/2 everywhere
    target = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    valid = torch.ones(1, 4)
    assert dice_loss(logits, target, valid).item() == pytest.approx(1 - (2 * 1 + 1) / (2 + 2 + 1))
    # focal: ce = log 2, (1 - p_t)^2 = 1/4, alpha_t = 1/4 (positive) or 3/4 (negative) -> mean log2 / 8
    assert sigmoid_focal_loss(logits, target, valid).item() == pytest.approx(math.log(2) / 8)
    # an invalid pixel is left out of both
    valid = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    assert dice_loss(logits, target, valid).item() == pytest.approx(1 - (2 * 0.5 + 1) / (1.5 + 1 + 1))


def test_atm_loss_targets_and_what_it_ignores():
    """Classes 0 and 2 are present: class targets (0, no-object, 2); the mask losses see only masks 0 and 2 and
    only labelled pixels."""
    head = ATMHead([8], C, dim=8, num_heads=2, num_layers=1)
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([[[0, 0, 2], [2, 255, 0]]])                    # (1, 2, 3)
    cls_logits = torch.randn(1, C, C + 1, generator=g)
    masks = torch.randn(1, C, 2, 3, generator=g)                         # at the labels' size: no resampling
    out = {"class_logits": [cls_logits], "mask_logits": [masks]}
    parts = head.loss(out, labels, mask_weight=1.0)
    weight = torch.tensor([1.0, 1.0, 1.0, 0.1])
    expected_cls = F.cross_entropy(cls_logits[0], torch.tensor([0, 3, 2]), weight)
    assert torch.allclose(parts["loss_cls"], expected_cls)
    valid = (labels != 255).flatten(1).float()
    tgt = torch.stack([(labels[0] == c).flatten().float() for c in (0, 2)])
    m = masks[0, [0, 2]].flatten(1)
    assert torch.allclose(parts["loss_mask"], sigmoid_focal_loss(m, tgt, valid.expand(2, -1)).sum() / 2)
    assert torch.allclose(parts["loss_dice"], dice_loss(m, tgt, valid.expand(2, -1)).sum() / 2)
    assert torch.allclose(parts["loss"], parts["loss_cls"] + parts["loss_mask"] + parts["loss_dice"])

    changed = masks.clone()
    changed[0, 1] += 10.0                                                # the absent class's mask
    changed[:, :, 1, 1] -= 7.0                                           # every mask at the ignored pixel
    parts2 = head.loss({"class_logits": [cls_logits], "mask_logits": [changed]}, labels, mask_weight=1.0)
    assert torch.allclose(parts2["loss"], parts["loss"])
    bce = head.loss(out, labels, mask_loss="bce", mask_weight=1.0)["loss_mask"]
    expected_bce = (F.binary_cross_entropy_with_logits(m, tgt, reduction="none") * valid).sum(1) / valid.sum()
    assert torch.allclose(bce, expected_bce.sum() / 2)


def test_atm_loss_sums_stages_and_survives_unlabelled_images():
    head = ATMHead([8, 8], C, dim=8, num_heads=2, num_layers=1)
    out = head([torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)])
    labels = torch.randint(0, C, (2, 16, 16))
    one = head.loss({k: v[-1:] for k, v in out.items()}, labels)
    both = head.loss(out, labels)
    first = head.loss({k: v[:1] for k, v in out.items()}, labels)
    assert torch.allclose(both["loss"], one["loss"] + first["loss"], atol=1e-5)
    empty = head.loss(out, torch.full((2, 16, 16), 255))                 # nothing labelled: class loss only
    assert torch.isfinite(empty["loss"]) and empty["loss_mask"].item() == 0.0
    empty["loss"].backward()
