"""vitlab's VisionTransformer: the feature dict, variants and their sizes, position handling,
token masks, stochastic depth, options, gradients and determinism. Tiny models keep it fast."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vitlab.backbones import (VARIANTS, VisionTransformer, vit, vit_base, vit_giant, vit_huge, vit_large, vit_small,
                              vit_tiny)
from vitlab.backbones.vit import parse_variant
from vitlab.layers import use_backend
from vitlab.layers.pos_embed import resample_abs_pos_embed

D, DEPTH, HEADS, IMG, PATCH = 32, 2, 2, 32, 8
GRID = (IMG // PATCH, IMG // PATCH)
N = GRID[0] * GRID[1]


def tiny(**kw) -> VisionTransformer:
    torch.manual_seed(kw.pop("seed", 0))
    args = {"img_size": IMG, "patch_size": PATCH, "embed_dim": D, "depth": DEPTH, "num_heads": HEADS}
    args.update(kw)
    m = VisionTransformer(**args)
    # Weights of unit gain and non-zero tokens, so that every part's effect is visible
    # (the trunc-normal(0.02) init makes attention nearly uniform and the tokens tiny).
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.normal_(std=mod.in_features ** -0.5)
                mod.bias.normal_(std=0.1)
        for p in (m.cls_token, m.reg_token, m.mask_token):
            if p is not None:
                p.normal_()
    return m.eval()


def images(B=2, H=IMG, W=IMG, seed=0):
    return torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(seed))


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# -------------------------------------------------------------- features ---

def test_features_class_token():
    m = tiny()
    out = m(images())
    assert set(out) == {"cls", "patch", "patch_2d", "pooled", "prenorm", "grid"}
    assert out["cls"].shape == (2, D)
    assert out["patch"].shape == (2, N, D)
    assert out["patch_2d"].shape == (2, D, *GRID)
    assert out["prenorm"].shape == (2, 1 + N, D)
    assert out["grid"] == GRID
    assert torch.equal(out["pooled"], out["cls"])
    # cls / patch are the final-normed tokens; patch_2d is patch on the grid (row-major).
    normed = F.layer_norm(out["prenorm"], (D,), m.norm.weight, m.norm.bias, eps=1e-6)
    torch.testing.assert_close(out["cls"], normed[:, 0])
    torch.testing.assert_close(out["patch"], normed[:, 1:])
    torch.testing.assert_close(out["patch_2d"][:, :, 1, 2], out["patch"][:, 1 * GRID[1] + 2])
    assert m.num_prefix_tokens == 1 and m.patch_size == PATCH and m.embed_dim == D


@pytest.mark.parametrize("class_token", [True, False])
def test_features_avg_pool(class_token):
    m = tiny(global_pool="avg", class_token=class_token)
    with torch.no_grad():
        m.fc_norm.weight.normal_()
        m.fc_norm.bias.normal_()
    out = m(images())
    P = int(class_token)
    assert ("cls" in out) == class_token
    assert out["pooled"].shape == (2, D) and out["patch"].shape == (2, N, D)
    assert out["prenorm"].shape == (2, P + N, D)
    # timm's rule: the average of the patch tokens (prefix tokens excluded), then fc_norm.
    ref = F.layer_norm(out["prenorm"][:, P:].mean(1), (D,), m.fc_norm.weight, m.fc_norm.bias, eps=1e-6)
    torch.testing.assert_close(out["pooled"], ref)


@pytest.mark.parametrize("class_token", [True, False])
@pytest.mark.parametrize("R", [1, 4])
def test_registers(R, class_token):
    m = tiny(num_registers=R, class_token=class_token, global_pool="token" if class_token else "avg")
    assert m.num_prefix_tokens == R + int(class_token)
    assert m.reg_token.shape == (1, R, D)
    # Registers get no position (Darcet et al.): the table has only the class token's row and the grid.
    assert m.pos_embed.shape == (1, int(class_token) + N, D)
    out = m(images())
    P = R + int(class_token)
    assert out["registers"].shape == (2, R, D)
    assert out["patch"].shape == (2, N, D) and out["prenorm"].shape == (2, P + N, D)
    normed = m.norm(out["prenorm"])
    torch.testing.assert_close(out["registers"], normed[:, P - R:P])
    torch.testing.assert_close(out["patch"], normed[:, P:])
    # The registers really take part: changing them changes the patch features.
    with torch.no_grad():
        m.reg_token.add_(torch.randn_like(m.reg_token))    # (a constant shift would be normed away)
    assert not torch.allclose(m(images())["patch"], out["patch"], atol=1e-4)


def test_no_registers_key_without_registers():
    assert "registers" not in tiny()(images())


def test_invalid_options():
    with pytest.raises(ValueError, match="global_pool"):
        tiny(global_pool="max")
    with pytest.raises(ValueError, match="class_token"):
        tiny(class_token=False, global_pool="token")
    with pytest.raises(ValueError, match="pos_embed"):
        tiny(pos_embed="sincos")
    with pytest.raises(ValueError, match="divisible"):
        tiny(embed_dim=30, num_heads=4)


# ------------------------------------------------------- variants & sizes ---

def test_variant_table_and_factories():
    assert set(VARIANTS) == {"Ti", "S", "B", "L", "H", "g"}
    assert parse_variant("B/16") == ("B", 16) and parse_variant("S") == ("S", None)
    with pytest.raises(ValueError, match="unknown ViT variant"):
        parse_variant("XL/16")
    with torch.device("meta"):
        for fn, (w, d, h, mlp), p in [(vit_tiny, VARIANTS["Ti"], 16), (vit_small, VARIANTS["S"], 16),
                                      (vit_base, VARIANTS["B"], 16), (vit_large, VARIANTS["L"], 16),
                                      (vit_huge, VARIANTS["H"], 14), (vit_giant, VARIANTS["g"], 14)]:
            m = fn(img_size=224)
            assert (m.embed_dim, m.depth, m.patch_size) == (w, d, p)
            assert m.blocks[0].attn.num_heads == h and m.blocks[0].mlp.fc1.out_features == mlp
        assert vit("B/32").patch_size == 32
        small = vit("Ti/8", embed_dim=64, depth=2, num_heads=4, img_size=32)
        assert (small.embed_dim, small.depth, small.patch_size, small.grid) == (64, 2, 8, (4, 4))
        assert small.blocks[0].mlp.fc1.out_features == 256                     # the row's MLP ratio, 4


TIMM_NAMES = {"Ti/16": "vit_tiny_patch16_224", "S/16": "vit_small_patch16_224",
              "B/16": "vit_base_patch16_224", "L/16": "vit_large_patch16_224"}


@pytest.mark.parametrize("variant", list(TIMM_NAMES))
def test_parameter_count_matches_timm(variant):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ours = vit(variant, img_size=224)
        ref = timm.create_model(TIMM_NAMES[variant], pretrained=False, num_classes=1000)
    assert n_params(ours) + ours.embed_dim * 1000 + 1000 == n_params(ref)


@pytest.mark.parametrize("variant, name", [("H/14", "vit_huge_patch14_224"), ("g/14", "vit_giant_patch14_224")])
def test_parameter_count_huge_and_giant_match_timm_backbone(variant, name):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ours = vit(variant, img_size=224)
        ref = timm.create_model(name, pretrained=False, num_classes=0)
    assert n_params(ours) == n_params(ref)


@pytest.mark.parametrize("variant,millions", [("Ti/16", 5.7), ("S/16", 22.1), ("B/16", 86.6),
                                              ("L/16", 304.3), ("H/14", 632.0), ("g/14", 1012.6)])
def test_parameter_counts_of_the_papers(variant, millions):
    """The sizes reported by DeiT (Ti, S), ViT (B, L, H) and Zhai et al. (g: 1011M without the head) for 224 px
    and 1000 classes."""
    with torch.device("meta"):
        m = vit(variant, img_size=224)
    assert round((n_params(m) + m.embed_dim * 1000 + 1000) / 1e6, 1) == millions


# --------------------------------------------------------- position info ---

def test_pos_embed_interpolates_to_a_new_grid():
    m = tiny()
    out = m(images(H=48, W=40))
    assert out["grid"] == (6, 5)
    assert out["patch_2d"].shape == (2, D, 6, 5) and out["patch"].shape == (2, 30, D)
    assert m.pos_embed.shape == (1, 1 + N, D)                                  # the stored table is untouched
    # Same as a model built for 48x40 whose table was resampled once, up front.
    m2 = tiny(img_size=(48, 40))
    sd = dict(m.state_dict())
    sd["pos_embed"] = resample_abs_pos_embed(m.pos_embed.detach(), (6, 5), GRID, num_prefix_tokens=1)
    m2.load_state_dict(sd)
    torch.testing.assert_close(m2(images(H=48, W=40))["patch"], out["patch"])


def test_pos_embed_is_used():
    m = tiny()
    base = m(images())["patch"]
    with torch.no_grad():
        m.pos_embed.add_(torch.randn_like(m.pos_embed))
    assert not torch.allclose(m(images())["patch"], base, atol=1e-4)


def test_no_pos_embed():
    m = tiny(pos_embed="none")
    assert m.pos_embed is None
    assert m(images(H=24, W=40))["patch_2d"].shape == (2, D, 3, 5)


def test_rope_model_runs_on_another_grid():
    m = tiny(rope=True, pos_embed="none")
    assert m.rope is not None and m.rope.head_dim == D // HEADS
    out = m(images(H=40, W=24))
    assert out["patch_2d"].shape == (2, D, 5, 3)
    # RoPE changes the result (it is applied): compare with the same weights without it.
    base = m(images())["patch"]
    m.rope = None
    assert not torch.allclose(m(images())["patch"], base, atol=1e-4)


def test_rope_is_relative_at_model_level():
    """With RoPE only (no absolute table, no class token), patch features of an image region do not
    depend on where the region sits: a 2x2-patch crop run alone equals those 4 tokens kept (MAE-style)
    from the full image, although their grid positions there start at (1, 1)."""
    m = tiny(rope=True, pos_embed="none", class_token=False, global_pool="avg")
    x = images(B=1)
    mask = torch.ones(1, N, dtype=torch.bool)
    keep = [1 * 4 + 1, 1 * 4 + 2, 2 * 4 + 1, 2 * 4 + 2]
    mask[0, keep] = False
    kept = m(x, mask=mask)
    crop = m(x[:, :, 8:24, 8:24])
    assert kept["ids_keep"].tolist() == [keep]
    torch.testing.assert_close(kept["patch"], crop["patch"], atol=1e-5, rtol=1e-5)
    # Not true without RoPE's relative positions (absolute positions differ between the two runs).
    m_abs = tiny(class_token=False, global_pool="avg")
    assert not torch.allclose(m_abs(x, mask=mask)["patch"], m_abs(x[:, :, 8:24, 8:24])["patch"], atol=1e-3)


def test_rope_with_dropped_tokens_per_sample():
    """Per-sample kept positions: each sample of a batch equals that sample run alone."""
    m = tiny(rope=True)
    x = images(B=3)
    g = torch.Generator().manual_seed(5)
    mask = torch.stack([torch.randperm(N, generator=g) < 10 for _ in range(3)])   # 10 masked, 6 kept each
    out = m(x, mask=mask)
    assert out["patch"].shape == (3, 6, D)
    for b in range(3):
        alone = m(x[b:b + 1], mask=mask[b:b + 1])
        torch.testing.assert_close(out["patch"][b:b + 1], alone["patch"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["cls"][b:b + 1], alone["cls"], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ masks ---

def _mask(B=2, n_masked=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(N, generator=g) < n_masked for _ in range(B)])


def test_mask_token_replaces_masked_patches():
    m = tiny(use_mask_token=True)
    assert m.mask_token.shape == (1, 1, D)
    x, mask = images(), _mask()
    full = m(x)
    masked = m(x, mask=mask)
    assert masked["patch"].shape == (2, N, D) and masked["patch_2d"].shape == (2, D, *GRID)
    assert "ids_keep" not in masked
    diff = (masked["patch"] - full["patch"]).abs().amax(-1)                   # (B, N)
    assert (diff[mask] > 1e-3).all()
    # An all-False mask is the same as no mask.
    torch.testing.assert_close(m(x, mask=torch.zeros(2, N, dtype=torch.bool))["patch"], full["patch"])
    # Masked patches no longer depend on their pixels: perturbing a masked patch changes nothing.
    one = torch.zeros(1, N, dtype=torch.bool)
    one[0, 5] = True                                                          # grid (1, 1): pixels 8:16, 8:16
    x2 = x[:1].clone()
    x2[:, :, 8:16, 8:16] += 10.0
    torch.testing.assert_close(m(x2, mask=one)["patch"], m(x[:1], mask=one)["patch"])
    assert not torch.allclose(m(x2)["patch"], m(x[:1])["patch"])


def test_mask_without_mask_token_drops_tokens():
    m = tiny()
    x, mask = images(), _mask(n_masked=6)
    out = m(x, mask=mask)
    assert "token_valid" not in out                             # equal counts: no padding, no key mask
    assert out["patch"].shape == (2, N - 6, D)
    assert out["prenorm"].shape == (2, 1 + N - 6, D)
    assert "patch_2d" not in out
    ids = out["ids_keep"]
    assert ids.shape == (2, N - 6)
    for b in range(2):
        assert ids[b].tolist() == torch.nonzero(~mask[b]).flatten().tolist()


def test_dropped_tokens_keep_their_own_positions():
    """With no blocks, each kept token's feature is that of the full run: the right patch and position."""
    m = tiny(depth=0)
    x, mask = images(), _mask(n_masked=9)
    full, kept = m(x), m(x, mask=mask)
    ids = kept["ids_keep"]
    torch.testing.assert_close(kept["patch"], torch.gather(full["patch"], 1, ids.unsqueeze(-1).expand(-1, -1, D)))
    torch.testing.assert_close(kept["cls"], full["cls"])


