"""cosine_schedule / constant_schedule / warmup_cosine_factor, stepped as Lightning steps them (per step)."""

from __future__ import annotations

import math

import pytest
import torch

from vitlab.optim import constant_schedule, cosine_schedule, warmup_cosine_factor

LR = 0.4


def optimizer(lr: float = LR, n_groups: int = 1) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(n_groups)]
    return torch.optim.SGD(groups, lr=lr)


def lrs(sched, n: int, group: int = 0) -> list[float]:
    """The lr in effect at steps 0..n-1 (the first n optimizer steps), then one more after n."""
    opt = sched.optimizer
    out = []
    for _ in range(n + 1):
        out.append(opt.param_groups[group]["lr"])
        opt.step()
        sched.step()
    return out


def reference_cosine(step: int, total: int, warm: int, r: float) -> float:
    """Textbook cosine-with-linear-warmup multiplier, written out independently."""
    if step < warm:
        return (step + 1) / warm
    t = min(step - warm, total - warm) / (total - warm)
    return r + (1 - r) * (1 + math.cos(math.pi * t)) / 2


# ------------------------------------------------------------------ cosine ---

@pytest.mark.parametrize("warm", [1, 4, 10])
def test_warmup_is_linear_from_lr_over_warmup_to_lr(warm):
    out = lrs(cosine_schedule(optimizer(), total_steps=50, steps_per_epoch=10, warmup_steps=warm), 50)
    assert out[0] == pytest.approx(LR / warm)
    for s in range(warm):
        assert out[s] == pytest.approx(LR * (s + 1) / warm)
    # constant increments during warmup
    if warm > 2:
        diffs = [out[s + 1] - out[s] for s in range(warm - 1)]
        assert diffs == pytest.approx([LR / warm] * (warm - 1))


@pytest.mark.parametrize("warm", [0, 3, 10])
def test_peak_lr_is_reached_at_the_end_of_warmup_and_never_exceeded(warm):
    out = lrs(cosine_schedule(optimizer(), total_steps=40, steps_per_epoch=10, warmup_steps=warm), 40)
    assert max(out) == pytest.approx(LR)
    peak = out.index(max(out))
    assert peak == max(0, warm - 1)
    if warm:
        assert out[warm] == pytest.approx(LR)        # cosine starts from the peak, no jump


@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.25])
@pytest.mark.parametrize("warm", [0, 5])
def test_cosine_reaches_min_lr_at_total_steps(ratio, warm):
    total = 30
    out = lrs(cosine_schedule(optimizer(), total_steps=total, steps_per_epoch=10, warmup_steps=warm,
                              min_lr_ratio=ratio), total)
    assert out[total] == pytest.approx(LR * ratio, abs=1e-12)
    assert min(out[warm:]) == pytest.approx(LR * ratio, abs=1e-12)      # the floor: never undershot
    assert out[total - 1] > LR * ratio                 # the last real step is still above the floor


@pytest.mark.parametrize("warm", [0, 5])
def test_monotone_decreasing_after_warmup(warm):
    total = 40
    out = lrs(cosine_schedule(optimizer(), total_steps=total, steps_per_epoch=10, warmup_steps=warm,
                              min_lr_ratio=0.1), total)
    assert all(b <= a for a, b in zip(out[max(warm - 1, 0):], out[warm:]))
    tail = out[warm:total + 1]
    assert all(b < a for a, b in zip(tail, tail[1:])), tail


def test_matches_reference_formula():
    total, warm, r = 37, 6, 0.05
    out = lrs(cosine_schedule(optimizer(), total_steps=total, steps_per_epoch=5, warmup_steps=warm,
                              min_lr_ratio=r), total)
    assert out == pytest.approx([LR * reference_cosine(s, total, warm, r) for s in range(total + 1)])
    # halfway through the decay the lr is halfway between peak and floor
    mid = warm + (total - warm) / 2
    assert warmup_cosine_factor(mid, total, warm, r) == pytest.approx((1 + r) / 2)


def test_lr_stays_at_floor_past_total_steps():
    for step in (20, 21, 100):
        assert warmup_cosine_factor(step, 20, 4, 0.1) == pytest.approx(0.1)


