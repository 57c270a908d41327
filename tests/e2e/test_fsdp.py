"""trainer=fsdp (FSDP2, fully_shard per block) on 2 CPU processes (gloo): it trains like one process with the same
global batch, and its checkpoint is an ordinary one that vitlab-eval reads."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

COMMON = ["experiment=digits_vit", "trainer.max_epochs=1", "backbone.drop_path_rate=0", "data.augment.policy=none",
          "run_test=false", "trainer.enable_progress_bar=false", "backbone.depth=2"]


def test_fsdp_two_processes_match_one_process_and_checkpoint_is_readable(tmp_path):
    pf = run_cli("vitlab.cli.train", *COMMON, "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
                 "data.batch_size=16", f"paths.output_dir={tmp_path / 'fsdp'}", timeout=600)
    assert pf.returncode == 0, pf.stdout[-3000:] + pf.stderr[-3000:]
    assert "FSDP2: 2 blocks + the root sharded over 2 processes" in pf.stdout + pf.stderr
    p1 = run_cli("vitlab.cli.train", *COMMON, "data.batch_size=32", f"paths.output_dir={tmp_path / 'single'}",
                 timeout=600)
    assert p1.returncode == 0, p1.stdout[-3000:] + p1.stderr[-3000:]
    fsdp = json.loads((tmp_path / "fsdp" / "metrics.json").read_text())
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert fsdp["train/global_step"] == single["train/global_step"]
    assert fsdp["val/loss"] == pytest.approx(single["val/loss"], rel=1e-2)

    # the full (gathered) state dict on rank 0: the same weights as the 1-process run, same names, plain tensors
    ckpt = tmp_path / "fsdp" / "checkpoints" / "last.ckpt"
    a = torch.load(ckpt, weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "single" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert type(a[k]) is torch.Tensor, k
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-3, msg=k)

    out = tmp_path / "eval.json"
    pe = run_cli("vitlab.cli.eval", f"ckpt={ckpt}", "split=val", f"metrics_file={out}", timeout=300)
    assert pe.returncode == 0, pe.stdout[-3000:] + pe.stderr[-3000:]
    assert json.loads(out.read_text())["val/top1"] == pytest.approx(fsdp["val/top1"], abs=1e-6)


@pytest.mark.parametrize("recipe, units", [
    (["recipe=mae", "recipe.decoder_embed_dim=32", "recipe.decoder_depth=1", "recipe.decoder_num_heads=2"], 3),
    (["recipe=dino", "recipe.out_dim=64", "recipe.hidden_dim=32", "recipe.bottleneck_dim=16",
      "recipe.num_local_crops=0", "callbacks.knn_monitor.every_n_epochs=0"], 4),
])
def test_pretraining_recipes_train_under_fsdp(recipe, units, tmp_path):
    """The recipe's training and evaluation steps are FSDP forward methods (the root unit's parameters are
    gathered around them though a task or a decoder calls the backbone directly), and each recipe shards the units
    it declares: MAE its encoder's 2 blocks and its decoder's block, DINO the student's and the EMA teacher's."""
    p = run_cli("vitlab.cli.train", *COMMON, *recipe, "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
                "data.batch_size=16", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
                f"paths.output_dir={tmp_path}", timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"FSDP2: {units} blocks + the root sharded over 2 processes" in p.stdout + p.stderr
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
