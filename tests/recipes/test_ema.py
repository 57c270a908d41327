"""ModelEma (vitlab.recipes.ema): the averaging math by hand, warmup decay, update_every, buffers, frozen eval-mode
copy, state-dict round trip (num_updates included) and structure checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import SyncRecorder
from vitlab.recipes import ModelEma


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))


def set_all(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_two_updates_match_the_hand_computation():
    model = nn.Linear(2, 1)
    set_all(model, 1.0)
    ema = ModelEma(model, decay=0.9)
    set_all(model, 3.0)
    ema.update(model, step=0)                                  # 0.9 * 1 + 0.1 * 3 = 1.2
    set_all(model, -2.0)
    ema.update(model, step=1)                                  # 0.9 * 1.2 + 0.1 * -2 = 0.88
    for p in ema.module.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.88))
    assert int(ema.num_updates) == 2


def test_each_parameter_is_averaged_with_its_own_model_parameter():
    model = tiny()
    ema = ModelEma(model, decay=0.75)
    start = {n: p.detach().clone() for n, p in ema.module.named_parameters()}
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(float(i + 1))
    ema.update(model, step=0)
    for n, p in ema.module.named_parameters():
        target = dict(model.named_parameters())[n]
        torch.testing.assert_close(p, 0.75 * start[n] + 0.25 * target)


def test_warmup_decay_values():
    ema = ModelEma(nn.Linear(2, 2), decay=0.999, warmup=True)
    assert ema.decay_at(0) == pytest.approx(0.1)               # (1 + 0) / (10 + 0)
    assert ema.decay_at(1) == pytest.approx(2 / 11)
    assert ema.decay_at(90) == pytest.approx(91 / 100)
    assert ema.decay_at(10**6) == 0.999                         # capped at decay
    assert ModelEma(nn.Linear(2, 2), decay=0.99).decay_at(0) == 0.99


def test_warmup_is_applied_in_update():
    model = nn.Linear(1, 1)
    set_all(model, 0.0)
    ema = ModelEma(model, decay=0.999, warmup=True)
    set_all(model, 10.0)
    ema.update(model, step=0)                                  # d = 0.1: 0.1 * 0 + 0.9 * 10 = 9
    ema.update(model, step=1)                                  # d = 2/11: 2/11 * 9 + 9/11 * 10
    for p in ema.module.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 2 / 11 * 9 + 9 / 11 * 10))


def test_update_every_skips_the_other_steps():
    model = nn.Linear(2, 1)
    set_all(model, 0.0)
    ema = ModelEma(model, decay=0.5, update_every=3)
    set_all(model, 8.0)
    for step in range(7):                                      # updates on steps 0, 3, 6
        ema.update(model, step)
    assert int(ema.num_updates) == 3
    for p in ema.module.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 8.0 - 8.0 / 2 ** 3))


def test_buffers_are_averaged_or_copied():
    model = tiny()
    ema = ModelEma(model, decay=0.5)
    model.train()
    model(torch.randn(8, 3))                                   # running stats move, num_batches_tracked = 1
    ema.update(model, step=0)
    bn, bn_ema = model[1], ema.module[1]
    assert int(bn_ema.num_batches_tracked) == 1                # integer buffer: copied
    torch.testing.assert_close(bn_ema.running_mean, 0.5 * bn.running_mean)      # float buffer: averaged from 0
    torch.testing.assert_close(bn_ema.running_var, 0.5 * torch.ones(4) + 0.5 * bn.running_var)


def test_copy_is_frozen_and_stays_in_eval_mode():
    model = tiny()
    model(torch.randn(4, 3)).sum().backward()                  # gradients must not be copied along
    ema = ModelEma(model)
    assert all(not p.requires_grad and p.grad is None for p in ema.module.parameters())
    ema.train()
    assert ema.training and not ema.module.training and not any(m.training for m in ema.module.modules())
    x = torch.randn(5, 3)
    torch.testing.assert_close(ema(x), ema(x), msg="dropout is off in the averaged copy")
    # the model is deep-copied: training the model does not touch the copy
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(model[0].weight, ema.module[0].weight)


def test_set_copies_exactly():
    model = tiny()
    ema = ModelEma(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-3.3).add_(0.1)
    model[1].num_batches_tracked.fill_(5)
    ema.set(model)
    for (n, a), b in zip(ema.module.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), n
    assert int(ema.num_updates) == 0


def test_state_dict_round_trip_restores_the_average_and_num_updates():
    model = tiny()
    ema = ModelEma(model, decay=0.999, warmup=True)
    for step in range(5):
        with torch.no_grad():
            model[0].weight.add_(0.1)
        ema.update(model, step)
    sd = ema.state_dict()
    assert "num_updates" in sd and int(sd["num_updates"]) == 5
    restored = ModelEma(tiny(), decay=0.999, warmup=True)
    restored.load_state_dict(sd)
    assert restored._num_updates == 5 and int(restored.num_updates) == 5
    for a, b in zip(ema.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(a, b)
    # both continue identically (same warmup decay from the restored counter)
    for e in (ema, restored):
        e.update(model, 5)
    for a, b in zip(ema.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(a, b)


def test_update_reads_nothing_back_from_the_device():
    model = tiny()
    ema = ModelEma(model, decay=0.99, warmup=True, update_every=2)
    with SyncRecorder() as spy:
        for step in range(4):
            ema.update(model, step)
    assert spy.seen == []


def test_a_different_model_is_refused():
    ema = ModelEma(tiny())
    with pytest.raises(ValueError, match="does not match its EMA copy"):
        ema.update(nn.Linear(3, 4), step=0)
    with pytest.raises(ValueError, match="shape"):
        ema.update(nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Dropout(), nn.Linear(5, 2)), step=0)


@pytest.mark.parametrize("kwargs", [{"decay": 1.5}, {"update_every": 0}, {"update_every": 1.5}])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        ModelEma(nn.Linear(2, 2), **kwargs)
