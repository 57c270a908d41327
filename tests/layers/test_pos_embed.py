"""Position information: resampling of learned absolute tables, and 2-D axial RoPE."""

from __future__ import annotations

import math

import pytest
import torch

from vitlab.layers import PatchEmbed
from vitlab.layers.pos_embed import RotaryEmbedding2D, resample_abs_pos_embed


def _smooth_table(h, w, D=4, prefix=0, seed=0):
    """(1, prefix + h*w, D): random prefix rows, then smooth functions of the (y, x) grid position."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    cols = [0.1 * xs + 0.05 * ys, torch.sin(xs / 3) + torch.cos(ys / 4), 0.02 * xs - 0.1 * ys,
            torch.exp(-((xs - w / 2) ** 2 + (ys - h / 2) ** 2) / (h * w))]
    grid = torch.stack(cols[:D], dim=-1).reshape(1, h * w, D)
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(1, prefix, D, generator=g), grid], dim=1)


# ---------------------------------------------------------------- absolute ---

@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("new_grid", [(6, 6), (3, 5), (2, 2)])
def test_resample_shape_and_prefix_rows_unchanged(prefix, new_grid):
    pe = torch.randn(1, prefix + 16, 8)
    out = resample_abs_pos_embed(pe, new_grid, num_prefix_tokens=prefix)
    assert out.shape == (1, prefix + new_grid[0] * new_grid[1], 8)
    assert torch.equal(out[:, :prefix], pe[:, :prefix])


def test_resample_same_grid_returns_input_unchanged():
    pe = torch.randn(1, 1 + 12, 8)
    out = resample_abs_pos_embed(pe, (3, 4), old_grid=(3, 4), num_prefix_tokens=1)
    assert torch.equal(out, pe)
    pe_sq = torch.randn(1, 2 + 25, 8)
    assert torch.equal(resample_abs_pos_embed(pe_sq, (5, 5), num_prefix_tokens=2), pe_sq)


def test_resample_non_square_old_grid():
    pe = _smooth_table(4, 6, prefix=1)
    out = resample_abs_pos_embed(pe, (8, 3), old_grid=(4, 6), num_prefix_tokens=1)
    assert out.shape == (1, 1 + 24, 4)
    # A constant table stays constant whatever the grids.
    const = torch.full((1, 24, 3), 0.7)
    torch.testing.assert_close(resample_abs_pos_embed(const, (5, 7), old_grid=(4, 6)), torch.full((1, 35, 3), 0.7))


def test_resample_needs_old_grid_when_not_square():
    with pytest.raises(ValueError, match="old_grid"):
        resample_abs_pos_embed(torch.randn(1, 1 + 15, 4), (4, 4), num_prefix_tokens=1)


def test_resample_keeps_dtype():
    pe = torch.randn(1, 1 + 16, 8, dtype=torch.bfloat16)
    out = resample_abs_pos_embed(pe, (5, 3), num_prefix_tokens=1)
    assert out.dtype == torch.bfloat16


def test_resample_linear_ramp_is_exact_in_the_interior():
    """Bicubic interpolation reproduces a linear function wherever its taps are inside the grid;
    pixel centres map back with align_corners=False: y = (y' + 0.5) * h / h' - 0.5."""
    h, w, H, W = 8, 6, 16, 12
    pe = _smooth_table(h, w, D=1, prefix=1)                  # column 0: 0.1 x + 0.05 y
    up = resample_abs_pos_embed(pe, (H, W), old_grid=(h, w), num_prefix_tokens=1)[0, 1:, 0].reshape(H, W)
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                            indexing="ij")
    sy, sx = (yy + 0.5) * h / H - 0.5, (xx + 0.5) * w / W - 0.5
    expected = 0.1 * sx + 0.05 * sy
    torch.testing.assert_close(up[4:-4, 4:-4], expected[4:-4, 4:-4], atol=1e-5, rtol=0)
    # The grid's row-major order is kept: values increase along x and along y.
    assert (up[:, 1:] > up[:, :-1]).all() and (up[1:, :] > up[:-1, :]).all()


def test_resample_up_and_back_stays_close():
    pe = _smooth_table(8, 8, prefix=1)
    up = resample_abs_pos_embed(pe, (16, 16), num_prefix_tokens=1)
    back = resample_abs_pos_embed(up, (8, 8), num_prefix_tokens=1)
    assert back.shape == pe.shape
    amplitude = pe[:, 1:].abs().max()
    # Only the border rows move (bicubic clamps at the edges), and by a few per cent of the range.
    assert (back - pe).abs().max() < 0.05 * amplitude
    torch.testing.assert_close(back[0, 1:].reshape(8, 8, -1)[2:-2, 2:-2], pe[0, 1:].reshape(8, 8, -1)[2:-2, 2:-2],
                               atol=5e-3 * amplitude, rtol=0)


def test_resample_is_differentiable():
    pe = torch.randn(1, 1 + 16, 4, requires_grad=True)
    resample_abs_pos_embed(pe, (6, 5), num_prefix_tokens=1).sum().backward()
    assert pe.grad is not None and torch.isfinite(pe.grad).all()
    assert torch.equal(pe.grad[:, 0], torch.ones(1, 4))      # the prefix row passes straight through


# ------------------------------------------------------------------- RoPE ---

def test_rope_needs_head_dim_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        RotaryEmbedding2D(18)


def test_rope_angles_shape_and_axes():
    """Token i = y*w + x (PatchEmbed's row-major order): the first half of the angles follow x, the second y."""
    rope = RotaryEmbedding2D(16, theta=100.0)
    h, w = 3, 5
    cos, sin = rope.angles((h, w))
    assert cos.shape == sin.shape == (h * w, 8)
    torch.testing.assert_close(cos ** 2 + sin ** 2, torch.ones_like(cos))
    ang = torch.atan2(sin, cos)                                      # angles are small enough not to wrap here
    freqs = 100.0 ** (-torch.arange(4, dtype=torch.float32) / 4)
    for y in range(h):
        for x in range(w):
            i = y * w + x
            torch.testing.assert_close(ang[i, :4], torch.remainder(x * freqs + math.pi, 2 * math.pi) - math.pi)
            torch.testing.assert_close(ang[i, 4:], torch.remainder(y * freqs + math.pi, 2 * math.pi) - math.pi)
    # The first frequency is 1 (theta^0) and they decrease.
    assert rope.freqs[0] == 1.0 and (rope.freqs[1:] < rope.freqs[:-1]).all()


def test_patch_embed_order_matches_rope_order():
    """Token i of PatchEmbed is the patch at row i // w, column i % w, the order RoPE assumes."""
    pe = PatchEmbed(patch_size=2, in_chans=1, embed_dim=1, bias=False)
    with torch.no_grad():
        pe.proj.weight.zero_()
        pe.proj.weight[0, 0, 0, 0] = 1.0                               # picks the top-left pixel of each patch
    img = torch.arange(6 * 10, dtype=torch.float32).reshape(1, 1, 6, 10)
    tokens, grid = pe(img)
    assert grid == (3, 5)
    expected = torch.tensor([img[0, 0, 2 * (i // 5), 2 * (i % 5)].item() for i in range(15)])
    torch.testing.assert_close(tokens[0, :, 0], expected)


@pytest.mark.parametrize("prefix", [0, 1, 3])
def test_rope_preserves_norms_and_leaves_prefix_tokens(prefix):
    rope = RotaryEmbedding2D(16)
    h, w = 4, 3
    cos, sin = rope.angles((h, w))
    x = torch.randn(2, 3, prefix + h * w, 16)
    out = RotaryEmbedding2D.rotate(x, cos, sin, num_prefix_tokens=prefix)
    assert out.shape == x.shape
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    assert torch.equal(out[..., :prefix, :], x[..., :prefix, :])
    # Position (0, 0) has angle 0: the first patch token is not moved; the others are.
    torch.testing.assert_close(out[..., prefix, :], x[..., prefix, :])
    assert not torch.allclose(out[..., prefix + 1:, :], x[..., prefix + 1:, :])


def test_rope_keeps_dtype():
    rope = RotaryEmbedding2D(8)
    cos, sin = rope.angles((2, 2))
    x = torch.randn(1, 1, 5, 8, dtype=torch.bfloat16)
    assert RotaryEmbedding2D.rotate(x, cos, sin, 1).dtype == torch.bfloat16


def _rotated_scores(head_dim, grid, theta=100.0, seed=0):
    """q . k after rotation for q at every grid position and k at every grid position: (h, w, h, w)."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(head_dim, generator=g), torch.randn(head_dim, generator=g)
    h, w = grid
    cos, sin = RotaryEmbedding2D(head_dim, theta).angles(grid)
    rq = RotaryEmbedding2D.rotate(q.expand(1, 1, h * w, head_dim), cos, sin)[0, 0]
    rk = RotaryEmbedding2D.rotate(k.expand(1, 1, h * w, head_dim), cos, sin)[0, 0]
    return (rq @ rk.T).reshape(h, w, h, w), q @ k


def test_rope_scores_depend_only_on_relative_offset():
    """The RoPE property: score(q at p, k at p + d) == score(q at p', k at p' + d) for every p, p', d."""
    h, w = 5, 6
    S, _ = _rotated_scores(16, (h, w))
    for y1 in range(h):
        for x1 in range(w):
            for y2 in range(h):
                for x2 in range(w):
                    dy, dx = y2 - y1, x2 - x1
                    # compare with the same offset starting from the position (0, 0) shifted to fit
                    oy, ox = max(0, -dy), max(0, -dx)
                    torch.testing.assert_close(S[y1, x1, y2, x2], S[oy, ox, oy + dy, ox + dx], atol=1e-5, rtol=1e-5)


def test_rope_scores_distinguish_offsets_on_each_axis():
    S, qk = _rotated_scores(16, (4, 4))
    torch.testing.assert_close(S[1, 2, 1, 2], qk)                    # offset 0: the plain dot product
    # Different offsets give different scores, and x and y offsets are told apart.
    scores = {(dy, dx): S[0, 0, dy, dx].item() for dy in range(4) for dx in range(4)}
    vals = sorted(scores.values())
    assert min(b - a for a, b in zip(vals, vals[1:])) > 1e-4
    # 2-D, not 1-D over the flattened index: (0, w-1) -> (1, 0) is not the same as (0, 0) -> (0, 1).
    assert not math.isclose(S[0, 3, 1, 0].item(), S[0, 0, 0, 1].item(), abs_tol=1e-4)


def test_rope_gathered_angles_broadcast_per_sample():
    """The backbone gathers per-sample rows of the tables when tokens are dropped: (B, 1, N', Dh/2)."""
    rope = RotaryEmbedding2D(8)
    cos, sin = rope.angles((3, 3))
    ids = torch.tensor([[0, 4, 8], [1, 2, 7]])
    x = torch.randn(2, 2, 3, 8)
    out = RotaryEmbedding2D.rotate(x, cos[ids].unsqueeze(1), sin[ids].unsqueeze(1))
    for b in range(2):
        full = torch.zeros(1, 2, 9, 8)
        full[0, :, ids[b]] = x[b]
        ref = RotaryEmbedding2D.rotate(full, cos, sin)[0, :, ids[b]]
        torch.testing.assert_close(out[b], ref)
