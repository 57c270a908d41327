"""End to end: every recipe (MAE, SimMIM, DINO, distillation), SAM and the EMA train a few steps from the command
line on the default data, write what they promise, and chain: pretrain -> fine-tune with layer-wise lr decay,
supervised teacher -> distilled student, any checkpoint -> vitlab-eval protocol=knn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

# a few steps of a 2-block ViT on the digits (16x16, patch 4)
FAST = ["experiment=digits_vit", "backbone.depth=2", "trainer.max_epochs=2", "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=2", "run_test=false", "trainer.enable_progress_bar=false"]
SMALL_DINO = ["recipe.out_dim=256", "recipe.hidden_dim=64", "recipe.bottleneck_dim=32", "recipe.num_local_crops=2"]
SMALL_MAE = ["recipe.decoder_embed_dim=32", "recipe.decoder_depth=1", "recipe.decoder_num_heads=2"]


def train(out: Path, *args: str, timeout: float = 600) -> dict:
    p = run_cli("vitlab.cli.train", *FAST, *args, f"paths.output_dir={out}", timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-4000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def supervised_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("supervised")
    train(out)
    return out


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mae")
    train(out, "recipe=mae", *SMALL_MAE)
    return out


def test_mae_pretrains_and_saves_reconstruction_grids(mae_run):
    from PIL import Image

    metrics = json.loads((mae_run / "metrics.json").read_text())
    assert metrics["train/loss"] > 0 and "val/loss" in metrics
    assert "val/top1" not in metrics                                   # no classifier is trained
    assert 0.0 <= metrics["val/knn_top1"] <= 1.0                       # the kNN monitor follows pretraining
    pngs = sorted((mae_run / "visuals").glob("reconstruction_epoch*.png"))
    assert [p.name for p in pngs] == ["reconstruction_epoch001.png", "reconstruction_epoch002.png"]
    with Image.open(pngs[-1]) as im:
        assert im.format == "PNG" and im.size[1] > im.size[0] / 4        # 4 rows of images
    assert (mae_run / "checkpoints" / "best.ckpt").is_file()


def test_finetune_from_mae_with_layer_decay(mae_run, tmp_path):
    ckpt = mae_run / "checkpoints" / "last.ckpt"
    p = run_cli("vitlab.cli.train", *FAST, f"weights={ckpt}", "optim.layer_decay=0.65",
                f"paths.output_dir={tmp_path}", timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-4000:]
    log = p.stdout + p.stderr
    assert "backbone initialised from" in log and "layer-wise lr decay" in log
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "val/top1" in metrics
    # the fine-tuned backbone started from the pretrained one: its patch embedding moved only a little
    pre = torch.load(ckpt, weights_only=False)["state_dict"]
    fine = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    k = "recipe.backbone.patch_embed.proj.weight"
    assert (fine[k] - pre[k]).norm() < 0.5 * pre[k].norm()


def test_simmim_pretrains(tmp_path):
    metrics = train(tmp_path, "recipe=simmim")
    assert metrics["train/loss"] > 0 and "val/loss" in metrics
    assert list((tmp_path / "visuals").glob("*.png"))
    sd = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert "recipe.backbone.mask_token" in sd                           # the recipe asked for a mask token


def test_dino_pretrains_and_knn_eval_reads_the_teacher(tmp_path):
    metrics = train(tmp_path, "recipe=dino", *SMALL_DINO)
    assert "val/knn_top1" in metrics and metrics["train/loss"] > 0
    out = tmp_path / "knn.json"
    p = run_cli("vitlab.cli.eval", f"ckpt={tmp_path / 'checkpoints' / 'last.ckpt'}", "protocol=knn",
                f"metrics_file={out}", f"hydra.run.dir={tmp_path / 'hydra'}", timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    knn = json.loads(out.read_text())
    assert knn["knn/top1"] > 0.2                                        # 10 classes; even 4 steps beat chance


def test_distill_from_a_vitlab_teacher(supervised_run, tmp_path):
    teacher = supervised_run / "checkpoints" / "last.ckpt"
    metrics = train(tmp_path, "recipe=distill", f"recipe.teacher={teacher}")
    assert "val/top1" in metrics and "train/loss_distill" in metrics
    sd = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert "recipe.backbone.dist_token" in sd and "recipe.dist_head.weight" in sd
    assert not any(k.startswith("recipe.teacher") for k in sd)           # the teacher is not saved with the student
    # the distilled student evaluates without its teacher
    out = tmp_path / "eval.json"
    p = run_cli("vitlab.cli.eval", f"ckpt={tmp_path / 'checkpoints' / 'last.ckpt'}", "split=val",
                f"metrics_file={out}", f"hydra.run.dir={tmp_path / 'hydra'}", timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(out.read_text())["val/top1"] == pytest.approx(metrics["val/top1"], abs=1e-6)


def test_distill_without_teacher_fails_clearly(tmp_path):
    p = run_cli("vitlab.cli.train", *FAST, "recipe=distill", f"paths.output_dir={tmp_path}", timeout=300)
    assert p.returncode == 2 and "vitlab: error: recipe=distill needs recipe.teacher=PATH" in p.stderr
    missing = tmp_path / "no_such_teacher.ckpt"
    p = run_cli("vitlab.cli.train", *FAST, "recipe=distill", f"recipe.teacher={missing}",
                f"paths.output_dir={tmp_path}", timeout=300)
    assert p.returncode == 2 and f"recipe.teacher={missing} does not exist" in p.stderr
    assert not (tmp_path / "checkpoints").exists()                       # stopped before any work


def test_sam_and_ema(tmp_path):
    metrics = train(tmp_path, "optim=sam", "optim.rho=0.05", "ema.enabled=true", "ema.decay=0.9")
    assert "val/top1" in metrics and metrics["train/global_step"] == 8
    sd = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert "ema.num_updates" in sd and int(sd["ema.num_updates"]) == 8
    ema_keys = [k for k in sd if k.startswith("ema.module.backbone.")]
    assert ema_keys and any(not torch.equal(sd[k], sd["recipe." + k[len("ema.module."):]]) for k in ema_keys)
    # validation used the EMA weights: vitlab-eval (which rebuilds the EMA) reproduces val/top1
    out = tmp_path / "eval.json"
    p = run_cli("vitlab.cli.eval", f"ckpt={tmp_path / 'checkpoints' / 'last.ckpt'}", "split=val",
                f"metrics_file={out}", f"hydra.run.dir={tmp_path / 'hydra'}", timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(out.read_text())["val/top1"] == pytest.approx(metrics["val/top1"], abs=1e-6)


def test_sam_with_gradient_accumulation(tmp_path):
    metrics = train(tmp_path, "optim=sam", "optim.adaptive=true", "optim.rho=0.5",
                    "trainer.accumulate_grad_batches=2")
    assert metrics["train/global_step"] == 4


@pytest.mark.parametrize("recipe", [
    ["recipe=mae", *SMALL_MAE],
    ["recipe=simmim"],
    ["recipe=dino", *SMALL_DINO],
    ["optim=sam", "trainer.accumulate_grad_batches=2"],
    ["ema.enabled=true"],
], ids=["mae", "simmim", "dino", "sam", "ema"])
def test_recipe_under_two_process_ddp(recipe, tmp_path):
    metrics = train(tmp_path, "trainer=ddp", "trainer.devices=2", "data.batch_size=16", *recipe, timeout=900)
    assert metrics["ddp/world_size"] == 2
    assert metrics["ddp/max_param_divergence"] == 0.0                    # the ranks ended with the same weights


def test_distill_under_two_process_ddp(supervised_run, tmp_path):
    teacher = supervised_run / "checkpoints" / "last.ckpt"
    metrics = train(tmp_path, "trainer=ddp", "trainer.devices=2", "data.batch_size=16", "recipe=distill",
                    f"recipe.teacher={teacher}", timeout=900)
    assert metrics["ddp/max_param_divergence"] == 0.0