def test_mask_errors():
    m = tiny()
    with pytest.raises(ValueError, match=r"mask must be \(B, N\) = \(2, 16\), got \(2, 15\)"):
        m(images(), mask=torch.zeros(2, N - 1, dtype=torch.bool))


# ----------------------------------------------- uneven kept-token counts ---

KEPT = (6, 12, 9)                                   # patches kept per sample, out of N = 16


def _uneven_mask(seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(N, generator=g) >= n for n in KEPT])        # True = masked


@pytest.mark.parametrize("pool,class_token", [("token", True), ("avg", True), ("avg", False)])
def test_uneven_kept_counts_equal_each_sample_alone(pool, class_token):
    """MAE-style dropping with different counts per sample: padded to the largest, run with a key padding
    mask, each sample's features equal that sample run alone (registers and RoPE on)."""
    m = tiny(rope=True, num_registers=2, global_pool=pool, class_token=class_token)
    x, mask = images(B=3), _uneven_mask()
    out = m(x, mask=mask)
    n_max = max(KEPT)
    assert out["patch"].shape == (3, n_max, D) and out["ids_keep"].shape == (3, n_max)
    assert out["token_valid"].sum(1).tolist() == list(KEPT) and "patch_2d" not in out
    for b, n in enumerate(KEPT):
        alone = m(x[b:b + 1], mask=mask[b:b + 1])
        assert "token_valid" not in alone                       # one sample: the equal-count path
        assert out["token_valid"][b].tolist() == [True] * n + [False] * (n_max - n)
        assert out["ids_keep"][b, :n].tolist() == alone["ids_keep"][0].tolist()
        assert torch.all(out["ids_keep"][b, n:] == 0) and torch.all(out["patch"][b, n:] == 0)
        torch.testing.assert_close(out["patch"][b:b + 1, :n], alone["patch"], atol=1e-5, rtol=1e-5)
        for key in ("pooled", "registers") + (("cls",) if class_token else ()):
            torch.testing.assert_close(out[key][b:b + 1], alone[key], atol=1e-5, rtol=1e-5, msg=key)
        P = m.num_prefix_tokens
        torch.testing.assert_close(out["prenorm"][b:b + 1, :P + n], alone["prenorm"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["math", "sdpa_flash"])
def test_uneven_kept_counts_on_other_backends(backend):
    m = tiny(rope=True, global_pool="avg")
    x, mask = images(B=3), _uneven_mask(seed=6)
    ref = m(x, mask=mask)
    with use_backend(backend):
        out = m(x, mask=mask)
    for key in ("patch", "pooled", "cls"):
        torch.testing.assert_close(out[key], ref[key], atol=1e-5, rtol=1e-5, msg=key)


def test_uneven_kept_counts_backward_ignores_padding():
    """Gradients reach the kept patches only; the pixels of a padded slot's stand-in (patch 0) get none
    from it, so a sample whose patch 0 is masked has a zero gradient on those pixels."""
    m = tiny(global_pool="avg").train()
    mask = _uneven_mask()
    mask[0, 0] = True                                           # sample 0 (padded) masks patch 0
    x = images(B=3).requires_grad_(True)
    out = m(x, mask=mask)
    (out["pooled"].pow(2).sum() + out["patch"].sum()).backward()
    assert torch.all(x.grad[0, :, :PATCH, :PATCH] == 0)
    assert x.grad[0].abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# ----------------------------------------------------- options & training ---

def test_stochastic_depth_rates_increase_linearly():
    m = tiny(depth=5, drop_path_rate=0.2)
    rates = [(b.drop_path1.p, b.drop_path2.p) for b in m.blocks]
    for i, (p1, p2) in enumerate(rates):
        assert p1 == p2
        assert p1 == pytest.approx(0.2 * i / 4)
    assert rates[0][0] == 0.0 and rates[-1][0] == pytest.approx(0.2)


def test_qk_norm_and_layer_scale_parameters():
    m = tiny(qk_norm=True, layer_scale_init=0.1)
    names = dict(m.named_parameters())
    for i in range(DEPTH):
        for n in ("attn.q_norm.weight", "attn.q_norm.bias", "attn.k_norm.weight", "attn.k_norm.bias"):
            assert names[f"blocks.{i}.{n}"].shape == (D // HEADS,)
        for n in ("ls1.gamma", "ls2.gamma"):
            torch.testing.assert_close(names[f"blocks.{i}.{n}"].detach(), torch.full((D,), 0.1))
    plain = dict(tiny().named_parameters())
    assert not any("q_norm" in n or "gamma" in n for n in plain)
    # They act: QK-norm changes the attention, LayerScale scales the residual branches.
    x = images()
    base = m(x)["patch"]
    with torch.no_grad():
        m.blocks[0].attn.q_norm.weight.mul_(3.0)
    assert not torch.allclose(m(x)["patch"], base, atol=1e-4)
    with torch.no_grad():
        for b in m.blocks:
            b.ls1.gamma.zero_()
            b.ls2.gamma.zero_()
    # Zero LayerScale: every block is the identity, so prenorm is the embedded input.
    m0 = tiny(depth=0)
    m0.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("blocks.")})
    torch.testing.assert_close(m(x)["prenorm"], m0(x)["prenorm"])


