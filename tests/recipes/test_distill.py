"""Knowledge distillation: the two losses against hand computation, load_timm_teacher, and the Distill recipe
(DeiT's distillation token and plain KD): the frozen, lazily loaded, unregistered teacher; the losses it
composes; DeiT's averaged inference; clear errors; no host syncs; and a student that learns to agree."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import SyncRecorder
from vitlab.backbones import vit
from vitlab.tasks import ClassificationTask, soft_target_cross_entropy
from vitlab.optim import build_optimizer
from vitlab.recipes import Distill, hard_distillation_loss, load_timm_teacher, soft_distillation_loss

C, IMG, B = 5, 16, 8


# ------------------------------------------------------------------ losses ---

S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]          # student logits, 2 samples x 3 classes
T = [[2.0, 0.0, 1.0], [0.5, 0.5, 2.5]]          # teacher logits


def _softmax(row: list[float], tau: float) -> list[float]:
    e = [math.exp(v / tau) for v in row]
    return [v / sum(e) for v in e]


def _kl_by_hand(tau: float) -> float:
    """sum over samples of KL(softmax(t / tau) || softmax(s / tau)), with Python floats."""
    total = 0.0
    for s, t in zip(S, T):
        ps, pt = _softmax(s, tau), _softmax(t, tau)
        total += sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))
    return total


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_soft_loss_matches_hand_computation(tau):
    s, t = torch.tensor(S), torch.tensor(T)
    batchmean = soft_distillation_loss(s, t, tau)
    assert batchmean.item() == pytest.approx(_kl_by_hand(tau) * tau ** 2 / 2, rel=1e-5)      # / B
    numel = soft_distillation_loss(s, t, tau, reduction="numel")
    assert numel.item() == pytest.approx(_kl_by_hand(tau) * tau ** 2 / 6, rel=1e-5)          # / (B x C), DeiT's


def test_soft_loss_tau_scaling_and_zero_at_agreement():
    s, t = torch.tensor(S), torch.tensor(T)
    # tau^2 in front: without it the loss at tau=4 would be 16x smaller than what it returns
    kl4 = F.kl_div(F.log_softmax(s / 4, -1), F.log_softmax(t / 4, -1), reduction="batchmean", log_target=True)
    assert soft_distillation_loss(s, t, 4.0).item() == pytest.approx(16 * kl4.item(), rel=1e-5)
    assert soft_distillation_loss(t, t, 3.0).abs().item() < 1e-6
    assert soft_distillation_loss(t + 7.0, t, 1.0).abs().item() < 1e-6        # softmax ignores a shift
    assert soft_distillation_loss(s, t, 1.0).item() > 0.01
    with pytest.raises(ValueError, match="batchmean or numel"):
        soft_distillation_loss(s, t, 1.0, reduction="mean")


def test_hard_loss_is_ce_with_the_teachers_argmax():
    s, t = torch.tensor(S), torch.tensor(T)
    by_hand = -(math.log(_softmax(S[0], 1.0)[0]) + math.log(_softmax(S[1], 1.0)[2])) / 2      # argmax t: 0, 2
    assert hard_distillation_loss(s, t).item() == pytest.approx(by_hand, rel=1e-5)
    torch.testing.assert_close(hard_distillation_loss(s, t), F.cross_entropy(s, t.argmax(-1)))


def test_losses_are_float32():
    s, t = torch.tensor(S).bfloat16(), torch.tensor(T).bfloat16()
    assert soft_distillation_loss(s, t, 2.0).dtype == torch.float32
    assert hard_distillation_loss(s, t).dtype == torch.float32


# ------------------------------------------------------------ the teacher ---

class LinearTeacher(torch.nn.Module):
    """A fixed random classifier over the flattened pixels (images -> logits); records what it sees."""

    def __init__(self, in_chans: int = 1, img: int = IMG, seed: int = 1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc = torch.nn.Linear(in_chans * img * img, C)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(C, in_chans * img * img, generator=g) * 0.2)
            self.fc.bias.zero_()
        self.seen: list[torch.Size] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.shape)
        return self.fc(x.flatten(1))


class Factory:
    """A zero-argument teacher factory that counts its calls."""

    def __init__(self, **kw):
        self.kw, self.calls = kw, 0

    def __call__(self) -> torch.nn.Module:
        self.calls += 1
        return LinearTeacher(**self.kw)


def student(distill_token: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    return vit("Ti", patch_size=4, embed_dim=32, depth=2, num_heads=2, img_size=IMG, in_chans=1,
               **Distill.backbone_options({"distill_token": distill_token}))


def make(distill_token: bool = True, factory=None, **kw) -> Distill:
    backbone = student(distill_token)
    kw.setdefault("teacher", "teacher.ckpt")
    return Distill(backbone, ClassificationTask(32, C), distill_token=distill_token,
                   teacher_factory=factory if factory is not None else Factory(), **kw)


@pytest.fixture
def batch() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(B, 1, IMG, IMG, generator=g), "label": torch.randint(0, C, (B,), generator=g)}


def test_backbone_options():
    assert Distill.backbone_options({}) == {"distill_token": True}
    assert Distill.backbone_options({"distill_token": True, "teacher": "x"}) == {"distill_token": True}
    assert Distill.backbone_options({"distill_token": False}) == {}
    assert student().num_prefix_tokens == 2 and student(False).num_prefix_tokens == 1


def test_teacher_is_lazy_frozen_and_unregistered(batch):
    factory = Factory()
    r = make(factory=factory)
    own_params = {id(p) for p in r.parameters()}
    keys = set(r.state_dict())
    with torch.no_grad():                                      # building, forward and evaluating: no teacher
        r.eval()
        r(batch["image"])
        r.evaluation_step(batch)
    assert factory.calls == 0 and r.teacher is None
    r.train()
    r.training_step(batch)["loss"].backward()
    r.training_step(batch)
    assert factory.calls == 1                                  # built once, on the first training step
    teacher = r.teacher
    assert teacher is not None and not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())   # no grad reaches it
    assert {id(p) for p in r.parameters()} == own_params       # not in parameters(), so not in the optimizer / DDP
    assert set(r.state_dict()) == keys and not any("teacher" in k or k.startswith("fc.") for k in keys)
    assert all(m is not teacher for m in r.modules())
    r.train()
    assert not teacher.training                                # recipe.train() leaves it in eval mode
    r.eval().train(True)
    assert not teacher.training
    assert "dist_head.weight" in keys                           # the distillation head is the student's


def test_hard_token_loss_composition(batch):
    r = make(alpha=0.3).eval()                                 # eval: no dropout, so the pieces can be recomputed
    out = r.training_step(batch)
    f = r.backbone(batch["image"])
    cls_logits, dist_logits = r.task(f), r.dist_head(f["dist"])
    t = r.teacher(batch["image"])
    base = F.cross_entropy(cls_logits, batch["label"])
    kd = F.cross_entropy(dist_logits, t.argmax(-1))
    torch.testing.assert_close(out["loss"], 0.7 * base + 0.3 * kd)
    torch.testing.assert_close(out["loss_base"], base)
    torch.testing.assert_close(out["loss_distill"], kd)
    avg = (cls_logits + dist_logits) / 2
    torch.testing.assert_close(out["preds"], avg)
    assert not out["preds"].requires_grad and torch.equal(out["target"], batch["label"])
    agree = (avg.argmax(-1) == t.argmax(-1)).float().mean()
    assert out["teacher_agreement"].ndim == 0 and out["teacher_agreement"] == agree
    for k in ("loss", "loss_base", "loss_distill", "teacher_agreement"):
        assert out[k].ndim == 0, k


def test_soft_token_loss_uses_deits_reduction(batch):
    r = make(kind="soft", tau=3.0).eval()
    out = r.training_step(batch)
    f = r.backbone(batch["image"])
    t = r.teacher(batch["image"])
    kd = soft_distillation_loss(r.dist_head(f["dist"]), t, 3.0, reduction="numel")
    torch.testing.assert_close(out["loss_distill"], kd)
    torch.testing.assert_close(out["loss"], 0.5 * F.cross_entropy(r.task(f), batch["label"]) + 0.5 * kd)
    r2 = make(kind="soft", tau=3.0, soft_reduction="batchmean").eval()
    torch.testing.assert_close(r2.training_step(batch)["loss_distill"], kd * C)


def test_plain_kd_without_token(batch):
    r = make(distill_token=False, kind="soft", tau=2.0, alpha=0.9).eval()
    assert r.dist_head is None and not any(k.startswith("dist_head") for k in r.state_dict())
    out = r.training_step(batch)
    logits = r.task(r.backbone(batch["image"]))
    t = r.teacher(batch["image"])
    kd = soft_distillation_loss(logits, t, 2.0, reduction="batchmean")              # Hinton's
    torch.testing.assert_close(out["loss"], 0.1 * F.cross_entropy(logits, batch["label"]) + 0.9 * kd)
    torch.testing.assert_close(out["preds"], logits)
    torch.testing.assert_close(r(batch["image"]), logits)
    hard = make(distill_token=False).eval().training_step(batch)
    torch.testing.assert_close(hard["loss_distill"], F.cross_entropy(logits, t.argmax(-1)))


def test_mixup_targets(batch):
    r = make().eval()
    soft = torch.softmax(torch.randn(B, C, generator=torch.Generator().manual_seed(2)), -1)
    out = r.training_step({"image": batch["image"], "label": soft})
    assert "target" not in out
    f = r.backbone(batch["image"])
    torch.testing.assert_close(out["loss_base"], soft_target_cross_entropy(r.task(f), soft))


def test_evaluation_averages_both_heads_and_needs_no_teacher(batch):
    factory = Factory()
    r = make(factory=factory).eval()
    with torch.no_grad():
        out = r.evaluation_step(batch)
        f = r.backbone(batch["image"])
        avg = (r.task(f) + r.dist_head(f["dist"])) / 2
    torch.testing.assert_close(out["preds"], avg)
    torch.testing.assert_close(r(batch["image"]).detach(), avg)
    torch.testing.assert_close(out["loss"], F.cross_entropy(avg, batch["label"]))
    assert torch.equal(out["target"], batch["label"]) and factory.calls == 0


@pytest.mark.parametrize("alpha, frozen", [(0.5, None), (0.0, "dist_head"), (1.0, "task")])
def test_every_trainable_parameter_gets_a_gradient(batch, alpha, frozen):
    """DDP runs without find_unused_parameters: what the loss never reads is frozen."""
    r = make(alpha=alpha).train()
    r.training_step(batch)["loss"].backward()
    for name, p in r.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
        else:
            assert frozen is not None and name.startswith(frozen + "."), name
    if frozen:
        assert not any(p.requires_grad for p in getattr(r, frozen).parameters())


def test_teacher_img_size_resizes_for_the_teacher(batch):
    factory = Factory(img=24)
    r = make(factory=factory, teacher_img_size=24)
    r.training_step(batch)
    assert r.teacher.seen[-1] == (B, 1, 24, 24)
    x = F.interpolate(batch["image"], size=(24, 24), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(r.teacher_logits(batch["image"]), r.teacher.fc(x.flatten(1)))


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_training_step_makes_no_host_sync(batch, kind):
    r = make(kind=kind).train()
    r.training_step(batch)                                     # the first step loads the teacher
    with SyncRecorder() as rec:
        r.training_step(batch)["loss"].backward()
    assert rec.seen == []


# ----------------------------------------------------------------- errors ---

def test_no_teacher_names_the_fix():
    with pytest.raises(ValueError, match=r"recipe\.teacher=PATH"):
        Distill(student(), ClassificationTask(32, C))


def test_backbone_without_distillation_token_names_the_fix():
    with pytest.raises(ValueError, match="no distillation token.*distill_token=True"):
        Distill(student(distill_token=False), ClassificationTask(32, C), teacher="t.ckpt")


def test_backbone_without_dist_feature_names_the_fix(batch):
    from vitlab.backbones.base import Backbone

    class NoDist(Backbone):                                     # some other backbone: no distillation token
        def __init__(self, claims_token: bool):
            super().__init__()
            self.embed_dim, self.has_dist_token = 32, claims_token
            self.inner = student(distill_token=False)

        def forward(self, x):
            return self.inner(x)                                # no "dist" feature

    with pytest.raises(ValueError, match="no distillation token.*distill_token=True"):
        Distill(NoDist(False), ClassificationTask(32, C), teacher="t.ckpt", teacher_factory=Factory())
    r = Distill(NoDist(True), ClassificationTask(32, C), teacher="t.ckpt", teacher_factory=Factory())
    with pytest.raises(ValueError, match="no distillation token.*distill_token=True"):
        r.training_step(batch)                                  # declared, but its features lack it


def test_timm_file_without_teacher_model_names_the_fix(batch):
    r = Distill(student(), ClassificationTask(32, C), teacher="weights.pth")        # builds: evaluation is fine
    with pytest.raises(ValueError, match=r"recipe\.teacher_model=<timm name>"):
        r.training_step(batch)


def test_unknown_teacher_model_fails_at_build():
    with pytest.raises(ValueError, match="unknown timm model 'resnet_five'.*close matches"):
        Distill(student(), ClassificationTask(32, C), teacher="w.pth", teacher_model="resnet_five")


def test_bad_options():
    for kw, msg in [({"kind": "medium"}, "soft or hard"), ({"alpha": 1.5}, "alpha"), ({"tau": 0.0}, "tau"),
                    ({"soft_reduction": "sum"}, "soft_reduction")]:
        with pytest.raises(ValueError, match=msg):
            make(**kw)


def test_teacher_with_other_classes_is_refused(batch):
    class Wide(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :C + 2]

    r = make(factory=lambda: torch.nn.Sequential(Wide()))
    with pytest.raises(ValueError, match=f"teacher predicts {C + 2} classes"):
        r.training_step(batch)


# ------------------------------------------------------ load_timm_teacher ---

TIMM_NAME = "test_resnet"                                       # timm's tiny test ResNet: 0.4M params, any size


@pytest.fixture(scope="module")
def timm_teacher():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(TIMM_NAME, pretrained=False, num_classes=C, in_chans=1).eval()


@pytest.mark.parametrize("fmt", ["pth", "state_dict", "model", "safetensors"])
def test_load_timm_teacher_formats(tmp_path, timm_teacher, fmt, batch):
    sd = timm_teacher.state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "t.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "t.pth"
        torch.save(sd if fmt == "pth" else {fmt: sd, "epoch": 3}, path)
    t = load_timm_teacher(str(path), TIMM_NAME, num_classes=C, in_chans=1)
    assert not t.training
    with torch.no_grad():
        torch.testing.assert_close(t(batch["image"]), timm_teacher(batch["image"]))


def test_load_timm_teacher_errors(tmp_path, timm_teacher):
    with pytest.raises(FileNotFoundError, match="recipe.teacher"):
        load_timm_teacher(str(tmp_path / "missing.pth"), TIMM_NAME, C, 1)
    path = tmp_path / "t.pth"
    torch.save(timm_teacher.state_dict(), path)
    with pytest.raises(ValueError, match="unknown timm model 'test_resnett'.*test_resnet"):
        load_timm_teacher(str(path), "test_resnett", C, 1)
    with pytest.raises(ValueError, match="num_classes=7.*trained on this dataset's classes"):
        load_timm_teacher(str(path), TIMM_NAME, 7, 1)
    with pytest.raises(ValueError, match=r"recipe\.teacher_model='test_vit'"):
        load_timm_teacher(str(path), "test_vit", C, 1)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="no state dict"):
        load_timm_teacher(str(tmp_path / "list.pth"), TIMM_NAME, C, 1)


def test_distill_loads_a_timm_teacher_from_a_file(tmp_path, timm_teacher, batch):
    path = tmp_path / "t.pth"
    torch.save(timm_teacher.state_dict(), path)
    r = Distill(student(), ClassificationTask(32, C), teacher=str(path), teacher_model=TIMM_NAME)
    out = r.training_step(batch)
    assert torch.isfinite(out["loss"])
    with torch.no_grad():
        torch.testing.assert_close(r.teacher_logits(batch["image"]), timm_teacher(batch["image"]))
    assert not r.teacher.training and not any(p.requires_grad for p in r.teacher.parameters())


# --------------------------------------------------------------- learning ---

@pytest.mark.parametrize("distill_token, kind, alpha", [(True, "hard", 0.5), (False, "soft", 0.9)],
                         ids=["deit-hard", "kd-soft"])
def test_student_learns_to_agree_with_the_teacher(distill_token, kind, alpha):
    """A fixed batch whose labels are the teacher's on 3/4 of the images and random on the rest: DeiT's hard
    distillation (DeiT's alpha) and plain soft KD (Hinton's large alpha) drive the student's agreement with the
    teacher up, beyond what the labels alone would teach."""
    g = torch.Generator().manual_seed(5)
    images = torch.randn(32, 1, IMG, IMG, generator=g)
    with torch.no_grad():
        teacher_labels = LinearTeacher()(images).argmax(-1)
    labels = torch.where(torch.arange(32) % 4 == 0, torch.randint(0, C, (32,), generator=g), teacher_labels)
    label_agreement = (labels == teacher_labels).float().mean().item()
    batch = {"image": images, "label": labels}
    r = make(distill_token=distill_token, kind=kind, tau=2.0, alpha=alpha).train()
    opt = build_optimizer(r, "adamw", lr=3e-3, weight_decay=0.0)
    agreement = []
    for _ in range(40):
        out = r.training_step(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        agreement.append(out["teacher_agreement"].item())
    late = sum(agreement[-5:]) / 5
    assert agreement[0] < 0.4 and late >= 0.85 and late > label_agreement, (label_agreement, agreement)
