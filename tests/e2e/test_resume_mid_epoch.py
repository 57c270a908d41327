"""Resuming from a mid-epoch checkpoint continues the epoch: no batch is replayed, and training matches."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir

from tests.conftest import CONF
from vitlab.lit.build import build_run

pytestmark = pytest.mark.slow

SMALL = ["experiment=digits_vit", "backbone.depth=2", "backbone.embed_dim=48", "trainer.enable_progress_bar=false",
         "logger=[]", "run_test=false", "backbone.drop_path_rate=0.1", "data.batch_size=128",
         "trainer.max_epochs=2", "checkpoint_every_n_steps=3"]       # 1,258 train images: 9 batches per epoch


class Crash(Exception):
    pass


class Record(pl.Callback):
    """Which images each optimizer step trained on; optionally crashes the run after a step (as a killed job would)."""

    def __init__(self, crash_after: int | None = None):
        self.steps: list[list[int]] = []
        self.crash_after = crash_after

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.crash_after is not None and trainer.global_step >= self.crash_after:
            raise Crash()                        # step `crash_after` and its checkpoint are done; the next is lost
        self.steps.append(batch["index"].tolist())


def _train(out, *overrides, crash_after=None):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=SMALL + [f"paths.output_dir={out}", *overrides])
    run = build_run(cfg)
    rec = Record(crash_after)
    run.trainer.callbacks.insert(0, rec)
    try:
        run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=cfg.ckpt_path)
    except Crash:
        pass
    return run, rec


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory):
    from vitlab.data import Digits
    from vitlab.data.shards import write_shards

    out = tmp_path_factory.mktemp("digits_shards")
    write_shards(Digits(), out, max_count=200, progress=False)         # 1,258 train images in 7 shards
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_replays_nothing(tmp_path, workers):
    w = f"data.num_workers={workers}"
    straight, full = _train(tmp_path / "a", w)
    assert len(full.steps) == 18

    _, first = _train(tmp_path / "b", w, crash_after=12)             # dies in epoch 2, after its 3rd batch
    ckpt = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 12
    assert ckpt["VitlabDataModule"] == {"train_loader": {"epoch": 1, "consumed_batches": 3}}

    resumed, rest = _train(tmp_path / "b", w, f"ckpt_path={tmp_path / 'b' / 'checkpoints' / 'last.ckpt'}")
    assert first.steps + rest.steps == full.steps                     # the same batches, none twice
    assert resumed.trainer.global_step == straight.trainer.global_step == 18

    a = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    if workers == 0:
        # augmentation, dropout and stochastic depth all draw from the main process's RNG, which the
        # checkpoint restores: the resumed run is the uninterrupted one
        for k, v in a["state_dict"].items():
            torch.testing.assert_close(b["state_dict"][k], v, rtol=0, atol=1e-6, msg=k)


def test_mid_epoch_resume_of_a_shard_stream_replays_nothing(tmp_path, digits_shards):
    """WebDataset shards, 2 loader workers: the resumed stream skips what was trained on, before decoding it."""
    args = ("data=webdataset", f"data.urls={digits_shards}", "data.num_workers=2", "data.img_size=16",
            "data.augment.policy=crop_flip", "data.augment.crop_padding=1", "data.augment.hflip=0")
    _, full = _train(tmp_path / "a", *args)
    per_epoch = len(full.steps) // 2
    assert per_epoch >= 6
    seen = [i for step in full.steps[:per_epoch] for i in step]
    assert len(seen) == len(set(seen))                                # one epoch: no sample twice

    _, first = _train(tmp_path / "b", *args, crash_after=per_epoch + 4)
    saved = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    step = saved["global_step"]                                       # the last multiple of 3: later steps are lost
    assert per_epoch < step < 2 * per_epoch
    assert saved["VitlabDataModule"]["train_loader"] == {"epoch": 1, "consumed_batches": step - per_epoch}
    resumed, rest = _train(tmp_path / "b", *args, f"ckpt_path={tmp_path / 'b' / 'checkpoints' / 'last.ckpt'}")
    assert first.steps[:step] + rest.steps == full.steps              # the lost steps are redone, none replayed
