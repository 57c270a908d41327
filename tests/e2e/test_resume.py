"""Resume continues from the saved step with the same optimizer state and RNG: 1 + 1 epochs == 2 epochs."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir

from tests.conftest import CONF
from vitlab.lit.build import build_run

pytestmark = pytest.mark.slow

SMALL = ["experiment=digits_vit", "backbone.depth=2", "backbone.embed_dim=48", "trainer.limit_train_batches=6",
         "trainer.enable_progress_bar=false", "logger=[]", "run_test=false", "backbone.drop_path_rate=0.1"]      # stochastic depth + augmentation: RNG must resume too


class Interrupt(pl.Callback):
    """Stops the run after `epochs` epochs, as a crash or a preempted job would (checkpoints already written)."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def _train(out, *overrides, interrupt_after=None):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=SMALL + [f"paths.output_dir={out}", *overrides])
    run = build_run(cfg)
    if interrupt_after:
        run.trainer.callbacks.insert(0, Interrupt(interrupt_after))
    run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=cfg.ckpt_path)
    return run


def test_resume_matches_uninterrupted_training(tmp_path):
    straight = _train(tmp_path / "a", "trainer.max_epochs=2")
    _train(tmp_path / "b", "trainer.max_epochs=2", interrupt_after=1)
    half = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert half["global_step"] == 6 and half["epoch"] == 0

    resumed = _train(tmp_path / "b", "trainer.max_epochs=2", f"ckpt_path={tmp_path / 'b' / 'checkpoints' / 'last.ckpt'}")
    assert resumed.trainer.global_step == straight.trainer.global_step == 12

    a = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=0, atol=1e-6, msg=k)
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        torch.testing.assert_close(sb[i]["exp_avg_sq"], sa[i]["exp_avg_sq"], rtol=0, atol=1e-9)
        assert int(sb[i]["step"]) == int(sa[i]["step"]) == 12
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 12


def test_resume_from_a_missing_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt_path=.*does not exist"):
        _train(tmp_path / "c", f"ckpt_path={tmp_path / 'nope.ckpt'}")