@pytest.mark.parametrize("kw", [{}, {"num_registers": 2, "qk_norm": True, "layer_scale_init": 1e-2},
                                {"global_pool": "avg", "rope": True}])
def test_backward_reaches_every_parameter(kw):
    m = tiny(**kw).train()
    out = m(images())
    loss = out["pooled"].pow(2).sum() + out["patch"].mean()
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert m.patch_embed.proj.weight.grad.abs().sum() > 0


def test_backward_through_mask_token():
    m = tiny(use_mask_token=True).train()
    m(images(), mask=_mask())["patch"].sum().backward()
    assert m.mask_token.grad is not None and m.mask_token.grad.abs().sum() > 0


def test_eval_is_deterministic_train_is_stochastic():
    m = tiny(drop_path_rate=0.5, drop_rate=0.1, attn_drop_rate=0.1)
    x = images(B=4)
    a, b = m(x), m(x)
    for k in ("cls", "patch", "pooled", "prenorm"):
        assert torch.equal(a[k], b[k]), k
    m.train()
    torch.manual_seed(0)
    c = m(x)["patch"]
    torch.manual_seed(1)
    assert not torch.allclose(c, m(x)["patch"])


@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_blocks_route_through_the_attention_switch(backend):
    m = tiny(num_registers=1, rope=True)
    x = images()
    with use_backend("math"):
        ref = m(x)
    with use_backend(backend):
        out = m(x)
    torch.testing.assert_close(out["patch"], ref["patch"], atol=1e-5, rtol=1e-5)


