"""SimMIM (vitlab/recipes/simmim.py): block masking, the encoder's mask token, the L1 loss on masked pixels,
gradients, evaluation, pictures, the build wiring (backbone_options) and conf/recipe/simmim.yaml."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import CONF, REPO
from tests.recipes.test_mae import SyncRecorder, smooth_images
from vitlab.backbones import vit
from vitlab.tasks import ClassificationTask
from vitlab.data.base import DataInfo
from vitlab.lit.build import build_recipe
from vitlab.optim import build_optimizer
from vitlab.recipes import SimMIM

C = 10


def tiny_simmim(in_chans: int = 1, img_size: int = 16, seed: int = 0, global_pool: str = "token",
                **kwargs) -> SimMIM:
    torch.manual_seed(seed)
    backbone = vit("Ti", patch_size=4, embed_dim=32, depth=2, num_heads=2, img_size=img_size, in_chans=in_chans,
                   global_pool=global_pool, **SimMIM.backbone_options({}))
    return SimMIM(backbone, ClassificationTask(32, C), **kwargs)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- masking ---

@pytest.mark.parametrize("img, mask_patch_size, ratio, scale", [
    (16, None, 0.6, 2),      # default: 2 x the patch size (the 4x4 grid divides by 2): 4 blocks, 3 masked
    (16, 4, 0.6, 1),         # one patch per block: 16 blocks, 10 masked
    (32, 16, 0.5, 4),        # 4x4-patch blocks on an 8x8 grid
    (12, None, 0.6, 1),      # a 3x3 grid does not divide by 2: the default falls back to the patch size
    (16, 8, 0.7, 2),         # 0.7 x 4 blocks = 2.8 -> 3
])
def test_block_masks_mask_whole_blocks_and_exactly_ceil_ratio_of_them(img, mask_patch_size, ratio, scale):
    r = tiny_simmim(img_size=img, mask_patch_size=mask_patch_size, mask_ratio=ratio)
    h = img // 4
    assert r.mask_scale((h, h)) == scale
    mask = r.random_masking(6, (h, h))
    assert mask.shape == (6, h * h) and mask.dtype == torch.bool
    n_blocks = (h // scale) ** 2
    blocks = mask.reshape(6, h // scale, scale, h // scale, scale)
    assert (blocks == blocks[:, :, :1, :, :1]).all(), "every block is all masked or all visible"
    assert (blocks[:, :, 0, :, 0].reshape(6, -1).sum(1) == math.ceil(n_blocks * ratio - 1e-9)).all()


def test_ceil_is_not_fooled_by_floating_point():
    r = tiny_simmim(img_size=40, mask_patch_size=4, mask_ratio=0.7)         # 0.7 * 100 = 70.00000000000001
    assert ((r.random_masking(2, (10, 10))).sum(1) == 70).all()


def test_samples_get_different_masks_and_the_generator_decides():
    r = tiny_simmim(mask_patch_size=4)
    assert len({tuple(m.tolist()) for m in r.random_masking(8, (4, 4))}) == 8
    a = r.random_masking(4, (4, 4), generator=torch.Generator().manual_seed(3))
    b = r.random_masking(4, (4, 4), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, r.random_masking(4, (4, 4), generator=torch.Generator()
                                                                     .manual_seed(4)))


def test_bad_mask_patch_sizes_are_refused():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny_simmim(mask_patch_size=6)
    r = tiny_simmim(img_size=24, mask_patch_size=16)                        # 16 px blocks on a 24 px image
    with pytest.raises(ValueError, match="does not tile"):
        r.random_masking(2, (6, 6))
    with pytest.raises(ValueError, match="mask_ratio"):
        tiny_simmim(mask_ratio=1.0)


# ------------------------------------------------------------ mask token ---

def test_backbone_options_ask_for_a_mask_token_and_the_build_passes_them():
    assert SimMIM.backbone_options({"mask_ratio": 0.6}) == {"use_mask_token": True}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["recipe=simmim", "data.img_size=32", "backbone.variant=Ti/8"])
    r = build_recipe(cfg, DataInfo(num_classes=10, in_chans=1))
    assert isinstance(r, SimMIM) and r.backbone.mask_token is not None


def test_simmim_refuses_a_backbone_without_a_mask_token():
    backbone = vit("Ti", patch_size=4, embed_dim=32, depth=1, num_heads=2, img_size=16, in_chans=1)
    with pytest.raises(ValueError, match="use_mask_token=True"):
        SimMIM(backbone, ClassificationTask(32, C))


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_encoder_replaces_masked_patches_by_its_mask_token(global_pool, images):
    r = tiny_simmim(global_pool=global_pool).eval()
    mask = r.random_masking(4, (4, 4), generator=torch.Generator().manual_seed(0))
    pix = r.pixel_mask(mask, (4, 4)).bool()
    with torch.no_grad():
        tokens = r.forward_encoder(images, mask)
        assert tokens.shape == (4, 16, 32)
        # the masked pixels never reach the encoder: the mask token stands in for them
        assert torch.equal(r.forward_encoder(torch.where(pix, images + 5 * torch.randn_like(images), images), mask),
                           tokens)
        # and the output depends on the mask and on the token's value
        assert not torch.allclose(r.forward_encoder(images, torch.zeros_like(mask)), tokens)
        r.backbone.mask_token.add_(1.0)
        assert not torch.allclose(r.forward_encoder(images, mask), tokens)


def test_patch_tokens_are_normed():
    r = tiny_simmim(global_pool="avg")
    assert r.encoder_norm.own and not any(p.requires_grad for p in r.backbone.fc_norm.parameters())
    t = tiny_simmim(global_pool="token")
    assert not t.encoder_norm.own
    x = torch.randn(2, 1, 16, 16)
    mask = t.random_masking(2, (4, 4))
    with torch.no_grad():
        torch.testing.assert_close(t.forward_encoder(x, mask), t.backbone.norm(t.backbone(x, mask)["prenorm"])[:, 1:])


# ---------------------------------------------------------------- loss ---

def test_l1_counts_masked_pixels_only_with_simmims_normalisation():
    r = tiny_simmim(in_chans=3)
    x = torch.randn(2, 3, 16, 16)
    mask = r.random_masking(2, (4, 4))
    rec = torch.randn(2, 3, 16, 16)
    loss = r.forward_loss(x, rec, mask)
    m = r.pixel_mask(mask, (4, 4))                                         # (B, 1, H, W)
    assert m.shape == (2, 1, 16, 16) and m.sum() == mask.sum() * 16
    ref = (F.l1_loss(rec, x, reduction="none") * m).sum() / (m.sum() + 1e-5) / 3
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(loss, (rec - x).abs()[m.bool().expand_as(x)].mean(), rtol=1e-5, atol=1e-6)
    assert torch.equal(r.forward_loss(x, torch.where(m.bool(), rec, rec + 2.0), mask), loss)
    assert not torch.equal(r.forward_loss(x, torch.where(m.bool(), rec + 2.0, rec), mask), loss)
    assert r.forward_loss(x.bfloat16(), rec.bfloat16(), mask).dtype == torch.float32


def test_decoder_is_one_linear_map_per_patch(images):
    r = tiny_simmim(in_chans=3)
    assert isinstance(r.decoder, torch.nn.Linear) and r.decoder.out_features == 4 * 4 * 3
    tokens = torch.randn(2, 16, 32)
    rec = r.forward_decoder(tokens, (4, 4))
    assert rec.shape == (2, 3, 16, 16)
    # patch (1, 2) of the picture is decoded from token 1 * 4 + 2 alone
    torch.testing.assert_close(rec[:, :, 4:8, 8:12], r.forward_decoder(tokens[:, 6:7], (1, 1)))


# ------------------------------------------------------------ training ---

@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_training_step_gives_every_trainable_parameter_a_gradient_and_none_to_the_task(global_pool, images):
    r = tiny_simmim(global_pool=global_pool).train()
    assert not any(p.requires_grad for p in r.task.parameters())
    out = r.training_step({"image": images})
    assert set(out) == {"loss"} and out["loss"].ndim == 0
    out["loss"].backward()
    missing = [n for n, p in r.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"trainable parameters without a gradient (DDP would fail): {missing}"
    assert r.backbone.mask_token.grad.abs().sum() > 0


def test_training_step_never_waits_for_the_device(images):
    r = tiny_simmim()
    with SyncRecorder() as rec:
        r.training_step({"image": images})["loss"].backward()
    assert rec.seen == []


def test_a_tiny_simmim_learns():
    """The L1 loss on raw pixels falls more slowly than MAE's (about 0.94 -> 0.79 here): a sanity check only."""
    x = smooth_images()
    r = tiny_simmim(mask_patch_size=4).train()
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
    assert torch.isfinite(after) and after < 0.9 * before, (before, after)


