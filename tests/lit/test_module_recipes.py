"""The Lightning module driving recipes, SAM and the EMA (no Hydra): SAM with gradient accumulation equals SAM on the
whole batch, SAM never waits for the device, the EMA follows the optimizer steps and is what validation scores,
pretraining recipes report no top-k, and pretrained backbones load across image sizes."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

from vitlab.backbones import vit
from vitlab.data import Digits
from vitlab.tasks import ClassificationTask
from vitlab.lit.datamodule import VitlabDataModule
from vitlab.lit.host_sync import HostSyncGuard
from vitlab.lit.module import VitlabModule
from vitlab.optim import build_optimizer
from vitlab.optim.sam import SAM
from vitlab.recipes import MAE, Supervised


def _module(optimizer_factory, recipe_cls=Supervised, ema=None, **recipe_kwargs) -> VitlabModule:
    pl.seed_everything(0, verbose=False)
    recipe = recipe_cls(vit("Ti", patch_size=4, embed_dim=32, depth=2, num_heads=2, img_size=16, in_chans=1),
                        ClassificationTask(32, 10), **recipe_kwargs)
    return VitlabModule(recipe, optimizer_factory=optimizer_factory, config={},
                        data_info={"num_classes": 10, "in_chans": 1}, ema=ema)


def _fit(module: VitlabModule, tmp_path, batch_size: int, batches: int, callbacks=(), **trainer_kwargs):
    dm = VitlabDataModule(Digits(), img_size=16, batch_size=batch_size, augment={"policy": "none"})
    kwargs = dict(max_epochs=1, limit_train_batches=batches, limit_val_batches=1, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  num_sanity_val_steps=0, accelerator="cpu", devices=1, use_distributed_sampler=False,
                  default_root_dir=str(tmp_path))
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=list(callbacks), **kwargs)
    trainer.fit(module, datamodule=dm)
    return trainer


SAM_SGD = functools.partial(build_optimizer, name="sam", base="sgd", lr=0.5, momentum=0.0, weight_decay=0.0,
                            rho=0.5)


def test_sam_with_accumulation_equals_sam_on_the_whole_batch(tmp_path):
    """2 micro-batches of 8 accumulated = one batch of 16, for both of SAM's passes: the perturbation uses the
    accumulated gradient, and the second pass replays the first micro-batch at the perturbed weights."""
    whole = _module(SAM_SGD)
    _fit(whole, tmp_path / "whole", batch_size=16, batches=2)
    accumulated = _module(SAM_SGD)
    _fit(accumulated, tmp_path / "acc", batch_size=8, batches=4, accumulate_grad_batches=2)
    assert whole.global_step == accumulated.global_step == 2
    start = _module(SAM_SGD).state_dict()
    moved = 0.0
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(accumulated.state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)
        moved = max(moved, (v - start[k]).abs().max().item())
    assert moved > 1e-3                                  # the steps did change the weights


def test_sam_steps_twice_per_optimizer_step_and_logs_once(tmp_path):
    module = _module(SAM_SGD)
    calls = []
    step = module.recipe.training_step
    module.recipe.training_step = lambda batch: calls.append(1) or step(batch)
    trainer = _fit(module, tmp_path, batch_size=16, batches=3, log_every_n_steps=1)
    assert isinstance(trainer.optimizers[0], SAM)
    assert len(calls) == 6 and module.global_step == 3
    assert "train/loss" in trainer.callback_metrics


def test_sam_training_step_never_waits_for_the_device(tmp_path):
    guard = HostSyncGuard(mode="error")
    module = _module(functools.partial(build_optimizer, name="sam", lr=1e-3, rho=0.05, adaptive=True))
    _fit(module, tmp_path, batch_size=16, batches=6, callbacks=[guard], log_every_n_steps=5,
         gradient_clip_val=1.0)
    assert guard.syncs == [], guard.summary()


def test_sam_refuses_fp16_scaling_and_fsdp_before_any_work():
    module = _module(SAM_SGD)
    from vitlab.lit.strategies import FSDP

    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=object()), strategy=SimpleNamespace())
    with pytest.raises(ValueError, match="bf16-mixed"):
        module._check_sam()
    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=None), strategy=FSDP())
    with pytest.raises(ValueError, match="fsdp"):
        module._check_sam()


def test_ema_follows_every_optimizer_step_and_validation_scores_it(tmp_path):
    module = _module(functools.partial(build_optimizer, lr=1e-2), ema={"enabled": True, "decay": 0.5})
    trainer = _fit(module, tmp_path, batch_size=16, batches=4)
    assert int(module.ema.num_updates) == module.global_step == 4
    assert module.eval_recipe() is module.ema.module
    live = dict(module.recipe.named_parameters())
    ema = dict(module.ema.module.named_parameters())
    assert any(not torch.equal(live[k], ema[k]) for k in live)
    assert not any(p.requires_grad for p in module.ema.parameters())
    # the optimizer never saw the EMA's parameters
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in module.ema.parameters()}
    # validation scored the EMA weights: recompute its val top-1 with the EMA copy alone
    dm = trainer.datamodule
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        logits = module.ema.module(batch["image"])
    acc = (logits.argmax(-1) == batch["label"]).float().mean()
    assert trainer.callback_metrics["val/top1"] == pytest.approx(float(acc), abs=1e-6)


def test_ema_off_evaluates_the_live_weights():
    module = _module(functools.partial(build_optimizer, lr=1e-2), ema={"enabled": True, "evaluate": False})
    assert module.ema is not None and module.eval_recipe() is module.recipe
    assert _module(functools.partial(build_optimizer, lr=1e-2)).ema is None


def test_pretraining_recipe_logs_its_loss_and_no_top_k(tmp_path):
    module = _module(functools.partial(build_optimizer, lr=1e-3), recipe_cls=MAE, decoder_embed_dim=16,
                     decoder_depth=1, decoder_num_heads=2)
    trainer = _fit(module, tmp_path, batch_size=16, batches=2)
    assert "val/loss" in trainer.callback_metrics and "val/top1" not in trainer.callback_metrics
    assert not any(p.requires_grad for p in module.recipe.task.parameters())


def test_pretrained_backbone_loads_into_another_image_size():
    torch.manual_seed(0)
    small = vit("Ti", patch_size=4, embed_dim=32, depth=2, num_heads=2, img_size=16, in_chans=1)
    big = vit("Ti", patch_size=4, embed_dim=32, depth=2, num_heads=2, img_size=32, in_chans=1,
              use_mask_token=False)
    big.load_pretrained(small.state_dict(), "small")
    torch.testing.assert_close(big.blocks[1].mlp.fc1.weight, small.blocks[1].mlp.fc1.weight)
    assert big.pos_embed.shape[1] == 1 + 64                            # resampled 4x4 -> 8x8
    torch.testing.assert_close(big.pos_embed[:, :1], small.pos_embed[:, :1])   # the class token's row is kept
    # a mask token from SimMIM pretraining is left out, another width is refused with the reason
    simmim = vit("Ti", patch_size=4, embed_dim=32, depth=2, num_heads=2, img_size=16, in_chans=1, use_mask_token=True)
    small.load_pretrained(simmim.state_dict(), "simmim")
    wide = vit("Ti", patch_size=4, embed_dim=64, depth=2, num_heads=2, img_size=16, in_chans=1)
    with pytest.raises(ValueError, match="differ in shape"):
        small.load_pretrained(wide.state_dict(), "wide")


def test_pretrained_backbone_with_a_class_token_loads_into_a_vitdet_backbone_without_one():
    """ViTDet fine-tunes MAE weights (class token, token pooling) in a backbone without a class token, average
    pooling and window attention, at a larger image size: the blocks load, the patch position rows are resampled,
    the class token and its position row are dropped."""
    torch.manual_seed(0)
    mae = vit("Ti", patch_size=4, embed_dim=32, depth=2, num_heads=2, img_size=16, in_chans=3)
    det = vit("Ti", patch_size=4, embed_dim=32, depth=2, num_heads=2, img_size=32, in_chans=3, class_token=False,
              global_pool="avg", window_size=4, global_blocks=[1])
    det.load_pretrained(mae.state_dict(), "mae")
    torch.testing.assert_close(det.blocks[0].attn.qkv.weight, mae.blocks[0].attn.qkv.weight)
    assert det.pos_embed.shape[1] == 64                                # no class row; 4x4 -> 8x8 patch rows
    from vitlab.layers.pos_embed import resample_abs_pos_embed

    torch.testing.assert_close(det.pos_embed, resample_abs_pos_embed(mae.pos_embed[:, 1:], (8, 8), (4, 4), 0))
    # and the reverse: a backbone with a class token keeps its own init for the row the checkpoint lacks
    cls_pos = mae.pos_embed[:, :1].clone()
    mae.load_pretrained(det.state_dict(), "det")
    torch.testing.assert_close(mae.pos_embed[:, :1], cls_pos)
