"""MAE (vitlab/recipes/mae.py): masking, patchify, the encoder's view, the decoder, the loss, gradients, overfitting,
evaluation and pictures; plus the fixed 2-D sin-cos table of vitlab/layers/pos_embed.py and conf/recipe/mae.yaml."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import REPO, SyncRecorder
from vitlab.backbones import vit
from vitlab.tasks import ClassificationTask
from vitlab.layers import PatchEmbed, sincos_2d_pos_embed
from vitlab.optim import build_optimizer, no_weight_decay_names
from vitlab.recipes import MAE
from vitlab.recipes.mae import patchify, unpatchify

C = 10
BACKBONES = {                                   # name: extra vit() kwargs
    "cls_token": {},
    "avg_registers": {"global_pool": "avg", "num_registers": 2},
    "avg_no_cls": {"global_pool": "avg", "class_token": False},
}


def tiny_mae(in_chans: int = 1, seed: int = 0, **kwargs) -> MAE:
    torch.manual_seed(seed)
    bb = {k: kwargs.pop(k) for k in ("global_pool", "num_registers", "class_token") if k in kwargs}
    backbone = vit("Ti", patch_size=4, embed_dim=32, depth=2, num_heads=2, img_size=16, in_chans=in_chans, **bb)
    kwargs = {"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2, **kwargs}
    return MAE(backbone, ClassificationTask(32, C), **kwargs)


def smooth_images(n: int = 8, chans: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Low-frequency cosine patterns: a masked patch is predictable from its neighbours (noise would not be)."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        f, ph = torch.rand(3, generator=g) * 3 + 0.5, torch.rand(3, generator=g) * 2 * math.pi
        img = (torch.cos(2 * math.pi * f[0] * xs + ph[0]) + torch.cos(2 * math.pi * f[1] * ys + ph[1])
               + 0.5 * torch.cos(2 * math.pi * f[2] * (xs + ys) + ph[2]))
        out.append(img.expand(chans, size, size))
    return torch.stack(out)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- masking ---

@pytest.mark.parametrize("N, ratio", [(16, 0.75), (16, 0.5), (49, 0.75), (196, 0.75), (10, 0.0)])
def test_random_masking_keeps_exactly_len_keep(N, ratio):
    r = tiny_mae(mask_ratio=ratio)
    mask = r.random_masking(6, N)
    assert mask.shape == (6, N) and mask.dtype == torch.bool
    assert ((~mask).sum(1) == int(N * (1 - ratio))).all()


def test_samples_get_different_masks():
    mask = tiny_mae().random_masking(8, 16)
    assert len({tuple(m.tolist()) for m in mask}) == 8


def test_masking_follows_the_generator():
    r = tiny_mae()
    a = r.random_masking(4, 16, generator=torch.Generator().manual_seed(5))
    b = r.random_masking(4, 16, generator=torch.Generator().manual_seed(5))
    c = r.random_masking(4, 16, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_mask_ratio_outside_0_1_is_refused(ratio):
    with pytest.raises(ValueError, match=r"mask_ratio.*\[0, 1\)"):
        tiny_mae(mask_ratio=ratio)


def test_a_mask_that_keeps_nothing_is_refused():
    with pytest.raises(ValueError, match="keeps no patch"):
        tiny_mae(mask_ratio=0.9).random_masking(2, 4)


# ------------------------------------------------------------- patchify ---

@pytest.mark.parametrize("shape", [(2, 1, 16, 16), (3, 3, 8, 12)])
def test_patchify_unpatchify_round_trip(shape):
    x = torch.randn(*shape)
    p = patchify(x, 4)
    assert p.shape == (shape[0], (shape[2] // 4) * (shape[3] // 4), 4 * 4 * shape[1])
    assert torch.equal(unpatchify(p, 4, (shape[2] // 4, shape[3] // 4)), x)


def test_patchify_matches_patch_embed_token_order_and_mae_pixel_order():
    """Token n of patchify is the patch PatchEmbed turns into token n; its pixels are laid out (p, p, C)."""
    torch.manual_seed(0)
    pe = PatchEmbed(4, 3, 8, bias=False)
    x = torch.randn(2, 3, 8, 12)
    tokens, _ = pe(x)                                                      # (B, N, D)
    w = pe.proj.weight.permute(0, 2, 3, 1).reshape(8, -1)                 # (D, C, p, p) -> (D, p*p*C)
    torch.testing.assert_close(patchify(x, 4) @ w.T, tokens, rtol=1e-5, atol=1e-5)
    assert torch.equal(patchify(x, 4)[0, 1, :3], x[0, :, 0, 4])            # patch (0, 1), pixel (0, 0): C values


def test_patchify_refuses_a_size_the_patch_does_not_divide():
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.randn(1, 1, 10, 16), 4)


# ------------------------------------------------------------- encoder ---

@pytest.mark.parametrize("kind", list(BACKBONES))
def test_encoder_never_sees_masked_patches(kind, images):
    r = tiny_mae(**BACKBONES[kind]).eval()
    N, P = 16, r.backbone.num_prefix_tokens
    mask = r.random_masking(4, N, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latent, ids_keep = r.forward_encoder(images, mask)
        assert latent.shape == (4, P + int(N * 0.25), 32) and ids_keep.shape == (4, 4)
        assert torch.equal(ids_keep, torch.stack([(~m).nonzero().squeeze(1) for m in mask]))
        pixel_mask = r.unpatchify(mask.unsqueeze(-1).float().expand(-1, -1, 16), (4, 4)).bool()
        changed_masked = torch.where(pixel_mask, images + 5 * torch.randn_like(images), images)
        assert torch.equal(r.forward_encoder(changed_masked, mask)[0], latent), "masked pixels reached the encoder"
        changed_visible = torch.where(~pixel_mask, images + 1.0, images)
        assert not torch.allclose(r.forward_encoder(changed_visible, mask)[0], latent)


def test_latent_is_normed_by_the_backbones_norm_with_a_class_token(images):
    r = tiny_mae().eval()
    assert not r.encoder_norm.own and r.backbone.fc_norm.__class__.__name__ == "Identity"
    mask = r.random_masking(4, 16)
    with torch.no_grad():
        f = r.backbone(images, mask)
        latent, _ = r.forward_encoder(images, mask)
    torch.testing.assert_close(latent, r.backbone.norm(f["prenorm"]))
    torch.testing.assert_close(latent[:, 0], f["cls"])
    torch.testing.assert_close(latent[:, 1:], f["patch"])


def test_average_pooling_backbone_gets_the_recipes_own_norm_and_fc_norm_is_frozen():
    r = tiny_mae(global_pool="avg")
    assert r.encoder_norm.own and isinstance(r.encoder_norm.norm, torch.nn.LayerNorm)
    assert not any(p.requires_grad for p in r.backbone.fc_norm.parameters())


def test_mae_refuses_a_backbone_with_a_mask_token():
    backbone = vit("Ti", patch_size=4, embed_dim=32, depth=1, num_heads=2, img_size=16, in_chans=1,
                   use_mask_token=True)
    with pytest.raises(ValueError, match="use_mask_token"):
        MAE(backbone, ClassificationTask(32, C))


# ------------------------------------------------------------- decoder ---

def mae_sincos_reference(D: int, size: int, cls_token: bool) -> np.ndarray:
    """MAE's util/pos_embed.py get_2d_sincos_pos_embed, restated."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32))   # w goes first
    emb = np.concatenate([one_d(D // 2, grid[0]), one_d(D // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, D]), emb], axis=0) if cls_token else emb


@pytest.mark.parametrize("cls_token", [False, True])
def test_sincos_table_matches_mae(cls_token):
    pe = sincos_2d_pos_embed(16, (5, 5), cls_token)
    assert pe.shape == (1, 25 + cls_token, 16) and pe.dtype == torch.float32
    np.testing.assert_allclose(pe[0].numpy(), mae_sincos_reference(16, 5, cls_token), atol=1e-6)


def test_sincos_table_on_a_rectangular_grid_is_row_major():
    pe = sincos_2d_pos_embed(8, (2, 3), False)[0]                          # (6, 8)
    # first half encodes the column, second half the row: token (r, c) = r * 3 + c
    assert torch.equal(pe[4, :4], pe[1, :4]) and torch.equal(pe[4, 4:], pe[3, 4:])
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_pos_embed(6, (2, 2), False)


@pytest.mark.parametrize("kind", list(BACKBONES))
def test_decoder_predicts_every_patch_and_its_positions_are_fixed(kind, images):
    r = tiny_mae(**BACKBONES[kind], in_chans=1)
    mask = r.random_masking(4, 16)
    latent, ids_keep = r.forward_encoder(images, mask)
    pred = r.forward_decoder(latent, ids_keep, (4, 4))
    assert pred.shape == (4, 16, 16)
    pos = r.decoder.pos_embed
    num_cls = int(r.backbone.has_class_token)
    assert not isinstance(pos, torch.nn.Parameter) and "decoder.pos_embed" not in r.state_dict()
    assert torch.equal(pos, sincos_2d_pos_embed(32, (4, 4), cls_token=bool(num_cls)))
    full = r.decoder.positions((4, 4), latent)                            # cls slot, register zeros, grid
    assert full.shape == (1, r.backbone.num_prefix_tokens + 16, 32)
    assert torch.equal(full[0, :r.backbone.num_prefix_tokens], torch.zeros(r.backbone.num_prefix_tokens, 32))


def test_visible_tokens_are_scattered_back_to_their_grid_positions(images):
    """A decoder with no blocks and identity layers shows where each input token lands."""
    r = tiny_mae(decoder_depth=0, decoder_embed_dim=32)
    dec = r.decoder
    with torch.no_grad():
        dec.embed.weight.copy_(torch.eye(32))
        dec.embed.bias.zero_()
        dec.pos_embed.zero_()
        dec.mask_token.fill_(-7.0)
    dec.norm = torch.nn.Identity()
    dec.pred = torch.nn.Identity()
    mask = r.random_masking(2, 16)
    latent = torch.randn(2, 1 + 4, 32)
    ids_keep = torch.stack([(~m).nonzero().squeeze(1) for m in mask])
    out = r.forward_decoder(latent, ids_keep, (4, 4))                       # (B, N, 32)
    for b in range(2):
        torch.testing.assert_close(out[b, ids_keep[b]], latent[b, 1:])
        assert (out[b, mask[b]] == -7.0).all()


def test_decoder_init_is_maes_and_the_backbone_is_not_reinitialised():
    torch.manual_seed(0)
    backbone = vit("Ti", patch_size=4, embed_dim=32, depth=2, num_heads=2, img_size=16, in_chans=1)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    r = MAE(backbone, ClassificationTask(32, C), decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4)
    assert all(torch.equal(before[k], v) for k, v in r.backbone.state_dict().items())
    bound = math.sqrt(6 / (32 + 64))                                       # xavier_uniform of Linear(32, 64)
    assert r.decoder.embed.weight.abs().max() <= bound and r.decoder.embed.weight.abs().max() > 0.8 * bound
    for m in r.decoder.modules():
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            assert (m.bias == 0).all()
        if isinstance(m, torch.nn.LayerNorm):
            assert (m.weight == 1).all() and (m.bias == 0).all()
    assert 0.01 < r.decoder.mask_token.std() < 0.04
    assert "decoder.mask_token" in no_weight_decay_names(r)


def test_a_larger_image_than_the_built_grid_works():
    r = tiny_mae()
    out = r.training_step({"image": torch.randn(2, 1, 24, 24)})
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])


# ---------------------------------------------------------------- loss ---

def test_loss_counts_masked_patches_only(images):
    r = tiny_mae(norm_pix_loss=False)
    mask = r.random_masking(4, 16)
    pred = torch.randn(4, 16, 16)
    loss = r.forward_loss(images, pred, mask)
    ref = ((pred - patchify(images, 4)) ** 2).mean(-1)[mask].mean()
    torch.testing.assert_close(loss, ref)
    assert torch.equal(r.forward_loss(images, torch.where(mask.unsqueeze(-1), pred, pred + 3.0), mask), loss)
    assert not torch.equal(r.forward_loss(images, torch.where(mask.unsqueeze(-1), pred + 3.0, pred), mask), loss)


def test_loss_is_float32_under_low_precision_predictions(images):
    r = tiny_mae()
    mask = r.random_masking(4, 16)
    loss = r.forward_loss(images.bfloat16(), torch.randn(4, 16, 16).bfloat16(), mask)
    assert loss.dtype == torch.float32


def test_norm_pix_target_has_zero_mean_unit_variance_per_patch():
    x = 3 + 2 * torch.randn(2, 3, 16, 16)
    t = tiny_mae(in_chans=3, norm_pix_loss=True).target(x)
    assert t.shape == (2, 16, 48) and t.dtype == torch.float32
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(-1), torch.ones(2, 16), atol=1e-4, rtol=0)
    assert torch.equal(tiny_mae(in_chans=3, norm_pix_loss=False).target(x), patchify(x, 4))


