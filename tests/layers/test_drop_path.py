"""Stochastic depth and the small leaf layers (LayerScale, Mlp, PatchEmbed)."""

from __future__ import annotations

import math

import pytest
import torch

from vitlab.layers import DropPath, LayerScale, Mlp, PatchEmbed, linear_drop_path_rates
from vitlab.layers.drop_path import drop_path


def test_drop_path_identity_in_eval_and_at_zero():
    x = torch.randn(8, 5, 4)
    m = DropPath(0.5).eval()
    assert torch.equal(m(x), x)
    assert torch.equal(DropPath(0.0).train()(x), x)
    assert torch.equal(drop_path(x, 0.7, training=False), x)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_path_zeros_whole_samples_and_rescales(p):
    torch.manual_seed(0)
    n = 20000
    x = torch.ones(n, 3, 2)
    out = DropPath(p).train()(x)
    per_sample = out.reshape(n, -1)
    # Each sample is either entirely dropped or entirely kept and scaled by 1 / (1 - p).
    dropped = (per_sample == 0).all(1)
    kept = torch.isclose(per_sample, torch.full_like(per_sample, 1 / (1 - p))).all(1)
    assert torch.all(dropped ^ kept)
    # The drop rate is p (binomial: 5 standard deviations), and the expectation is preserved.
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(dropped.float().mean().item() - p) < 5 * sd
    assert abs(out.mean().item() - 1.0) < 5 * sd / (1 - p)


def test_drop_path_gradients_follow_the_mask():
    torch.manual_seed(1)
    x = torch.randn(64, 4, requires_grad=True)
    out = drop_path(x, 0.5, training=True)
    out.sum().backward()
    kept = (out != 0).any(1)
    torch.testing.assert_close(x.grad[kept], torch.full_like(x.grad[kept], 2.0))
    assert torch.equal(x.grad[~kept], torch.zeros_like(x.grad[~kept]))
    assert 0 < kept.sum() < 64


def test_linear_drop_path_rates_is_deits_rule():
    rates = linear_drop_path_rates(0.1, 12)
    assert len(rates) == 12
    assert rates[0] == 0.0 and math.isclose(rates[-1], 0.1)
    # DeiT / timm: torch.linspace(0, rate, depth)
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.1, 12, dtype=torch.float64).float())
    diffs = [b - a for a, b in zip(rates, rates[1:])]
    assert all(math.isclose(d, 0.1 / 11) for d in diffs)
    assert linear_drop_path_rates(0.0, 4) == [0.0] * 4


def test_drop_path_repr():
    assert "0.250" in repr(DropPath(0.25))


def test_layer_scale():
    ls = LayerScale(6, 1e-5)
    assert ls.gamma.shape == (6,) and torch.allclose(ls.gamma, torch.full((6,), 1e-5))
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(ls(x), x * 1e-5)
    with torch.no_grad():
        ls.gamma.copy_(torch.arange(6.0))
    torch.testing.assert_close(ls(x), x * torch.arange(6.0))


def test_mlp_shapes_and_hidden_width():
    m = Mlp(8, 32)
    assert m.fc1.out_features == 32 and m.fc2.out_features == 8
    assert m(torch.randn(2, 5, 8)).shape == (2, 5, 8)


def test_patch_embed_grid_and_divisibility_error():
    pe = PatchEmbed(patch_size=4, in_chans=3, embed_dim=10)
    tokens, grid = pe(torch.randn(2, 3, 12, 8))
    assert grid == (3, 2) and tokens.shape == (2, 6, 10)
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        pe(torch.randn(1, 3, 10, 8))
