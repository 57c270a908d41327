"""The ViT's dense-task options: intermediate taps (out_indices) and ViTDet window attention (window_size)."""

from __future__ import annotations

import pytest
import torch

from vitlab.backbones import vit
from vitlab.backbones.vit import resolve_out_indices
from vitlab.layers import window_partition, window_shape, window_unpartition


def tiny(**kw):
    base = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=64)
    base.update(kw)
    return vit("Ti", **base).eval()


def twin(**kw):
    """Two models with the same weights: global attention everywhere, and the options in kw."""
    torch.manual_seed(0)
    ref = tiny(**{k: v for k, v in kw.items() if k not in ("window_size", "global_blocks", "out_indices")})
    other = tiny(**kw)
    other.load_state_dict(ref.state_dict())                      # no new parameters: the same keys load
    return ref, other


# ------------------------------------------------------------------- taps ---

def test_out_indices_rule_hand_computed():
    assert resolve_out_indices(4, 12) == [2, 5, 8, 11]           # the example
    assert resolve_out_indices(3, 12) == [3, 7, 11]              # every 4th block, ending at the last
    assert resolve_out_indices(4, 24) == [5, 11, 17, 23]
    assert resolve_out_indices(1, 12) == [11]
    assert resolve_out_indices(4, 10) == [2, 4, 7, 9]             # 2.5 -> 3, 5, 7.5 -> 8, 10 (1-based, half up)
    assert resolve_out_indices([-1, 0, -4], 12) == [11, 0, 8]    # negatives count from the end, order kept
    assert resolve_out_indices(None, 12) == []
    for bad in (13, 0, [12], [-13]):
        with pytest.raises(ValueError, match="depth 12"):
            resolve_out_indices(bad, 12)
    with pytest.raises(ValueError, match="depth 2"):
        tiny(out_indices=[5])


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (40, 56)])
def test_taps_shapes(size):
    m = tiny(depth=4, out_indices=3, num_registers=2)
    assert m.out_indices == [0, 2, 3]
    out = m(torch.randn(2, 3, *size))
    h, w = size[0] // 8, size[1] // 8
    assert out["grid"] == (h, w)
    assert [tuple(t.shape) for t in out["taps"]] == [(2, 32, h, w)] * 3


def test_taps_are_block_outputs():
    """taps[i] is block out_indices[i]'s output (prenorm patch tokens on the grid); the last one is the final
    tokens before the final norm."""
    m = tiny(depth=3, out_indices=[1, -1])
    seen = {}
    for i, blk in enumerate(m.blocks):
        blk.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, out))
    x = torch.randn(2, 3, 64, 48)
    out = m(x)
    P, (h, w) = m.num_prefix_tokens, out["grid"]
    for tap, i in zip(out["taps"], [1, 2]):
        expect = seen[i][:, P:].transpose(1, 2).reshape(2, 32, h, w)
        torch.testing.assert_close(tap, expect)
    prenorm = out["prenorm"][:, P:].transpose(1, 2).reshape(2, 32, h, w)
    torch.testing.assert_close(out["taps"][-1], prenorm)
    # patch_2d is the normed version: it differs from the prenorm tap
    assert not torch.allclose(out["taps"][-1], out["patch_2d"])


def test_taps_need_the_whole_grid():
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, ::2] = True
    out = tiny(out_indices=2)(x, mask)                           # MAE: dropped tokens -> no grid, no taps
    assert "taps" not in out and "ids_keep" in out
    out = tiny(out_indices=2, use_mask_token=True)(x, mask)      # BEiT / SimMIM: replaced -> taps
    assert len(out["taps"]) == 2
    assert "taps" not in tiny()(x)                               # not asked for


# ------------------------------------------------------- window attention ---

