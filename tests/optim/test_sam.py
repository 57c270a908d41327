"""SAM / ASAM (vitlab.optim.sam): the update against a hand computation, the step sequence and its hooks, exact
restoration of the weights, checkpoints, schedulers, Lightning's optimizer wrapper and build_optimizer's sam."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from tests.conftest import REPO, SyncRecorder
from vitlab.optim import SAM, build_optimizer, cosine_schedule
from vitlab.optim.sam import NO_CLOSURE

# ------------------------------------------------------------ quadratic ---
# f(w) = 0.5 w^T A w - b^T w, grad f(w) = A w - b; float64 so the hand computation matches to rounding.
A = torch.tensor([[3.0, 0.5, 0.0], [0.5, 2.0, -0.3], [0.0, -0.3, 1.0]], dtype=torch.float64)
B = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
W0 = torch.tensor([0.7, -1.3, 2.1], dtype=torch.float64)


def grad_f(w: torch.Tensor) -> torch.Tensor:
    return A @ w - B


def quadratic_problem(lr: float, rho: float, adaptive: bool = False, base_cls=torch.optim.SGD):
    w = nn.Parameter(W0.clone())
    sam = SAM(base_cls([w], lr=lr), rho=rho, adaptive=adaptive)
    calls = []

    def closure():
        calls.append(w.detach().clone())
        sam.zero_grad()
        loss = 0.5 * w @ A @ w - B @ w
        loss.backward()
        return loss.detach()

    return w, sam, closure, calls


def test_sam_step_matches_the_hand_computation():
    lr, rho = 0.1, 0.05
    w, sam, closure, calls = quadratic_problem(lr, rho)
    loss = sam.step(closure)
    g = grad_f(W0)
    e = rho * g / g.norm()
    expected = W0 - lr * grad_f(W0 + e)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-12)
    assert len(calls) == 2, "the closure runs twice: at w and at w + e_w"
    torch.testing.assert_close(calls[0], W0, rtol=0, atol=0)
    torch.testing.assert_close(calls[1], W0 + e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, 0.5 * W0 @ A @ W0 - B @ W0, msg="step returns the first pass's loss")
    # and it differs from plain SGD's step: the gradient is taken at the perturbed point
    assert not torch.allclose(w.detach(), W0 - lr * g)


def test_asam_step_matches_the_hand_computation():
    lr, rho = 0.1, 0.5
    w, sam, closure, calls = quadratic_problem(lr, rho, adaptive=True)
    sam.step(closure)
    g = grad_f(W0)
    e = rho * W0 ** 2 * g / (W0.abs() * g).norm()           # davda54/sam's ASAM: T_w = |w|
    torch.testing.assert_close(calls[1], W0 + e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.detach(), W0 - lr * grad_f(W0 + e), rtol=1e-12, atol=1e-12)


def test_grad_norm_is_float32_for_low_precision_grads():
    p = nn.Parameter(torch.full((4,), 300.0, dtype=torch.bfloat16))
    p.grad = torch.full((4,), 300.0, dtype=torch.bfloat16)
    sam = SAM(torch.optim.SGD([p], lr=0.1))
    norm = sam.grad_norm([p])
    assert norm.dtype == torch.float32 and norm.ndim == 0
    torch.testing.assert_close(norm, torch.tensor(600.0))


# ---------------------------------------------------- exact restoration ---

class SpySGD(torch.optim.SGD):
    """SGD that records the weights it sees when its step starts."""

    def step(self, closure=None):
        self.seen = [p.detach().clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


def test_weights_are_restored_bit_for_bit_before_the_base_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1))
    with torch.no_grad():
        model[0].weight[:2].mul_(1e-4)                       # weights far smaller than e_w: w + e - e != w there
    frozen_bias = model[2].bias
    frozen_bias.requires_grad_(False)                          # no gradient: stays put (e_w = 0)
    before = [p.detach().clone() for p in model.parameters()]
    base = SpySGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    sam = SAM(base, rho=0.3)
    x, y = torch.randn(8, 5), torch.randn(8, 1)
    perturbed = []

    def closure():
        if sam.second_pass:
            perturbed.extend(p.detach().clone() for p in model.parameters())
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    sam.step(closure)
    trainable = [b for b, p in zip(before, model.parameters()) if p.requires_grad]
    for seen, orig in zip(base.seen, trainable):
        assert torch.equal(seen, orig), "the base optimizer must step from the original weights"
    assert not torch.equal(perturbed[0], before[0]), "the second pass runs at the perturbed weights"
    assert torch.equal(perturbed[3], before[3]), "a parameter without a gradient is not perturbed"


def test_first_and_second_step_alone_restore_exactly_with_a_zero_lr():
    torch.manual_seed(1)
    params = [nn.Parameter(torch.randn(13, 7) * 3.1), nn.Parameter(torch.randn(5) * 1e-3)]
    before = [p.detach().clone() for p in params]
    for adaptive in (False, True):
        sam = SAM(torch.optim.SGD(params, lr=0.0), rho=0.5, adaptive=adaptive)
        for p in params:
            p.grad = torch.randn_like(p)
        sam.first_step()
        if not adaptive:
            e_w = [p.detach() - b for p, b in zip(params, before)]
        assert all(not torch.equal(p, b) for p, b in zip(params, before))
        sam.second_step()
        assert all(torch.equal(p, b) for p, b in zip(params, before))
    # why SAM keeps a copy of w: subtracting SAM's perturbation again does not give small weights back exactly
    assert not torch.equal((before[1] + e_w[1]) - e_w[1], before[1])


# ---------------------------------------------------------------- hooks ---

def test_step_sequence_context_prelude_and_second_pass_flag():
    w = nn.Parameter(W0.clone())
    sam = SAM(torch.optim.SGD([w], lr=0.1), rho=0.05)
    events = []

    @contextlib.contextmanager
    def no_sync():
        events.append("enter")
        yield
        events.append("exit")

    def closure():
        events.append(f"closure(second_pass={sam.second_pass}, grad={w.grad is not None})")
        (0.5 * w @ A @ w - B @ w).backward()
        return torch.zeros(())

    sam.first_pass_context = no_sync
    sam.second_pass_prelude = lambda: events.append(f"prelude(second_pass={sam.second_pass})")
    sam.step(closure)
    # the grads are zeroed (set to None) between the passes: the second closure starts from none
    assert events == ["enter", "closure(second_pass=False, grad=False)", "exit", "prelude(second_pass=False)",
                      "closure(second_pass=True, grad=False)"]
    assert sam.second_pass is False


def test_second_pass_flag_is_reset_when_the_closure_raises():
    w = nn.Parameter(W0.clone())
    sam = SAM(torch.optim.SGD([w], lr=0.1))

    def closure():
        if sam.second_pass:
            raise KeyError("boom")
        (w ** 2).sum().backward()

    with pytest.raises(KeyError):
        sam.step(closure)
    assert sam.second_pass is False


def test_step_without_a_closure_names_the_fix():
    w = nn.Parameter(W0.clone())
    sam = SAM(torch.optim.SGD([w], lr=0.1))
    with pytest.raises(RuntimeError, match="needs a closure") as e:
        sam.step()
    assert str(e.value) == NO_CLOSURE
    assert "bf16-mixed" in NO_CLOSURE and "fp16-mixed" in NO_CLOSURE


def test_fp16_grad_scaler_step_gets_the_error():
    """fp16-mixed: Lightning's GradScaler runs the closure itself and calls step() without one."""
    model = nn.Linear(3, 2)
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(4, 3)).sum()).backward()
    with pytest.raises(RuntimeError, match="use trainer.precision=bf16-mixed or 32-true"):
        scaler.step(sam)


