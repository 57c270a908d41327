"""The conditioning layers of diffusion transformers: adaLN modulation, the sinusoidal timestep code and the
timestep / class-label embedders (DiT, Peebles & Xie 2023)."""

from __future__ import annotations

import math

import pytest
import torch

from vitlab.layers import LabelEmbedder, TimestepEmbedder, modulate, timestep_embedding


def test_modulate_hand_computed():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])                          # (B=1, N=2, D=2)
    shift, scale = torch.tensor([[10.0, -1.0]]), torch.tensor([[1.0, -0.5]])
    # x * (1 + scale) + shift: column 0 doubled + 10, column 1 halved - 1
    expected = torch.tensor([[[12.0, 0.0], [16.0, 1.0]]])
    assert torch.equal(modulate(x, shift, scale), expected)


def test_modulate_zero_is_identity():
    x = torch.randn(3, 5, 8)
    z = torch.zeros(3, 8)
    assert torch.equal(modulate(x, z, z), x)


def test_timestep_embedding_at_zero_is_cos_ones_then_sin_zeros():
    emb = timestep_embedding(torch.zeros(3), 8)
    assert emb.shape == (3, 8) and emb.dtype == torch.float32
    assert torch.equal(emb[:, :4], torch.ones(3, 4))                      # cos(0)
    assert torch.equal(emb[:, 4:], torch.zeros(3, 4))                     # sin(0)


def test_timestep_embedding_hand_computed_fractional():
    # dim 4: half 2, frequencies exp(-ln(1e4) * i / 2) = 1, 1e-2; the code is [cos t, cos t/100, sin t, sin t/100]
    t = torch.tensor([1.0, 2.5])
    emb = timestep_embedding(t, 4)
    for row, tv in zip(emb, t.tolist()):
        want = torch.tensor([math.cos(tv), math.cos(tv / 100), math.sin(tv), math.sin(tv / 100)])
        torch.testing.assert_close(row, want, rtol=1e-6, atol=1e-6)
    # max_period sets the lowest frequency: 1 / max_period ** ((half - 1) / half)
    emb = timestep_embedding(torch.tensor([3.0]), 4, max_period=100.0)
    torch.testing.assert_close(emb[0, 1], torch.tensor(math.cos(3.0 / 10)), rtol=1e-6, atol=1e-6)


def test_timestep_embedding_odd_dim_pads_one_zero_column():
    emb = timestep_embedding(torch.tensor([0.0, 7.0, 123.4]), 7)
    assert emb.shape == (3, 7)
    assert torch.equal(emb[:, -1], torch.zeros(3))
    torch.testing.assert_close(emb[:, :6], timestep_embedding(torch.tensor([0.0, 7.0, 123.4]), 6))


def test_timestep_embedding_rejects_non_vector_t():
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        timestep_embedding(torch.zeros(2, 1), 8)


def test_timestep_embedder_shape_and_int_steps():
    emb = TimestepEmbedder(16, freq_dim=32)
    assert emb(torch.tensor([0, 999])).shape == (2, 16)                   # integer steps are cast to float
    out = emb(torch.tensor([0.0, 999.0]))
    assert out.shape == (2, 16) and not torch.allclose(out[0], out[1])


def test_label_embedder_null_row_and_range_check():
    emb = LabelEmbedder(10, 8)
    assert emb.embedding_table.weight.shape == (11, 8) and emb.null_class == 10
    y = torch.tensor([0, 9, 10])
    assert torch.equal(emb(y), emb.embedding_table.weight[y])
    with pytest.raises(ValueError, match=r"\[0, 10\].*num_classes"):
        emb(torch.tensor([0, 11]))
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        emb(torch.tensor([-1]))
    with pytest.raises(TypeError, match="integer"):
        emb(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="unconditional"):
        LabelEmbedder(0, 8)
