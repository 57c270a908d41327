"""Layer-wise lr decay (BEiT / MAE fine-tuning) in build_optimizer / param_groups, on a tiny vitlab ViT recipe."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch
from torch import nn

from vitlab.backbones.base import Backbone
from vitlab.optim import SAM, build_optimizer, cosine_schedule, no_weight_decay_names, param_groups

DECAY = 0.5
LR = 1e-3


def expected_layer(name: str, depth: int) -> int:
    """Written out from the BEiT rule, independently of vitlab.optim: embeddings 0, block i -> i + 1, rest L + 1."""
    parts = name.split(".")
    if parts[0] == "backbone" and parts[1] == "blocks":
        return int(parts[2]) + 1
    if parts[0] == "backbone" and parts[1] in ("patch_embed", "cls_token", "pos_embed", "reg_token", "mask_token"):
        return 0
    return depth + 1


def lr_of(opt: torch.optim.Optimizer) -> dict[int, dict]:
    return {id(p): g for g in opt.param_groups for p in g["params"]}


def test_layer_ids_of_a_vitlab_recipe(full_model):
    ids = {n: full_model.layer_id(n) for n, _ in full_model.named_parameters()}
    for n in ("backbone.cls_token", "backbone.reg_token", "backbone.mask_token", "backbone.pos_embed",
              "backbone.patch_embed.proj.weight", "backbone.patch_embed.proj.bias"):
        assert ids[n] == 0, n
    assert ids["backbone.blocks.0.attn.qkv.weight"] == 1
    assert ids["backbone.blocks.1.ls2.gamma"] == 2
    assert ids["backbone.norm.weight"] == 3 and ids["task.head.fc.weight"] == 3
    assert ids == {n: expected_layer(n, 2) for n in ids}


def test_layer_ids_outside_the_backbone_and_of_deep_models(make_model):
    """The recipe asks its backbone for backbone.* names; everything else of the recipe trains at the full lr."""
    from vitlab.backbones import vit
    from vitlab.recipes import Supervised
    from vitlab.tasks import ClassificationTask

    deep = Supervised(vit("Ti", patch_size=8, embed_dim=32, depth=12, num_heads=2, img_size=16, distill_token=True,
                          global_pool="avg"), ClassificationTask(32, 10))
    assert deep.num_layers == 12
    assert deep.layer_id("backbone.blocks.11.mlp.fc1.weight") == 12
    assert deep.layer_id("backbone.dist_token") == 0
    assert deep.layer_id("backbone.fc_norm.weight") == 13
    assert deep.layer_id("decoder.blocks.0.attn.qkv.weight") == 13        # an MAE decoder trains at full lr
    assert deep.layer_id("task.head.fc.bias") == 13
    assert deep.backbone.layer_id("blocks.3.norm1.weight") == 4           # a bare backbone
    assert deep.backbone.layer_id("pos_embed") == 0


class _Stages(Backbone):
    """A hierarchical backbone whose parameters are not named blocks.N (Swin's layers.i.blocks.j): it declares its
    own layers, and layer decay must follow them, not guess from the names."""

    def __init__(self):
        super().__init__()
        self.embed_dim, self.num_layers = 4, 4
        self.stem = nn.Linear(3, 4)
        self.layers = nn.ModuleList([nn.ModuleDict({"blocks": nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])})
                                     for _ in range(2)])
        self.blocks = nn.Linear(4, 4)          # a decoy: a name-based rule would call this "block"

    def layer_id(self, name: str) -> int:
        parts = name.split(".")
        if parts[0] == "stem":
            return 0
        if parts[0] == "layers":                     # stage i, block j -> 2 i + j + 1
            return 2 * int(parts[1]) + int(parts[3]) + 1
        return self.num_layers + 1


def test_layer_decay_follows_a_backbones_own_layer_ids():
    model = _Stages()
    opt = build_optimizer(model, "adamw", lr=LR, layer_decay=DECAY)
    groups = lr_of(opt)
    assert groups[id(model.stem.weight)]["lr"] == pytest.approx(LR * DECAY ** 5)
    assert groups[id(model.layers[0]["blocks"][1].weight)]["layer_id"] == 2
    assert groups[id(model.layers[1]["blocks"][1].weight)]["lr"] == pytest.approx(LR * DECAY)
    assert groups[id(model.blocks.weight)]["lr"] == pytest.approx(LR)


def test_layer_decay_is_refused_for_a_model_without_layers():
    with pytest.raises(ValueError, match="declares its layers.*optim.layer_decay=null"):
        build_optimizer(nn.Linear(2, 2), "adamw", layer_decay=DECAY)
    flat = _Stages()
    flat.num_layers = 0
    with pytest.raises(ValueError, match="num_layers=0.*optim.layer_decay=null"):
        build_optimizer(flat, "adamw", layer_decay=DECAY)


def test_group_lrs_follow_decay_powers(full_model):
    opt = build_optimizer(full_model, "adamw", lr=LR, weight_decay=0.05, layer_decay=DECAY)
    groups = lr_of(opt)
    for n, p in full_model.named_parameters():
        g = groups[id(p)]
        layer = expected_layer(n, 2)
        assert g["layer_id"] == layer, n
        assert g["lr"] == pytest.approx(LR * DECAY ** (3 - layer)), n
        assert g["lr_scale"] == pytest.approx(DECAY ** (3 - layer)), n
    assert groups[id(full_model.task.head.fc.weight)]["lr"] == pytest.approx(LR)
    assert groups[id(full_model.backbone.patch_embed.proj.weight)]["lr"] == pytest.approx(LR * DECAY ** 3)
    assert {g["group"] for g in opt.param_groups} >= {"decay_layer0", "no_decay_layer0", "decay_layer3"}


def test_no_decay_groups_keep_zero_weight_decay(model):
    exempt = no_weight_decay_names(model)
    opt = build_optimizer(model, "adamw", lr=LR, weight_decay=0.07, layer_decay=DECAY)
    groups = lr_of(opt)
    for n, p in model.named_parameters():
        assert groups[id(p)]["weight_decay"] == (0.0 if n in exempt else 0.07), n
        assert groups[id(p)]["group"].startswith("no_decay" if n in exempt else "decay"), n


def test_every_trainable_param_is_in_exactly_one_group(model):
    model.backbone.patch_embed.requires_grad_(False)
    groups = param_groups(model, 0.05, layer_decay=0.75)
    counts = Counter(id(p) for g in groups for p in g["params"])
    assert set(counts) == {id(p) for p in model.parameters() if p.requires_grad}
    assert max(counts.values()) == 1
    assert all(g["params"] for g in groups), "no empty groups"
    keys = [(g["layer_id"], g["weight_decay"]) for g in groups]
    assert len(keys) == len(set(keys))


def test_frozen_blocks_still_count_towards_the_depth(make_model):
    model = make_model()
    model.backbone.blocks[1].requires_grad_(False)
    opt = build_optimizer(model, "adamw", lr=LR, layer_decay=DECAY)
    assert lr_of(opt)[id(model.backbone.blocks[0].attn.qkv.weight)]["lr"] == pytest.approx(LR * DECAY ** 2)


def test_bare_backbone_uses_unprefixed_names(make_model):
    backbone = make_model().backbone
    opt = build_optimizer(backbone, "adamw", lr=LR, layer_decay=DECAY)
    groups = lr_of(opt)
    assert groups[id(backbone.pos_embed)]["lr"] == pytest.approx(LR * DECAY ** 3)
    assert groups[id(backbone.blocks[1].mlp.fc2.weight)]["lr"] == pytest.approx(LR * DECAY)
    assert groups[id(backbone.norm.weight)]["lr"] == pytest.approx(LR)


def test_scheduler_keeps_the_ratios_between_layers(full_model):
    opt = build_optimizer(full_model, "adamw", lr=LR, layer_decay=DECAY)
    sched = cosine_schedule(opt, total_steps=20, steps_per_epoch=5, warmup_steps=3)
    head = next(g for g in opt.param_groups if g["layer_id"] == 3)
    block0 = next(g for g in opt.param_groups if g["layer_id"] == 1)
    stem = next(g for g in opt.param_groups if g["layer_id"] == 0)
    seen = set()
    for _ in range(7):
        opt.step()
        sched.step()
        seen.add(round(head["lr"], 12))
        assert block0["lr"] / head["lr"] == pytest.approx(DECAY ** 2)
        assert stem["lr"] / head["lr"] == pytest.approx(DECAY ** 3)
    assert len(seen) >= 5, "the schedule moved the lr (warmup, then cosine)"


def test_sam_gets_the_layer_decay_groups(full_model):
    opt = build_optimizer(full_model, "sam", lr=LR, layer_decay=DECAY, rho=0.05)
    assert isinstance(opt, SAM)
    assert lr_of(opt)[id(full_model.backbone.cls_token)]["lr"] == pytest.approx(LR * DECAY ** 3)


def test_layer_decay_one_keeps_every_lr(full_model):
    opt = build_optimizer(full_model, "sgd", lr=0.1, layer_decay=1.0)
    assert all(g["lr"] == 0.1 for g in opt.param_groups)


def test_without_layer_decay_there_are_two_groups(full_model):
    groups = param_groups(full_model, 0.05)
    assert [g["group"] for g in groups] == ["decay", "no_decay"]
    assert all("lr_scale" not in g for g in groups)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, True])
def test_layer_decay_out_of_range_names_the_valid_range(bad):
    with pytest.raises(ValueError, match=r"layer_decay must be in \(0, 1\]"):
        build_optimizer(nn.Linear(2, 2), "adamw", layer_decay=bad)


def test_one_info_line_summarises_the_decay(full_model, caplog):
    with caplog.at_level(logging.INFO, logger="vitlab.optim.build"):
        build_optimizer(full_model, "adamw", lr=LR, layer_decay=DECAY)
    lines = [r.getMessage() for r in caplog.records if "layer-wise" in r.getMessage()]
    assert lines == ["layer-wise lr decay 0.5 over 4 layers: x0.125 (embeddings) ... x0.25 (block 0) ... "
                     "x0.5 (block 1) ... x1 (head)"]