def test_no_weight_decay_names():
    assert tiny().no_weight_decay() == {"pos_embed", "cls_token"}
    assert tiny(num_registers=2, use_mask_token=True).no_weight_decay() == {
        "pos_embed", "cls_token", "reg_token", "mask_token"}
    assert tiny(pos_embed="none", class_token=False, global_pool="avg").no_weight_decay() == set()


def test_init():
    torch.manual_seed(0)
    m = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=64, depth=2, num_heads=4)
    lin = m.blocks[0].mlp.fc1
    assert lin.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
    assert m.pos_embed.std().item() == pytest.approx(0.02, rel=0.2)
    assert m.cls_token.abs().max() < 1e-4


# ------------------------------------------------- activation checkpointing ---

class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages that ops allocated under this mode and that are still alive.

    Every op's outputs are seen at the dispatcher, below autograd and checkpointing, and each new storage
    is followed by a weak reference: what is alive is what something (the autograd graph, checkpoint's
    saved inputs, the caller) still holds, whoever holds it. Views and in-place results share their
    input's storage and are not counted again; storages that existed before (parameters) are not counted.
    (saved_tensors_hooks would not do: inside a non-reentrant checkpoint its hooks replace the outer ones,
    so what checkpoint keeps for the recomputation is never seen, and saved parameters are counted.)
    """

    def __init__(self):
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {StorageWeakRef(t.untyped_storage()).cdata for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                known = self.storages.get(ref.cdata)
                if ref.cdata not in inputs and (known is None or known[0].expired()):
                    self.storages[ref.cdata] = (ref, t.untyped_storage().nbytes())
        self.peak = max(self.peak, self.live())
        return out

    def live(self) -> int:
        return sum(n for ref, n in self.storages.values() if not ref.expired())


def test_live_bytes_tracker_counts_what_is_held():
    with LiveTensorBytes() as tracker:
        a = torch.ones(1000)                                   # 4000 bytes, held
        b = torch.ones(500)                                    # 2000 bytes, freed below
        view = a[:10]                                          # shares a's storage: not counted again
        a.add_(1)                                              # in place: nothing new
        assert tracker.live() == 6000
        del b
        assert tracker.live() == 4000
        held = [torch.zeros(250)]                              # 1000 bytes, held by a list
        assert tracker.live() == 5000 and tracker.peak == 6000
    del view, held


def _train_step(m, x, seed=0):
    torch.manual_seed(seed)
    out = m(x)
    # A fixed random readout: the normed features' plain sum of squares would be a constant.
    w = torch.randn(D, 3, generator=torch.Generator().manual_seed(9))
    loss = (out["pooled"] @ w).pow(2).mean() + (out["patch"] @ w).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("kw", [{}, {"drop_path_rate": 0.3, "drop_rate": 0.1, "attn_drop_rate": 0.1,
                                     "num_registers": 1, "rope": True}], ids=["plain", "stochastic"])
def test_grad_checkpointing_gives_the_same_loss_and_grads(kw):
    """Checkpointed blocks recompute in backward with the same random draws: identical results."""
    ref_model = tiny(**kw).train()
    ckpt_model = tiny(**kw).train()
    ckpt_model.set_grad_checkpointing()
    assert ckpt_model.grad_checkpointing and not ref_model.grad_checkpointing
    x = images(B=4)
    ref_loss, ref_grads = _train_step(ref_model, x)
    loss, grads = _train_step(ckpt_model, x)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    if kw:                                       # the draws matter: another seed gives another loss
        assert not torch.allclose(_train_step(ref_model, x, seed=1)[0], ref_loss)


def test_grad_checkpointing_recomputes_blocks_only_when_grads_are_on(monkeypatch):
    vit_mod = importlib.import_module("vitlab.backbones.vit")
    calls = []
    block_forward = vit_mod.Block.forward

    def counting_forward(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return block_forward(self, *args, **kwargs)

    monkeypatch.setattr(vit_mod.Block, "forward", counting_forward)   # (module hooks do not fire on recompute)
    m = tiny(grad_checkpointing=True).train()
    out = m(images())
    assert len(calls) == DEPTH
    (out["patch"] ** 2).sum().backward()
    assert len(calls) == 2 * DEPTH                 # each block once more in the backward pass
    calls.clear()
    with torch.no_grad():
        m(images())
    assert len(calls) == DEPTH
    m.set_grad_checkpointing(False)
    calls.clear()
    (m(images())["patch"] ** 2).sum().backward()
    assert len(calls) == DEPTH


def test_grad_checkpointing_holds_less_activation_memory():
    """Bytes kept alive for the backward pass after the forward: checkpointing keeps each block's input only."""
    kept = {}
    for enable in (False, True):
        m = tiny(depth=4, grad_checkpointing=enable).train()
        x = images(B=4)
        with LiveTensorBytes() as tracker:
            out = m(x)
            kept[enable] = tracker.live()
            (out["pooled"].pow(2).sum()).backward()
    assert kept[True] < 0.25 * kept[False], kept


