"""build_optimizer / param_groups / no_weight_decay_names on a tiny vitlab ViT + classification task."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from vitlab.layers import LayerScale
from vitlab.optim import build_optimizer, no_weight_decay_names, param_groups

TOKEN_NAMES = {"pos_embed", "cls_token", "reg_token", "mask_token"}
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def expected_split(model: nn.Module) -> tuple[set[str], set[str]]:
    """(decayed names, exempt names) worked out from module types, independently of vitlab.optim.

    Every parameter must fall in one of the known kinds; an unknown kind fails the test so that a new
    layer type forces a decision about its weight decay.
    """
    decay, exempt = set(), set()
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if isinstance(module, NORMS) or isinstance(module, LayerScale) or pname == "bias" or pname in TOKEN_NAMES:
                exempt.add(full)
            elif isinstance(module, (nn.Linear, nn.Conv2d)) and pname == "weight":
                decay.add(full)
            else:
                raise AssertionError(f"parameter {full} of {type(module).__name__} is of no known kind")
    return decay, exempt


def names_of(model: nn.Module, params) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


def group_by_decay(opt: torch.optim.Optimizer, model: nn.Module) -> dict[float, list[str]]:
    out: dict[float, list[str]] = {}
    for g in opt.param_groups:
        out.setdefault(g["weight_decay"], []).extend(names_of(model, g["params"]))
    return out


# ------------------------------------------------------------ exemptions ---

def test_model_has_every_exempt_kind(full_model):
    """Guard for the tests below: the fixture really has gammas, registers, tokens, norms and biases."""
    names = {n for n, _ in full_model.named_parameters()}
    for expected in ("backbone.pos_embed", "backbone.cls_token", "backbone.reg_token", "backbone.mask_token",
                     "backbone.blocks.0.ls1.gamma", "backbone.blocks.1.ls2.gamma", "backbone.norm.weight",
                     "backbone.blocks.0.norm1.bias", "backbone.patch_embed.proj.weight", "task.head.fc.weight"):
        assert expected in names


def test_no_weight_decay_names_matches_module_kinds(model):
    _, exempt = expected_split(model)
    assert no_weight_decay_names(model) == exempt


def test_no_weight_decay_names_on_bare_backbone_has_unprefixed_tokens(full_model):
    names = no_weight_decay_names(full_model.backbone)
    assert {"pos_embed", "cls_token", "reg_token", "mask_token"} <= names
    assert "patch_embed.proj.weight" not in names
    assert names <= {n for n, _ in full_model.backbone.named_parameters()}, "names must be real parameter names"


def test_no_weight_decay_hook_is_honoured_for_nd_parameters():
    """A >1-D parameter listed by a submodule's no_weight_decay() is exempt, with its full dotted name."""

    class WithTable(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.zeros(4, 3))
            self.proj = nn.Linear(3, 3)

        def no_weight_decay(self):
            return {"table"}

    model = nn.Sequential(nn.Linear(3, 3), WithTable())
    names = no_weight_decay_names(model)
    assert "1.table" in names
    assert "1.proj.weight" not in names and "0.weight" not in names
    assert {"0.bias", "1.proj.bias"} <= names


@pytest.mark.parametrize("wd", [0.05, 0.3])
def test_param_groups_decay_weights_and_exempt_the_rest(model, wd):
    decay, exempt = expected_split(model)
    groups = param_groups(model, wd)
    by_wd = {}
    for g in groups:
        by_wd.setdefault(g["weight_decay"], set()).update(names_of(model, g["params"]))
    assert by_wd[wd] == decay
    assert by_wd[0.0] == exempt
    # all Linear / conv weights are decayed
    for mname, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            assert f"{mname}.weight" in by_wd[wd]


def test_every_trainable_param_appears_exactly_once(model):
    opt = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05)
    counts = Counter(id(p) for g in opt.param_groups for p in g["params"])
    assert set(counts) == {id(p) for p in model.parameters()}
    assert max(counts.values()) == 1


def test_frozen_params_are_left_out(full_model):
    for p in full_model.backbone.patch_embed.parameters():
        p.requires_grad_(False)
    full_model.backbone.cls_token.requires_grad_(False)
    opt = build_optimizer(full_model, "adamw")
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {id(p) for p in full_model.parameters() if p.requires_grad}
    assert in_opt == trainable
    assert id(full_model.backbone.cls_token) not in in_opt


def test_adamw_step_decays_only_the_decay_group(full_model):
    """With zero gradients AdamW's update is pure decoupled decay: p <- p * (1 - lr * wd) for decayed
    parameters, exempt parameters stay bit-identical."""
    lr, wd = 0.1, 0.5
    opt = build_optimizer(full_model, "adamw", lr=lr, weight_decay=wd)
    decay, exempt = expected_split(full_model)
    with torch.no_grad():
        for p in full_model.parameters():
            p.add_(0.1)                            # biases / gammas start at 0 or 1: make any decay visible
    before = {n: p.detach().clone() for n, p in full_model.named_parameters()}
    for p in full_model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in full_model.named_parameters():
        if n in exempt:
            torch.testing.assert_close(p, before[n], rtol=0, atol=0, msg=f"{n} was decayed")
        else:
            torch.testing.assert_close(p, before[n] * (1 - lr * wd), msg=f"{n} was not decayed")