def test_warmup_epochs_use_steps_per_epoch():
    out = lrs(cosine_schedule(optimizer(), total_steps=100, steps_per_epoch=8, warmup_epochs=0.5), 100)
    warm = 4                                            # 0.5 epochs x 8 steps
    assert out[: warm] == pytest.approx([LR * (s + 1) / warm for s in range(warm)])
    assert out.index(max(out)) == warm - 1


@pytest.mark.parametrize("warmup_steps", [0, 3, 7])
def test_warmup_steps_override_warmup_epochs(warmup_steps):
    out = lrs(cosine_schedule(optimizer(), total_steps=100, steps_per_epoch=10, warmup_epochs=5,
                              warmup_steps=warmup_steps), 100)
    expected_first = LR / warmup_steps if warmup_steps else LR
    assert out[0] == pytest.approx(expected_first)
    assert out.index(max(out)) == max(warmup_steps - 1, 0)


def test_warmup_longer_than_the_run_is_clipped():
    """Warmup longer than the run still peaks inside it rather than never reaching the lr."""
    total = 10
    out = lrs(cosine_schedule(optimizer(), total_steps=total, steps_per_epoch=10, warmup_epochs=5), total)
    assert max(out[:total]) == pytest.approx(LR)
    assert all(b >= a for a, b in zip(out[:total - 1], out[1:total - 1]))


def test_every_param_group_is_scaled_from_its_own_lr():
    opt = optimizer()
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.01})
    sched = cosine_schedule(opt, total_steps=20, steps_per_epoch=5, warmup_steps=4, min_lr_ratio=0.1)
    a = lrs(sched, 20, group=0)
    opt2 = optimizer()
    opt2.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.01})
    b = lrs(cosine_schedule(opt2, total_steps=20, steps_per_epoch=5, warmup_steps=4, min_lr_ratio=0.1), 20, group=1)
    assert b == pytest.approx([x * 0.01 / LR for x in a])


def test_factor_without_warmup_starts_at_one():
    assert warmup_cosine_factor(0, 10, 0, 0.0) == pytest.approx(1.0)
    assert warmup_cosine_factor(10, 10, 0, 0.0) == pytest.approx(0.0, abs=1e-12)


def test_schedule_state_round_trips():
    """Resume: a scheduler rebuilt and loaded from a state dict continues where the first stopped."""
    s1 = cosine_schedule(optimizer(), total_steps=30, steps_per_epoch=10, warmup_steps=5)
    lrs(s1, 11)
    opt_state, sched_state = s1.optimizer.state_dict(), s1.state_dict()
    s2 = cosine_schedule(optimizer(), total_steps=30, steps_per_epoch=10, warmup_steps=5)
    s2.optimizer.load_state_dict(opt_state)
    s2.load_state_dict(sched_state)
    assert s2.get_last_lr() == pytest.approx(s1.get_last_lr())
    assert lrs(s2, 5) == pytest.approx(lrs(s1, 5))


# ---------------------------------------------------------------- constant ---

def test_constant_schedule_without_warmup():
    out = lrs(constant_schedule(optimizer(), total_steps=20, steps_per_epoch=5), 20)
    assert out == pytest.approx([LR] * 21)


def test_constant_schedule_with_warmup_epochs():
    out = lrs(constant_schedule(optimizer(), total_steps=20, steps_per_epoch=4, warmup_epochs=1), 20)
    assert out[:4] == pytest.approx([LR * (s + 1) / 4 for s in range(4)])
    assert out[4:] == pytest.approx([LR] * 17)


def test_constant_schedule_warmup_steps_override_epochs():
    out = lrs(constant_schedule(optimizer(), total_steps=20, steps_per_epoch=4, warmup_epochs=3, warmup_steps=2), 20)
    assert out[:2] == pytest.approx([LR / 2, LR])
    assert out[2:] == pytest.approx([LR] * 19)
    out0 = lrs(constant_schedule(optimizer(), total_steps=20, steps_per_epoch=4, warmup_epochs=3, warmup_steps=0), 5)
    assert out0 == pytest.approx([LR] * 6)