def test_grad_checkpointing_with_uneven_kept_counts():
    ref_model, ckpt_model = tiny(rope=True), tiny(rope=True, grad_checkpointing=True)
    x, mask = images(B=3), _uneven_mask()
    for m in (ref_model, ckpt_model):
        m.train()
        out = m(x, mask=mask)
        (out["pooled"].pow(2).sum() + out["patch"].sum()).backward()
    for (name, p), q in zip(ref_model.named_parameters(), ckpt_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_compiled_vit_matches_eager():
    """torch.compile (inductor) of a checkpointed ViT: the same features and grads as eager. ~30 s on CPU."""
    m = tiny(rope=True, num_registers=1, grad_checkpointing=True).train()
    x = images()
    ref_loss, ref_grads = _train_step(m, x)
    m.zero_grad()
    compiled = torch.compile(m)
    loss, _ = _train_step(compiled, x)
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-4)
    for name, p in m.named_parameters():                  # the compiled wrapper trains the same parameters
        torch.testing.assert_close(p.grad, ref_grads[name], atol=1e-4, rtol=1e-3, msg=name)


# ------------------------------------------------------ distillation token ---

def distilled(**kw) -> VisionTransformer:
    """tiny() with DeiT's distillation token, set to non-zero values like the other tokens."""
    m = tiny(distill_token=True, **kw)
    with torch.no_grad():
        m.dist_token.normal_()
    return m