# --------------------------------------------------------- optimizer types ---

def test_adamw_type_and_hyperparameters(full_model):
    opt = build_optimizer(full_model, "adamw", lr=3e-4, weight_decay=0.07, betas=[0.8, 0.95], eps=1e-6)
    assert type(opt) is torch.optim.AdamW
    assert group_by_decay(opt, full_model).keys() == {0.07, 0.0}
    for g in opt.param_groups:
        assert g["lr"] == 3e-4
        assert tuple(g["betas"]) == (0.8, 0.95)
        assert g["eps"] == 1e-6


def test_adamw_is_the_default(full_model):
    opt = build_optimizer(full_model)
    assert type(opt) is torch.optim.AdamW


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_type_and_hyperparameters(full_model, nesterov):
    opt = build_optimizer(full_model, "sgd", lr=0.2, weight_decay=1e-4, momentum=0.7, nesterov=nesterov)
    assert type(opt) is torch.optim.SGD
    decay, exempt = expected_split(full_model)
    by_wd = group_by_decay(opt, full_model)
    assert set(by_wd[1e-4]) == decay and set(by_wd[0.0]) == exempt
    for g in opt.param_groups:
        assert g["lr"] == 0.2
        assert g["momentum"] == 0.7
        assert g["nesterov"] is nesterov


def test_sgd_step_moves_params_against_gradient():
    model = nn.Linear(3, 2)
    opt = build_optimizer(model, "sgd", lr=0.5, weight_decay=0.0, momentum=0.0)
    before = model.weight.detach().clone()
    model.weight.grad = torch.ones_like(model.weight)
    model.bias.grad = torch.zeros_like(model.bias)
    opt.step()
    torch.testing.assert_close(model.weight, before - 0.5)


@pytest.mark.parametrize("name", ["adam", "lamb", "ADAMW", ""])
def test_unknown_optimizer_names_the_choices(full_model, name):
    with pytest.raises(ValueError) as e:
        build_optimizer(full_model, name)
    msg = str(e.value)
    assert repr(name) in msg and "adamw" in msg and "sgd" in msg


def test_empty_group_is_accepted():
    """A model made only of exempt parameters (a norm) still gives a working optimizer."""
    model = nn.LayerNorm(4)
    opt = build_optimizer(model, "adamw", lr=0.1)
    assert sum(len(g["params"]) for g in opt.param_groups) == 2
    model.weight.grad = torch.ones(4)
    model.bias.grad = torch.ones(4)
    opt.step()
    assert torch.all(model.weight < 1)


def test_make_model_is_reproducible(make_model):
    """Sanity for the fixture: same seed, same weights (keeps the optimizer tests deterministic)."""
    a, b = make_model(), make_model()
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


# -------------------------------------------------------------- fused AdamW ---

def test_fused_auto_uses_the_kernel_where_torch_has_it(monkeypatch):
    from vitlab.optim import build as optim_build
    from vitlab.optim.build import resolve_fused

    cpu = [torch.zeros(2, requires_grad=True)]
    assert resolve_fused("auto", cpu) is True                        # torch >= 2.4 has a fused CPU AdamW
    assert resolve_fused("auto", cpu + [torch.zeros(2, dtype=torch.long)]) is False
    monkeypatch.setattr(optim_build, "_fused_devices", lambda: {"cuda"})   # an older torch: CUDA only
    assert resolve_fused("auto", cpu) is False
    assert resolve_fused(True, cpu) is True and resolve_fused(False, cpu) is False
    assert resolve_fused("auto", []) is False
    with pytest.raises(ValueError, match="true, false or auto"):
        resolve_fused("yes", cpu)


def test_fused_adamw_takes_the_same_steps_as_foreach(make_model):
    """fused=True (one kernel; CPU support since torch 2.4) computes the same update as the foreach AdamW."""
    models = [make_model(), make_model()]
    opts = [build_optimizer(m, "adamw", lr=1e-2, weight_decay=0.05, fused=f) for m, f in zip(models, (True, False))]
    assert opts[0].defaults["fused"] is True and not opts[1].defaults["fused"]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    # one step agrees to rounding; later steps drift by Adam's m / sqrt(v) on near-zero gradients, far below lr
    for step, atol in ((1, 1e-6), (2, 2e-4), (3, 2e-4)):
        for m, opt in zip(models, opts):
            m.task.loss(m(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
            torch.testing.assert_close(a, b, atol=atol, rtol=1e-5, msg=f"{n} after step {step}")
