"""Shared fixtures for these tests."""

from __future__ import annotations

import pytest



@pytest.fixture(scope="module")
def tiny_fit(tmp_path_factory):
    """Factory for a tiny real Lightning run on the digits data (no Hydra): returns (trainer, module, dm).

    tiny_fit(out_dir, callbacks=[...], recipe_cls=..., **trainer_kwargs) builds a 2-block ViT on 16x16
    digits and fits it for one epoch of 3 batches with one validation batch.
    """
    import functools

    import pytorch_lightning as pl

    from vitlab.backbones import vit
    from vitlab.data import Digits
    from vitlab.tasks import ClassificationTask
    from vitlab.lit.datamodule import VitlabDataModule
    from vitlab.lit.module import VitlabModule
    from vitlab.optim import build_optimizer, cosine_schedule
    from vitlab.recipes import Supervised

    def run(callbacks=(), recipe_cls=Supervised, optimizer_factory=None, scheduler_factory=None, config=None,
            fit=True, **trainer_kwargs):
        pl.seed_everything(0, verbose=False)
        recipe = recipe_cls(vit("Ti", patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=16, in_chans=1),
                            ClassificationTask(32, 10))
        module = VitlabModule(recipe,
                              optimizer_factory=optimizer_factory or functools.partial(build_optimizer, lr=1e-3),
                              scheduler_factory=scheduler_factory or functools.partial(cosine_schedule,
                                                                                       warmup_epochs=0),
                              config={} if config is None else config,
                              data_info={"num_classes": 10, "in_chans": 1})
        dm = VitlabDataModule(Digits(), img_size=16, batch_size=64, augment={"policy": "none"})
        kwargs = dict(max_epochs=1, limit_train_batches=3, limit_val_batches=1, limit_test_batches=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      use_distributed_sampler=False, num_sanity_val_steps=0, accelerator="cpu", devices=1,
                      default_root_dir=str(tmp_path_factory.mktemp("pl_root")))
        kwargs.update(trainer_kwargs)
        trainer = pl.Trainer(callbacks=list(callbacks), **kwargs)
        if fit:
            trainer.fit(module, datamodule=dm)
        return trainer, module, dm

    return run