def test_distill_token_shapes_and_feature():
    m = distilled()
    assert m.num_prefix_tokens == 2 and m.num_pos_prefix == 2
    assert m.pos_embed.shape == (1, 2 + N, D)                      # rows: cls, dist, patches
    out = m(images())
    assert set(out) == {"cls", "dist", "patch", "patch_2d", "pooled", "prenorm", "grid"}
    assert out["dist"].shape == (2, D) and out["patch"].shape == (2, N, D)
    assert out["prenorm"].shape == (2, 2 + N, D)
    normed = m.norm(out["prenorm"])
    torch.testing.assert_close(out["cls"], normed[:, 0])
    torch.testing.assert_close(out["dist"], normed[:, 1])
    torch.testing.assert_close(out["patch"], normed[:, 2:])
    torch.testing.assert_close(out["pooled"], out["cls"])         # the class token stays the representation
    assert not torch.allclose(out["dist"], out["cls"], atol=1e-3)


def test_distill_token_order_with_registers():
    m = distilled(num_registers=3)
    assert m.num_prefix_tokens == 5 and m.num_pos_prefix == 2     # registers get no position
    out = m(images())
    normed = m.norm(out["prenorm"])
    torch.testing.assert_close(out["dist"], normed[:, 1])
    torch.testing.assert_close(out["registers"], normed[:, 2:5])
    torch.testing.assert_close(out["patch"], normed[:, 5:])


