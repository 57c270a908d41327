"""DINO: the head, the centred/sharpened loss, the schedules, the EMA teacher, last-layer freezing and a short
training loop through the real multi-crop transform."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from vitlab.backbones import vit
from vitlab.data import DictDataset, Digits, MultiCropTransform
from vitlab.tasks import ClassificationTask
from vitlab.optim import build_optimizer
from vitlab.recipes import DINO, DINOHead, DINOLoss
from vitlab.recipes.dino import teacher_temperature

K = 64


def tiny_dino(**kwargs) -> DINO:
    torch.manual_seed(0)
    backbone = vit("Ti", patch_size=4, embed_dim=32, depth=2, num_heads=2, img_size=16, in_chans=1,
                   **kwargs.pop("backbone", {}))
    args = dict(out_dim=K, hidden_dim=32, bottleneck_dim=16, num_local_crops=2)
    args.update(kwargs)
    return DINO(backbone, ClassificationTask(32, 10), **args)


def crops(B: int = 4, n_local: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 1, 16, 16, generator=g) for _ in range(2)] + \
           [torch.randn(B, 1, 8, 8, generator=g) for _ in range(n_local)]


def step(r: DINO, batch: dict, opt: torch.optim.Optimizer, i: int, epoch: int) -> dict:
    """One optimizer step with the hooks in the order the Lightning module calls them."""
    out = r.training_step(batch)
    opt.zero_grad()
    out["loss"].backward()
    r.on_before_optimizer_step(i, epoch)
    opt.step()
    r.on_after_optimizer_step(i, epoch)
    return out


# --------------------------------------------------------------- loss ---

def test_loss_matches_a_hand_computation():
    """B=2, K=3, 2 global + 1 local view: mean over the 4 pairs (i, v != i) of -sum q_i log p_v."""
    loss_fn = DINOLoss(3, teacher_temp=0.5, warmup_teacher_temp=0.5, student_temp=0.2)
    loss_fn.center.copy_(torch.tensor([[0.1, -0.2, 0.3]]))
    t = [torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]), torch.tensor([[0.0, 2.0, 0.0], [-1.0, 0.0, 1.0]])]
    s = [torch.tensor([[0.3, 0.1, 0.0], [0.0, 0.2, 0.4]]), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
         torch.tensor([[0.2, 0.2, 0.6], [0.7, 0.1, 0.2]])]
    center = torch.tensor([0.1, -0.2, 0.3])
    terms = []
    for i in range(2):
        for v in range(3):
            if v == i:
                continue
            for b in range(2):
                q = torch.exp((t[i][b] - center) / 0.5)
                q = q / q.sum()
                z = s[v][b] / 0.2
                log_p = z - torch.log(torch.exp(z).sum())
                terms.append(-(q * log_p).sum())
    expected = torch.stack(terms).mean()                       # 4 pairs x 2 samples, all weighted equally
    torch.testing.assert_close(loss_fn(s, t, epoch=0), expected)
    # the concatenated form gives the same value
    torch.testing.assert_close(loss_fn(torch.cat(s), torch.cat(t), epoch=0), expected)
    # the loss itself never moves the centre
    torch.testing.assert_close(loss_fn.center, center[None])


def test_center_update_is_an_ema_of_the_batch_mean():
    loss_fn = DINOLoss(2, center_momentum=0.9)
    loss_fn.center.copy_(torch.tensor([[1.0, -1.0]]))
    t = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0], [-1.0, 2.0]])           # batch mean (2, 2)
    loss_fn.update_center(t)
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.9 * 1 + 0.1 * 2, 0.9 * -1 + 0.1 * 2]]))
    loss_fn.update_center([t[:2], t[2:]])                                          # the list form
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.9 * 1.1 + 0.2, 0.9 * -0.7 + 0.2]]))


def test_centering_and_temperature_shape_the_teacher_distribution():
    loss_fn = DINOLoss(3, teacher_temp=0.1, warmup_teacher_temp=0.1)
    t = torch.tensor([[1.0, 0.0, 0.5]])
    torch.testing.assert_close(loss_fn.teacher_log_probs(t, 0), F.log_softmax(t / 0.1, dim=-1))
    loss_fn.center.copy_(t)                                    # centring the only output away: uniform
    torch.testing.assert_close(loss_fn.teacher_log_probs(t, 0).exp(), torch.full((1, 3), 1 / 3))


def test_loss_is_float32_under_low_precision_inputs():
    loss_fn = DINOLoss(8)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(12, 8, generator=g).bfloat16()
    t = torch.randn(8, 8, generator=g).bfloat16()
    out = loss_fn(s, t, 0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, loss_fn(s.float(), t.float(), 0))


def test_loss_rejects_a_single_view():
    with pytest.raises(ValueError, match="two views"):
        DINOLoss(4)([torch.zeros(2, 4)], [torch.zeros(2, 4)], 0)


# ---------------------------------------------------------- schedules ---

def test_teacher_temperature_warms_up_linearly_then_stays():
    temps = [teacher_temperature(e, 0.07, 0.04, 4) for e in range(7)]
    assert temps == pytest.approx([0.04, 0.05, 0.06, 0.07, 0.07, 0.07, 0.07])   # np.linspace(0.04, 0.07, 4)
    assert [teacher_temperature(e, 0.04, 0.02, 0) for e in range(3)] == [0.04] * 3
    r = tiny_dino(teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=4)
    assert r.teacher_temp_at(2) == pytest.approx(0.06)


def test_momentum_schedule_is_cosine_from_its_base_to_one():
    r = tiny_dino(momentum_teacher=0.996)
    assert r.momentum_at(10) == 0.996                           # before setup_schedule: constant
    r.setup_schedule(total_steps=101, steps_per_epoch=10)
    assert r.momentum_at(0) == pytest.approx(0.996)
    assert r.momentum_at(100) == pytest.approx(1.0)
    assert r.momentum_at(50) == pytest.approx((0.996 + 1.0) / 2)
    assert r.momentum_at(25) == pytest.approx(1 - 0.004 * (1 + math.cos(math.pi / 4)) / 2)
    ms = [r.momentum_at(s) for s in range(101)]
    assert all(a <= b for a, b in zip(ms, ms[1:]))
    assert r.momentum_at(500) == pytest.approx(1.0)             # past the end: stays at 1


def test_the_epoch_comes_from_the_step_counter():
    r = tiny_dino(teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=3)
    r.setup_schedule(total_steps=30, steps_per_epoch=10)
    opt = torch.optim.SGD([p for p in r.parameters() if p.requires_grad], lr=0.0)      # schedules only
    batch = {"image": crops()}
    seen = []
    for i in range(25):
        out = step(r, batch, opt, i, i // 10)
        seen.append(out["teacher_temp"].item())
        assert out["momentum"].item() == pytest.approx(r.momentum_at(i))
    assert seen[:10] == pytest.approx([0.04] * 10) and seen[10:20] == pytest.approx([0.055] * 10)
    assert seen[20:] == pytest.approx([0.07] * 5)
    assert r.epoch == 2
    # the step counter travels in the state dict (resume continues the schedules where they were)
    r2 = tiny_dino(teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=3)
    r2.setup_schedule(total_steps=30, steps_per_epoch=10)
    r2.load_state_dict(r.state_dict())
    assert r2.epoch == 2 and r2.training_step(batch)["teacher_temp"].item() == pytest.approx(0.07)


# ---------------------------------------------------------------- EMA ---

def test_ema_update_is_exact():
    r = tiny_dino()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in list(r.teacher_backbone.parameters()) + list(r.teacher_head.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    t0 = {n: p.clone() for n, p in r.named_parameters() if n.startswith("teacher_")}
    s = {n: p.detach().clone() for n, p in r.named_parameters() if n.startswith(("backbone.", "head."))}
    r.update_teacher(0.9)
    for n, p in r.named_parameters():
        if n.startswith("teacher_"):
            student_name = n[len("teacher_"):]
            torch.testing.assert_close(p, 0.9 * t0[n] + 0.1 * s[student_name], rtol=0, atol=1e-6)
    assert len(t0) == len(s)


def test_teacher_starts_as_the_student_and_follows_it_with_the_scheduled_momentum():
    r = tiny_dino(momentum_teacher=0.9, freeze_last_layer_epochs=0)
    for (ns, ps), (nt, pt) in zip(r.backbone.named_parameters(), r.teacher_backbone.named_parameters()):
        assert ns == nt and torch.equal(ps, pt)
    r.setup_schedule(total_steps=5, steps_per_epoch=5)
    opt = torch.optim.SGD([p for p in r.parameters() if p.requires_grad], lr=0.5)
    out = r.training_step({"image": crops()})
    out["loss"].backward()
    r.on_before_optimizer_step(1, 0)
    teacher_before = copy.deepcopy(r.teacher_head.mlp[0].weight)
    opt.step()
    r.on_after_optimizer_step(1, 0)
    m = r.momentum_at(1)
    assert 0.9 < m < 1.0
    torch.testing.assert_close(r.teacher_head.mlp[0].weight, m * teacher_before + (1 - m) * r.head.mlp[0].weight)


def test_weights_loaded_after_construction_reach_the_teacher_before_training_only():
    """weights=... loads the student backbone after the recipe is built: setup_schedule (before the first step)
    copies it into the teacher; once steps were taken (a resumed run) the teacher is left alone."""
    r = tiny_dino()
    with torch.no_grad():
        r.backbone.pos_embed.add_(1.0)                          # "pretrained" weights loaded into the student
    assert not torch.equal(r.backbone.pos_embed, r.teacher_backbone.pos_embed)
    r.setup_schedule(total_steps=10, steps_per_epoch=5)
    assert torch.equal(r.backbone.pos_embed, r.teacher_backbone.pos_embed)
    r.on_after_optimizer_step(0, 0)
    with torch.no_grad():
        r.backbone.pos_embed.add_(1.0)
    r.setup_schedule(total_steps=10, steps_per_epoch=5)
    assert not torch.equal(r.backbone.pos_embed, r.teacher_backbone.pos_embed)


# ---------------------------------------------------- gradients / DDP ---

def test_a_training_step_gives_every_trainable_parameter_a_gradient_and_the_teacher_none():
    r = tiny_dino().train()
    out = r.training_step({"image": crops()})
    assert set(out) >= {"loss", "entropy", "teacher_temp", "momentum"}
    assert all(v.ndim == 0 for v in out.values())
    out["loss"].backward()
    trainable = {n: p for n, p in r.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("backbone.", "head.")) for n in trainable)
    missing = [n for n, p in trainable.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no gradient for {missing} (DDP needs one for every trainable parameter)"
    frozen = [n for n, p in r.named_parameters() if n.startswith(("teacher_", "task."))]
    assert frozen and all(not r.get_parameter(n).requires_grad and r.get_parameter(n).grad is None for n in frozen)
    # the weight-norm magnitude of the last layer is fixed (norm_last_layer)
    assert not r.head.last_layer.parametrizations.weight.original0.requires_grad


def test_teacher_stays_in_eval_mode_except_batchnorm_in_its_head():
    r = tiny_dino(use_bn_in_head=True, backbone=dict(drop_path_rate=0.5)).train()
    assert r.backbone.training and r.head.training
    assert not r.teacher_backbone.training and not r.teacher_backbone.blocks[1].drop_path1.training
    bns = [m for m in r.teacher_head.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert bns and all(m.training for m in bns)                 # DINO's teacher head uses batch statistics
    r.eval()
    assert not any(m.training for m in r.modules())
    # a step with BN in the head still reaches every trainable parameter
    r.train()
    r.training_step({"image": crops()})["loss"].backward()
    assert all(p.grad is not None for p in r.parameters() if p.requires_grad)


def test_last_layer_is_frozen_during_the_first_epochs_only():
    r = tiny_dino(freeze_last_layer_epochs=1)
    r.setup_schedule(total_steps=4, steps_per_epoch=2)
    opt = torch.optim.SGD([p for p in r.parameters() if p.requires_grad], lr=0.5)
    last = r.head.last_layer.parametrizations.weight.original1
    batch = {"image": crops()}
    w0 = last.detach().clone()
    for i in range(2):                                          # epoch 0
        step(r, batch, opt, i, epoch=0)
        assert torch.equal(last, w0)
    other = r.head.mlp[0].weight.detach().clone()
    out = r.training_step(batch)
    opt.zero_grad()
    out["loss"].backward()
    r.on_before_optimizer_step(2, epoch=1)
    assert last.grad is not None
    opt.step()
    assert not torch.equal(last, w0) and not torch.equal(r.head.mlp[0].weight, other)


def test_without_freezing_the_last_layer_learns_from_the_start():
    r = tiny_dino(freeze_last_layer_epochs=0)
    r.training_step({"image": crops()})["loss"].backward()
    r.on_before_optimizer_step(0, 0)
    assert r.head.last_layer.parametrizations.weight.original1.grad is not None


def test_norm_last_layer_false_trains_the_magnitude():
    r = tiny_dino(norm_last_layer=False)
    g = r.head.last_layer.parametrizations.weight.original0
    assert g.requires_grad and torch.equal(g, torch.ones_like(g))


# ------------------------------------------------------------ head ---

@pytest.mark.parametrize("layers", [1, 2, 3])
def test_head_shapes_and_unit_norm_prototypes(layers):
    torch.manual_seed(0)
    head = DINOHead(32, K, hidden_dim=24, bottleneck_dim=8, head_layers=layers)
    out = head(torch.randn(5, 32))
    assert out.shape == (5, K)
    w = head.last_layer.weight                                  # (K, bottleneck), rows of norm 1
    torch.testing.assert_close(w.norm(dim=1), torch.ones(K))
    assert out.abs().max() <= 1 + 1e-5                          # cosines of unit vectors
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in head.mlp.modules())
    assert n_linear == layers


# ----------------------------------------------------- wiring and eval ---

def test_a_single_tensor_batch_names_the_multicrop_transform():
    with pytest.raises(ValueError, match="recipe=dino needs its multi-crop transform"):
        tiny_dino().training_step({"image": torch.randn(2, 1, 16, 16)})


def test_train_transform_is_dinos_multicrop():
    r = tiny_dino(num_local_crops=3, global_crop_scale=(0.5, 1.0), local_crop_scale=(0.1, 0.5))
    t = r.train_transform(16, (0.3,), (0.4,), 1)
    assert isinstance(t, MultiCropTransform)
    assert (t.global_size, t.local_size, t.num_local, t.in_chans) == (16, 8, 3, 1)
    assert t.global_scale == (0.5, 1.0) and t.local_scale == (0.1, 0.5)
    assert r.local_size(224) == 96 and r.local_size(32) == 12 and r.local_size(4) == 4
    assert tiny_dino(local_crop_size=12).local_size(16) == 12
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        tiny_dino(local_crop_size=10)


def test_task_is_frozen_and_the_teacher_is_evaluated():
    r = tiny_dino()
    assert DINO.pretraining and r.monitor is None
    assert not any(p.requires_grad for p in r.task.parameters())
    assert r.eval_backbone() is r.teacher_backbone
    with torch.no_grad():
        r.teacher_backbone.cls_token.add_(1.0)                  # make teacher and student differ
    x = torch.randn(3, 1, 16, 16)
    r.eval()
    torch.testing.assert_close(r.features(x, "cls"), r.teacher_backbone(x)["cls"])
    assert not torch.allclose(r.features(x, "cls"), r.backbone(x)["cls"])


def test_evaluation_step_leaves_the_centre_alone():
    r = tiny_dino().eval()
    r.dino_loss.center.normal_()
    c = r.dino_loss.center.clone()
    x = torch.randn(3, 1, 16, 16)
    out = r.evaluation_step({"image": x, "label": torch.zeros(3, dtype=torch.long)})
    assert set(out) == {"loss"} and out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    q = r.dino_loss.teacher_log_probs(r.teacher_head(r.teacher_backbone(x)["pooled"]), 0).exp()
    log_p = F.log_softmax(r.head(r.backbone(x)["pooled"]) / 0.1, dim=-1)
    torch.testing.assert_close(out["loss"], -(q * log_p).sum(-1).mean())
    multi = r.evaluation_step({"image": crops()})
    assert torch.isfinite(multi["loss"])
    assert torch.equal(r.dino_loss.center, c)


def test_avg_pool_backbone_without_class_token_trains_every_parameter():
    r = tiny_dino(backbone=dict(class_token=False, global_pool="avg"), num_local_crops=0)
    r.training_step({"image": crops(n_local=0)})["loss"].backward()
    assert all(p.grad is not None for p in r.parameters() if p.requires_grad)


# --------------------------------------------------------- training ---

def test_student_learns_to_match_a_fixed_teacher():
    """Teacher frozen (momentum 1) and the centre settled on its outputs, so the targets are fixed: the KL
    from teacher to student (loss - teacher entropy) falls by a wide margin."""
    r = tiny_dino(momentum_teacher=1.0, freeze_last_layer_epochs=0, hidden_dim=64).train()
    tf = r.train_transform(16, Digits.mean, Digits.std, 1)
    ds = Digits().dataset("train")
    torch.manual_seed(0)
    views = [tf(ds[i][0]) for i in range(16)]
    batch = {"image": [torch.stack([v[j] for v in views]) for j in range(len(views[0]))]}
    teacher = copy.deepcopy(r.teacher_backbone.state_dict())
    with torch.no_grad():
        r.dino_loss.center.copy_(r.teacher_forward(batch["image"][:2]).mean(0, keepdim=True))
    opt = build_optimizer(r, "adamw", lr=3e-3, weight_decay=0.0)
    kl = []
    for i in range(25):
        out = step(r, batch, opt, i, 0)
        kl.append((out["loss"] - out["entropy"]).item())
    assert all(math.isfinite(x) for x in kl)
    assert kl[-1] < 0.4 * kl[0], kl
    assert all(torch.equal(v, r.teacher_backbone.state_dict()[k]) for k, v in teacher.items())


def test_a_short_run_on_digits_through_the_data_pipeline():
    """The real pipeline: DictDataset + MultiCropTransform + default collate, EMA teacher, epoch hooks, last-layer
    freezing in epoch 0. Finite losses, the logged schedules, the teacher following (and lagging) the student,
    and a teacher distribution that has neither collapsed to one prototype nor to uniform."""
    r = tiny_dino(momentum_teacher=0.99, hidden_dim=64, freeze_last_layer_epochs=1).train()
    ds = DictDataset(Digits().dataset("train"), r.train_transform(16, Digits.mean, Digits.std, 1))
    torch.manual_seed(0)
    loader = DataLoader(torch.utils.data.Subset(ds, range(64)), batch_size=16, shuffle=True, drop_last=True)
    epochs, per_epoch = 2, len(loader)
    r.setup_schedule(epochs * per_epoch, per_epoch)
    opt = build_optimizer(r, "adamw", lr=1e-3, weight_decay=0.04)
    last = r.head.last_layer.parametrizations.weight.original1
    w0 = last.detach().clone()
    teacher0 = r.teacher_backbone.blocks[0].attn.qkv.weight.detach().clone()
    i = 0
    for epoch in range(epochs):
        for batch in loader:
            assert [tuple(x.shape) for x in batch["image"]] == [(16, 1, 16, 16)] * 2 + [(16, 1, 8, 8)] * 2
            out = step(r, batch, opt, i, epoch)
            assert math.isfinite(out["loss"].item())
            assert out["momentum"].item() == pytest.approx(r.momentum_at(i))
            assert 0.01 < out["entropy"].item() < 0.99 * math.log(K)
            if epoch == 0:
                assert torch.equal(last, w0)
            i += 1
    assert not torch.equal(last, w0)
    tq, sq = r.teacher_backbone.blocks[0].attn.qkv.weight, r.backbone.blocks[0].attn.qkv.weight
    assert not torch.equal(tq, teacher0) and not torch.equal(tq, sq)
    assert r.momentum_at(i - 1) == pytest.approx(1.0)