def test_window_partition_round_trip_hand_computed():
    x = torch.arange(3 * 5, dtype=torch.float32).reshape(1, 3, 5, 1)   # a 3 x 5 grid, value = row-major index
    win, padded = window_partition(x, (2, 2))
    assert padded == (4, 6) and win.shape == (6, 4, 1)           # 2 x 3 windows of 2 x 2, zero padded
    assert win[0, :, 0].tolist() == [0, 1, 5, 6]                 # top-left window
    assert win[2, :, 0].tolist() == [4, 0, 9, 0]                 # top-right window: column 5 is padding
    assert win[3, :, 0].tolist() == [10, 11, 0, 0]               # bottom-left window: row 3 is padding
    torch.testing.assert_close(window_unpartition(win, (2, 2), padded, (3, 5)), x)
    assert window_shape(14, (8, 20)) == (8, 14)                  # a window wider than the grid shrinks to it


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("window_size", [8, 100])
def test_window_covering_the_grid_equals_global(window_size, rope):
    kw = dict(class_token=False, global_pool="avg", rope=rope, pos_embed="none" if rope else "learned")
    ref, win = twin(window_size=window_size, **kw)
    assert all(b.window_size == window_size for b in win.blocks)
    for size in [(64, 64), (64, 48)]:                            # grids 8 x 8 and 8 x 6
        x = torch.randn(2, 3, *size)
        torch.testing.assert_close(win(x)["patch_2d"], ref(x)["patch_2d"], rtol=1e-5, atol=1e-5)


def _changed(model, x, x2):
    """Which patch tokens (h, w) and whether the prefix tokens change when the input changes from x to x2."""
    a, b = model(x), model(x2)
    patch = (a["patch_2d"] - b["patch_2d"]).abs().amax(dim=(0, 1)) > 1e-6          # (h, w)
    P = model.num_prefix_tokens
    prefix = bool(((a["prenorm"][:, :P] - b["prenorm"][:, :P]).abs() > 1e-6).any())
    return patch, prefix


@pytest.mark.parametrize("rope", [False, True])
def test_windowed_block_is_local(rope):
    """After ONE windowed block, a change inside window (0, 0) does not reach another window (nor the prefix
    tokens, which attend among themselves); after a following global block it reaches every token."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 56, 56)                                # grid 7 x 7, windows 4 x 4 (padded to 8 x 8)
    x2 = x.clone()
    x2[:, :, :8, :8] += 1.0                                      # patch (0, 0) only
    local = tiny(depth=1, window_size=4, rope=rope, num_registers=1)
    patch, prefix = _changed(local, x, x2)
    inside = torch.zeros(7, 7, dtype=torch.bool)
    inside[:4, :4] = True
    assert patch[inside].all() and not patch[~inside].any() and not prefix
    torch.manual_seed(0)
    mixed = tiny(depth=2, window_size=4, global_blocks=[1], rope=rope, num_registers=1)
    assert [b.window_size for b in mixed.blocks] == [4, 0]
    patch, prefix = _changed(mixed, x, x2)
    assert patch.all() and prefix


@pytest.mark.parametrize("size", [(56, 40), (72, 64), (24, 24)])
def test_window_non_multiple_grids(size):
    m = tiny(depth=3, window_size=4, global_blocks=[-1], out_indices=[0, 2])
    out = m(torch.randn(2, 3, *size))
    h, w = size[0] // 8, size[1] // 8
    assert out["patch_2d"].shape == (2, 32, h, w)
    assert out["prenorm"].shape == (2, 1 + h * w, 32)
    assert [tuple(t.shape) for t in out["taps"]] == [(2, 32, h, w)] * 2


def test_window_gradients_and_checkpointing():
    torch.manual_seed(0)
    m = tiny(depth=3, window_size=3, global_blocks=[1], out_indices=3, rope=True).train()
    x = torch.randn(2, 3, 64, 40)
    out = m(x)
    loss = sum(t.square().mean() for t in out["taps"]) + out["pooled"].sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert all(blk.attn.qkv.weight.grad.abs().sum() > 0 for blk in m.blocks)
    assert m.patch_embed.proj.weight.grad.abs().sum() > 0
    m.zero_grad()
    m.set_grad_checkpointing(True)                               # the same result through recomputation
    out = m(x)
    (sum(t.square().mean() for t in out["taps"]) + out["pooled"].sum()).backward()
    for n, p in m.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)


def test_window_with_masks():
    x = torch.randn(2, 3, 64, 64)
    mask = torch.rand(2, 64) < 0.5
    with pytest.raises(ValueError, match="use_mask_token"):
        tiny(window_size=4)(x, mask)                             # MAE drops tokens: no grid to window
    out = tiny(window_size=4, use_mask_token=True)(x, mask)      # replacement keeps the grid
    assert out["patch_2d"].shape == (2, 32, 8, 8)


def test_window_option_errors():
    with pytest.raises(ValueError, match="window_size"):
        tiny(window_size=-1)
    with pytest.raises(ValueError, match="global_blocks.*depth 2"):
        tiny(window_size=4, global_blocks=[2])