def test_hooks_set_on_lightnings_optimizer_wrapper_reach_sam():
    """Lightning hands the module a LightningOptimizer that forwards attribute reads only: the hooks and the
    parameter groups must still be SAM's own."""
    from pytorch_lightning.core.optimizer import LightningOptimizer

    w = nn.Parameter(W0.clone())
    sam = SAM(torch.optim.SGD([w], lr=0.1))
    wrapped = LightningOptimizer(sam)
    marker = contextlib.nullcontext
    wrapped.first_pass_context = marker
    wrapped.second_pass_prelude = print
    assert sam.first_pass_context is marker and sam.second_pass_prelude is print
    sam.second_pass = True
    assert wrapped.second_pass is True
    assert wrapped.param_groups is sam.base.param_groups
    assert isinstance(wrapped, SAM) and wrapped.defaults is sam.base.defaults


def test_step_reads_nothing_back_from_the_device():
    """No .item(), bool(tensor) or data-dependent shapes in first_step / second_step (SGD base: no step counter)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    for adaptive in (False, True):
        sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.1, adaptive=adaptive)
        x = torch.randn(5, 4)

        def closure(x=x):
            loss = model(x).square().mean()
            loss.backward()
            return loss

        with SyncRecorder() as spy:
            sam.step(closure)
        assert spy.seen == []


# ----------------------------------------------------------- base kinds ---

def test_fused_adamw_base_on_cpu_takes_the_same_steps_as_foreach():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [build_optimizer(m, "sam", lr=1e-2, weight_decay=0.05, fused=f, rho=0.1)
            for m, f in zip(models, (True, False))]
    assert opts[0].defaults["fused"] is True and not opts[1].defaults["fused"]
    assert type(opts[0].base) is torch.optim.AdamW
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(3):
        for m, opt in zip(models, opts):
            def closure(m=m):
                loss = nn.functional.cross_entropy(m(x), y)
                loss.backward()
                return loss
            opt.step(closure)
            opt.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-5)


def test_sgd_base_gets_momentum_and_nesterov():
    model = nn.Linear(3, 2)
    opt = build_optimizer(model, "sam", base="sgd", lr=0.2, momentum=0.8, nesterov=True, rho=0.1, adaptive=True)
    assert isinstance(opt, SAM) and type(opt.base) is torch.optim.SGD
    assert opt.rho == 0.1 and opt.adaptive is True
    for g in opt.param_groups:
        assert g["lr"] == 0.2 and g["momentum"] == 0.8 and g["nesterov"] is True
    text = repr(opt)
    assert "rho=0.1" in text and "adaptive=True" in text and "SGD" in text


@pytest.mark.parametrize("kwargs, match", [
    ({"base": "adam"}, "choose adamw or sgd"),
    ({"rho": 0.0}, "rho must be > 0"),
    ({"rho": -0.1}, "rho must be > 0"),
])
def test_build_optimizer_validates_sam_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_optimizer(nn.Linear(2, 2), "sam", **kwargs)


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(ValueError, match="choose adamw, sgd or sam"):
        build_optimizer(nn.Linear(2, 2), "lamb")


def test_sam_yaml_instantiates_sam_around_adamw():
    cfg = OmegaConf.load(REPO / "conf" / "optim" / "sam.yaml")
    assert cfg.rho == 0.05 and cfg.adaptive is False and cfg.layer_decay is None
    factory = instantiate(cfg, lr=1e-3, _convert_="all")
    opt = factory(nn.Linear(4, 2))
    assert isinstance(opt, SAM) and type(opt.base) is torch.optim.AdamW
    assert all(g["lr"] == 1e-3 for g in opt.param_groups)


# ------------------------------------------------ schedules, checkpoints ---

def test_lambda_lr_on_sam_changes_the_base_lr():
    model = nn.Linear(3, 2)
    sam = build_optimizer(model, "sam", lr=0.5, weight_decay=0.0)
    assert sam.param_groups is sam.base.param_groups
    sched = cosine_schedule(sam, total_steps=10, steps_per_epoch=5, warmup_steps=2)
    assert sam.base.param_groups[0]["lr"] == pytest.approx(0.25)          # warmup step 0: lr / 2
    x = torch.randn(4, 3)
    for _ in range(4):
        sam.step(lambda: model(x).square().mean().backward())
        sched.step()
    lrs = [g["lr"] for g in sam.base.param_groups]
    assert lrs[0] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 2 / 8)))     # cosine, 2 of 8 steps
    assert sched.get_last_lr() == lrs


def train_steps(model: nn.Module, opt: SAM, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)

        def closure(x=x, y=y):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
        opt.zero_grad()


def test_state_dict_round_trip_resumes_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = build_optimizer(model, "sam", lr=1e-2, rho=0.1)
    sched = cosine_schedule(opt, total_steps=20, steps_per_epoch=5, warmup_steps=3)
    train_steps(model, opt, 3, seed=1)
    for _ in range(3):
        sched.step()
    # the checkpoint is the base optimizer's: a plain AdamW can load it and so can SAM
    sd = copy.deepcopy(opt.state_dict())
    assert set(sd) == {"state", "param_groups"} and sd["state"][0]["exp_avg"].shape == (8, 4)
    model_sd, sched_sd = copy.deepcopy(model.state_dict()), copy.deepcopy(sched.state_dict())

    resumed = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    resumed.load_state_dict(model_sd)
    opt2 = build_optimizer(resumed, "sam", lr=1e-2, rho=0.1)
    sched2 = cosine_schedule(opt2, total_steps=20, steps_per_epoch=5, warmup_steps=3)
    opt2.load_state_dict(sd)
    sched2.load_state_dict(sched_sd)
    assert opt2.param_groups is opt2.base.param_groups, "base.load_state_dict replaced the groups list"
    for a, b in zip(opt.base.state.values(), opt2.base.state.values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    for s, o, m in ((sched, opt, model), (sched2, opt2, resumed)):
        train_steps(m, o, 2, seed=2)
        s.step()
    assert opt2.base.param_groups[0]["lr"] == opt.base.param_groups[0]["lr"] != 1e-2
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    plain = build_optimizer(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)), "adamw", lr=1e-2)
    plain.load_state_dict(opt.state_dict())                    # a SAM checkpoint resumes without SAM too
    assert torch.equal(plain.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_deepcopy_keeps_the_base_and_its_groups():
    model = nn.Linear(3, 2)
    sam = build_optimizer(model, "sam", lr=0.3, rho=0.2)
    clone = copy.deepcopy(sam)
    assert isinstance(clone.base, torch.optim.AdamW) and clone.rho == 0.2
    assert clone.param_groups is clone.base.param_groups and clone.param_groups[0]["lr"] == 0.3
    assert clone.base is not sam.base


def test_zero_grad_delegates_to_the_base():
    model = nn.Linear(3, 2)
    sam = build_optimizer(model, "sam")
    model(torch.randn(2, 3)).sum().backward()
    sam.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------- training ---

@pytest.mark.parametrize("adaptive, rho", [(False, 0.05), (True, 0.5)])
def test_tiny_classifier_trains_with_sam(adaptive, rho):
    torch.manual_seed(0)
    centers = torch.randn(3, 8) * 2
    y = torch.arange(60) % 3
    x = centers[y] + 0.5 * torch.randn(60, 8)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = build_optimizer(model, "sam", lr=2e-2, weight_decay=0.0, rho=rho, adaptive=adaptive)

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach()

    losses = []
    for _ in range(40):
        losses.append(opt.step(closure))
        opt.zero_grad()
    assert losses[-1] < 0.25 * losses[0]
    assert (model(x).argmax(1) == y).float().mean() > 0.9