def test_distill_token_gets_its_own_position():
    m = distilled(depth=0)
    x, grid = m.patch_embed(images())
    tokens = m._pos_embed(x, grid)                                 # (B, 2 + N, D)
    pos = m.pos_embed
    torch.testing.assert_close(tokens[:, 0], (m.cls_token + pos[:, :1]).expand(2, -1, -1)[:, 0])
    torch.testing.assert_close(tokens[:, 1], (m.dist_token + pos[:, 1:2]).expand(2, -1, -1)[:, 0])
    torch.testing.assert_close(tokens[:, 2:], x + pos[:, 2:])
    # class_pos_embed=False: no prefix token has a position row
    m2 = distilled(depth=0, class_pos_embed=False)
    assert m2.num_pos_prefix == 0 and m2.pos_embed.shape == (1, N, D)
    tokens = m2._pos_embed(x, grid)
    torch.testing.assert_close(tokens[:, 1], m2.dist_token.expand(2, -1, -1)[:, 0])
    torch.testing.assert_close(tokens[:, 2:], x + m2.pos_embed)


def test_distill_token_position_resamples_to_another_grid():
    m = distilled()
    out = m(images(H=48, W=40))
    assert out["grid"] == (6, 5) and out["dist"].shape == (2, D) and out["patch"].shape == (2, 30, D)
    # Same as a model built for 48x40 whose table was resampled once, with both prefix rows kept as they are.
    m2 = distilled(img_size=(48, 40))
    sd = dict(m.state_dict())
    sd["pos_embed"] = resample_abs_pos_embed(m.pos_embed.detach(), (6, 5), GRID, num_prefix_tokens=2)
    m2.load_state_dict(sd)
    ref = m2(images(H=48, W=40))
    torch.testing.assert_close(ref["dist"], out["dist"])
    torch.testing.assert_close(ref["patch"], out["patch"])


def test_distill_token_state_dict_params_and_no_weight_decay():
    plain, dist = tiny(), distilled()
    assert set(dist.state_dict()) - set(plain.state_dict()) == {"dist_token"}
    assert n_params(dist) - n_params(plain) == D + D               # the token and its position row
    assert dist.no_weight_decay() == {"pos_embed", "cls_token", "dist_token"}
    # the default builds no token: the same model as before
    assert tiny(distill_token=False).state_dict().keys() == plain.state_dict().keys()
    assert plain.dist_token is None and plain.num_prefix_tokens == 1 and "dist" not in plain(images())


def test_distill_token_init_and_gradient():
    torch.manual_seed(0)
    m = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=256, depth=1, num_heads=4, distill_token=True)
    assert 0.015 < m.dist_token.std().item() < 0.025                # trunc-normal(0.02), as timm
    m = distilled().train()
    m(images())["dist"].sum().backward()
    assert m.dist_token.grad is not None and m.dist_token.grad.abs().sum() > 0
    assert m.pos_embed.grad[:, 1].abs().sum() > 0


def test_distill_token_with_dropped_tokens():
    m = distilled()
    x, mask = images(), _mask(n_masked=6)
    out = m(x, mask=mask)
    assert out["prenorm"].shape == (2, 2 + N - 6, D) and out["patch"].shape == (2, N - 6, D)
    m0 = distilled(depth=0)
    full, kept = m0(x), m0(x, mask=mask)
    torch.testing.assert_close(kept["dist"], full["dist"])        # no blocks: the prefix is untouched by masking