def test_recipe_attributes():
    r = tiny_simmim()
    assert SimMIM.pretraining and r.monitor is None and r.monitor_mode == "min"
    assert r.scaled_lr(1e-4, 2048) == pytest.approx(4e-4)
    assert r(torch.randn(2, 1, 16, 16)).shape == (2, C)


# ---------------------------------------------------------- evaluation ---

def test_evaluation_step_is_deterministic(images):
    r = tiny_simmim().eval()
    state = torch.get_rng_state()
    with torch.no_grad():
        a, b = r.evaluation_step({"image": images}), r.evaluation_step({"image": images})
    assert set(a) == {"loss"} and torch.equal(a["loss"], b["loss"])
    assert torch.equal(torch.get_rng_state(), state)


def test_visualize_rows():
    r = tiny_simmim(in_chans=3).eval()
    x = torch.randn(10, 3, 16, 16)
    original, masked, recon, pasted = r.visualize({"image": x})["reconstruction"]
    for row in (original, masked, recon, pasted):
        assert row.shape == (8, 3, 16, 16) and not row.requires_grad
    mask = r.random_masking(8, (4, 4), generator=torch.Generator().manual_seed(0))
    pix = r.pixel_mask(mask, (4, 4)).bool().expand(-1, 3, -1, -1)
    assert torch.equal(original, x[:8])
    assert (masked[pix] == 0).all() and torch.equal(masked[~pix], x[:8][~pix])
    assert torch.equal(pasted[~pix], x[:8][~pix]) and torch.equal(pasted[pix], recon[pix])


# -------------------------------------------------------------- config ---

def test_config_lists_every_constructor_argument():
    cfg = OmegaConf.load(REPO / "conf" / "recipe" / "simmim.yaml")
    assert cfg._target_ == "vitlab.recipes.SimMIM"
    assert set(cfg) - {"_target_"} == set(inspect.signature(SimMIM).parameters) - {"backbone", "task"}
    assert cfg.monitor is None and cfg.monitor_mode == "min" and cfg.mask_patch_size is None
    assert "reconstruction_epoch" in (REPO / "conf" / "recipe" / "simmim.yaml").read_text()