# ------------------------------------------------------------ training ---

@pytest.mark.parametrize("kind", list(BACKBONES))
def test_training_step_gives_every_trainable_parameter_a_gradient_and_none_to_the_task(kind, images):
    r = tiny_mae(**BACKBONES[kind]).train()
    assert not any(p.requires_grad for p in r.task.parameters()), "the task is frozen"
    out = r.training_step({"image": images, "label": torch.zeros(4, dtype=torch.long)})
    assert set(out) == {"loss"} and out["loss"].ndim == 0
    out["loss"].backward()
    missing = [n for n, p in r.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"trainable parameters without a gradient (DDP would fail): {missing}"
    assert all(p.grad is None for p in r.task.parameters())


def test_recipe_attributes():
    r = tiny_mae()
    assert MAE.pretraining and r.monitor is None and r.monitor_mode == "min"
    assert r.scaled_lr(1.5e-4, 4096) == pytest.approx(1.5e-4 * 16)
    assert MAE.backbone_options({}) == {}
    assert r(torch.randn(2, 1, 16, 16)).shape == (2, C)


def test_a_tiny_mae_overfits_eight_images():
    x = smooth_images()
    r = tiny_mae().train()
    opt = build_optimizer(r, "adamw", lr=3e-3, weight_decay=0.0)
    with torch.no_grad():
        before = r.evaluation_step({"image": x})["loss"]
    for _ in range(40):
        loss = r.training_step({"image": x})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = r.evaluation_step({"image": x})["loss"]
    assert torch.isfinite(after) and after < 0.5 * before, (before, after)


def test_masking_decoder_and_loss_never_wait_for_the_device(images):
    r = tiny_mae(global_pool="avg", num_registers=1)
    with torch.no_grad():
        latent, ids_keep = r.forward_encoder(images, r.random_masking(4, 16))
    latent.requires_grad_(True)
    with SyncRecorder() as rec:
        mask = r.random_masking(4, 16, images.device)
        pred = r.forward_decoder(latent, ids_keep, (4, 4))
        r.forward_loss(images, pred, mask).backward()
    assert rec.seen == []


def test_training_step_never_waits_for_the_device(images):
    r = tiny_mae()
    with SyncRecorder() as rec:
        r.training_step({"image": images})["loss"].backward()
    assert rec.seen == []


# ---------------------------------------------------------- evaluation ---

def test_evaluation_step_is_deterministic_and_leaves_the_global_rng_alone(images):
    r = tiny_mae().eval()
    state = torch.get_rng_state()
    with torch.no_grad():
        a, b = r.evaluation_step({"image": images}), r.evaluation_step({"image": images})
    assert set(a) == {"loss"} and torch.equal(a["loss"], b["loss"])
    assert torch.equal(torch.get_rng_state(), state)
    with torch.no_grad():
        train_losses = {r.training_step({"image": images})["loss"].item() for _ in range(3)}
    assert len(train_losses) > 1, "training masks are random"


@pytest.mark.parametrize("norm_pix", [True, False])
def test_visualize_rows(norm_pix):
    r = tiny_mae(in_chans=3, norm_pix_loss=norm_pix).eval()
    x = torch.randn(10, 3, 16, 16)
    pics = r.visualize({"image": x})
    assert list(pics) == ["reconstruction"]
    original, masked, recon, pasted = pics["reconstruction"]
    for row in (original, masked, recon, pasted):
        assert row.shape == (8, 3, 16, 16) and not row.requires_grad
    assert torch.equal(original, x[:8])
    mask = r.random_masking(8, 16, generator=torch.Generator().manual_seed(0))    # the evaluation mask
    pix = r.unpatchify(mask.unsqueeze(-1).float().expand(-1, -1, 48), (4, 4)).bool()
    assert (masked[pix] == 0).all() and torch.equal(masked[~pix], x[:8][~pix])
    assert torch.equal(pasted[~pix], x[:8][~pix]) and torch.equal(pasted[pix], recon[pix])
    if norm_pix:   # un-normalised with each original patch's mean and variance, as MAE's visualisation
        with torch.no_grad():
            _, pred, _ = r._loss(x[:8], torch.Generator().manual_seed(0))
        p = patchify(x[:8], 4)
        expected = pred * (p.var(-1, keepdim=True) + 1e-6).sqrt() + p.mean(-1, keepdim=True)
        torch.testing.assert_close(recon, r.unpatchify(expected, (4, 4)))


# -------------------------------------------------------------- config ---

def test_config_lists_every_constructor_argument():
    cfg = OmegaConf.load(REPO / "conf" / "recipe" / "mae.yaml")
    assert cfg._target_ == "vitlab.recipes.MAE"
    params = set(inspect.signature(MAE).parameters) - {"backbone", "task"}
    assert set(cfg) - {"_target_"} == params
    assert cfg.monitor is None and cfg.monitor_mode == "min"
    text = (REPO / "conf" / "recipe" / "mae.yaml").read_text()
    assert "1.5e-4" in text and "reconstruction_epoch" in text