def test_distill_token_needs_a_class_token():
    with pytest.raises(ValueError, match="class_token=True"):
        tiny(distill_token=True, class_token=False, global_pool="avg")


def test_distilled_timm_deit_converts_to_the_same_logits(tmp_path):
    """timm's VisionTransformerDistilled -> vitlab ViT with a distillation token + both heads: timm's logits
    (the mean of the two heads), from a state dict and through load_timm_weights from a file."""
    from timm.models.deit import VisionTransformerDistilled

    from vitlab.backbones.convert import convert_timm_vit, load_timm_weights
    from vitlab.tasks.classification import ClassificationHead

    torch.manual_seed(0)
    t = VisionTransformerDistilled(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS,
                                   num_classes=5).eval()
    with torch.no_grad():
        for name in ("cls_token", "dist_token", "pos_embed"):
            getattr(t, name).normal_()
        t.head.bias.normal_()
        t.head_dist.bias.normal_()
    x = images()
    with torch.no_grad():
        ref = t(x)
    for class_pos_embed in (True, False):                          # False: the position rows fold into the tokens
        ours = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS,
                                 distill_token=True, class_pos_embed=class_pos_embed).eval()
        head, dist_head = ClassificationHead(D, 5).eval(), torch.nn.Linear(D, 5)
        bb, heads = convert_timm_vit(t.state_dict(), ours)
        assert set(heads) == {"fc.weight", "fc.bias", "dist_head.weight", "dist_head.bias"}
        ours.load_state_dict(bb)
        head.load_state_dict({k: v for k, v in heads.items() if k.startswith("fc.")})
        dist_head.load_state_dict({k[len("dist_head."):]: v for k, v in heads.items() if k.startswith("dist_head.")})
        with torch.no_grad():
            f = ours(x)
            got = (head(f) + dist_head(f["dist"])) / 2
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    path = tmp_path / "deit_distilled.pth"
    torch.save({"model": t.state_dict()}, path)
    ours = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS,
                             distill_token=True).eval()
    head, dist_head = ClassificationHead(D, 5).eval(), torch.nn.Linear(D, 5)
    load_timm_weights(ours, str(path), head=head, dist_head=dist_head)
    with torch.no_grad():
        f = ours(x)
        torch.testing.assert_close((head(f) + dist_head(f["dist"])) / 2, ref, atol=1e-4, rtol=1e-4)
    # A plain ViT still refuses the distilled weights, naming the fix.
    with pytest.raises(ValueError, match="distill_token=True"):
        convert_timm_vit(t.state_dict(), tiny())


def test_plain_timm_vit_loads_into_a_distilled_vit(tmp_path):
    """Fine-tuning a DeiT student from plain ViT weights: everything but the distillation token is loaded."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from vitlab.backbones.convert import load_timm_weights

    torch.manual_seed(0)
    t = TimmViT(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS, num_classes=5)
    path = tmp_path / "vit.pth"
    torch.save(t.state_dict(), path)
    ours = distilled()
    token = ours.dist_token.detach().clone()
    load_timm_weights(ours, str(path))
    assert torch.equal(ours.dist_token, token)
    torch.testing.assert_close(ours.pos_embed[:, 0], t.pos_embed[:, 0].detach())
    assert torch.equal(ours.pos_embed[:, 1], torch.zeros_like(ours.pos_embed[:, 1]))
    torch.testing.assert_close(ours.pos_embed[:, 2:], t.pos_embed[:, 1:].detach())


# ------------------------------------------------------------ the contract ---

@pytest.mark.parametrize("kw", [{}, {"global_pool": "avg", "class_token": False, "num_registers": 2},
                                {"distill_token": True, "use_mask_token": True, "layer_scale_init": 1e-5},
                                {"window_size": 2, "global_blocks": [1], "out_indices": 2}])
def test_the_vit_keeps_the_backbone_contract(kw):
    from tests.contracts import check_backbone

    m = vit("Ti", patch_size=4, embed_dim=32, depth=2, num_heads=2, img_size=16, in_chans=3, **kw)
    check_backbone(m, torch.randn(2, 3, 16, 16))
    assert m.num_layers == 2 and m.fsdp_units() == list(m.blocks)
    assert m.layer_id("cls_token" if m.has_class_token else "pos_embed") == 0 and m.layer_id("blocks.1.mlp.fc1.bias") == 2
    assert m.mask_mode == ("replace" if kw.get("use_mask_token") else "drop")
    assert (m.token_norm() is m.norm) == (m.global_pool == "token") and (m.pool_norm() is m.fc_norm) == \
        (m.global_pool == "avg")
