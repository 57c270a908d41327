"""End to end: the command-line contract of the diffusion task on the shared real data.

    vitlab-train task=diffusion data=mnist data.root=DIR      (torchvision's MNIST/raw/*-ubyte.gz)
    vitlab-train task=diffusion data=cifar10 data.root=DIR    (the official python batches)
    vitlab-train task=diffusion data=imagefolder data.root=DIR
    vitlab-sample ckpt=RUN/checkpoints/last.ckpt eval_per_class=N classifier=PATH

Each run is a few steps of a 2-block DiT: it writes sample grids (samples/step_NNNNNNN.png and
visuals/samples_epochNNN.png), metrics.json with the validation loss and, with a judging classifier, the samples'
accuracy per class; vitlab-eval reproduces the validation numbers from the checkpoint alone."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import SHARED_DATA, run_cli

pytestmark = pytest.mark.slow

MNIST = SHARED_DATA / "mnist"
CIFAR_JPG = SHARED_DATA / "cifar10-jpg" / "cifar10-train.tar.gz"

TINY = ["task=diffusion", "backbone.embed_dim=48", "backbone.depth=2", "trainer.max_epochs=2",
        "trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "data.batch_size=8", "data.eval_batch_size=8",
        "data.num_workers=0", "trainer.enable_progress_bar=false", "run_test=false", "task.sample_steps=3",
        "task.eval_samples=12", "callbacks.diffusion_samples.every_n_steps=2",
        "callbacks.diffusion_samples.per_class=2", "callbacks.diffusion_samples.max_classes=3"]


def needs(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"the shared dataset {path} is not here (set VITLAB_SHARED_DATA)")


def train(out: Path, *args: str, timeout: float = 900) -> dict:
    p = run_cli("vitlab.cli.train", *TINY, *args, f"paths.output_dir={out}", timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-4000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def judge(tmp_path_factory) -> Path:
    """A (weak) vitlab classifier on MNIST: the judge of the samples."""
    needs(MNIST)
    out = tmp_path_factory.mktemp("judge")
    p = run_cli("vitlab.cli.train", "data=mnist", f"data.root={MNIST}", "backbone.patch_size=8",
                "backbone.embed_dim=32", "backbone.depth=1", "backbone.num_heads=2", "trainer.max_epochs=1",
                "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "data.batch_size=16",
                "data.num_workers=0", "run_test=false", "trainer.enable_progress_bar=false", f"paths.output_dir={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    return out / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory, judge) -> Path:
    out = tmp_path_factory.mktemp("mnist")
    train(out, "data=mnist", f"data.root={MNIST}", "data.img_size=28", f"task.classifier={judge}")
    return out


def test_mnist_run_writes_grids_metrics_and_ema(mnist_run):
    from PIL import Image

    metrics = json.loads((mnist_run / "metrics.json").read_text())
    assert {"val/loss", "val/mse", "val/vb", "train/loss"} <= set(metrics)         # ddpm with learned variance
    assert 0.0 <= metrics["val/sample_acc"] <= 1.0 and metrics["val/samples"] == 12
    per_class = [k for k in metrics if k.startswith("val/sample_acc_")]
    assert len(per_class) == 10                                                    # 12 balanced samples: all 10
    assert "val/best_sample_acc" in metrics                                        # best.ckpt follows the judge
    assert (mnist_run / "curves.png").is_file()
    steps = sorted(p.name for p in (mnist_run / "samples").glob("step_*.png"))
    assert steps == ["step_0000002.png", "step_0000004.png", "step_0000006.png"]   # every 2 steps + the end (6)
    with Image.open(mnist_run / "samples" / "step_0000006.png") as im:
        assert im.format == "PNG" and im.size[1] > im.size[0]                     # 3 rows of 2 samples
    assert sorted(p.name for p in (mnist_run / "visuals").glob("samples_epoch*.png")) == \
        ["samples_epoch001.png", "samples_epoch002.png"]
    ckpt = torch.load(mnist_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    # last.ckpt follows every validation, also when the monitored metric did not improve (Lightning's own does not)
    assert (ckpt["epoch"], ckpt["global_step"]) == (1, 6)
    assert any(k.startswith("ema.module.backbone.blocks.") for k in ckpt["state_dict"])    # ema.enabled: auto
    assert not any("judge" in k or "inception" in k for k in ckpt["state_dict"])
    assert ckpt["vitlab"]["config"]["backbone"]["_target_"] == "vitlab.backbones.dit"


def test_a_diffusion_checkpoint_is_refused_as_the_judge(mnist_run):
    from vitlab.lit.build import load_model
    from vitlab.tasks.diffusion import load_judge

    with pytest.raises(ValueError, match="not a trained classifier.*diffusion"):
        load_judge(str(mnist_run / "checkpoints" / "last.ckpt"), 10, load_model)


def test_checkpoint_evaluates_to_the_same_validation_numbers(mnist_run, tmp_path):
    metrics = json.loads((mnist_run / "metrics.json").read_text())
    out = tmp_path / "eval.json"
    p = run_cli("vitlab.cli.eval", f"ckpt={mnist_run / 'checkpoints' / 'last.ckpt'}", "split=val",
                f"metrics_file={out}", "trainer.limit_test_batches=2", "trainer.enable_progress_bar=false")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-4000:]
    got = json.loads(out.read_text())
    for key in ("val/loss", "val/sample_acc", "val/sample_acc_3"):                  # fixed noise, same samples
        assert got[key] == pytest.approx(metrics[key], abs=1e-6), key


def test_vitlab_load_samples_and_knn_is_refused(mnist_run, tmp_path):
    import vitlab

    model = vitlab.load(str(mnist_run / "checkpoints" / "last.ckpt"))
    images = model(torch.tensor([3, 7]))                                    # one sample per label
    assert images.shape == (2, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    torch.testing.assert_close(model(torch.tensor([3])), images[:1])      # sample i comes from seed i
    p = run_cli("vitlab.cli.eval", f"ckpt={mnist_run / 'checkpoints' / 'last.ckpt'}", "protocol=knn")
    assert p.returncode == 2 and "diffusion denoiser" in p.stderr, p.stderr[-2000:]


def test_vitlab_sample_scores_samples_per_class(mnist_run, judge, tmp_path):
    p = run_cli("vitlab.cli.sample", f"ckpt={mnist_run / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path}",
                "steps=2", "per_class=3", "eval_per_class=2", f"classifier={judge}", "save_npz=true",
                "guidance=2.0", "batch_size=7")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-4000:]
    result = json.loads(next(tmp_path.glob("sample_eval_*.json")).read_text())
    assert result["samples"] == 20 and result["guidance"] == 2.0 and result["ema"] is True
    assert len(result["sample_acc_per_class"]) == 10 and 0.0 <= result["sample_acc"] <= 1.0
    assert result["sample_acc"] == pytest.approx(np.mean(list(result["sample_acc_per_class"].values())))
    arr = np.load(result["npz"])
    assert arr["arr_0"].shape == (20, 28, 28, 3) and arr["arr_0"].dtype == np.uint8
    assert list(arr["labels"]) == [c for c in range(10) for _ in range(2)]
    assert Path(result["grid"]).is_file()
    # the same seed gives the same samples
    p = run_cli("vitlab.cli.sample", f"ckpt={mnist_run / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 'again'}",
                "steps=2", "per_class=3", "eval_per_class=2", "save_npz=true", "guidance=2.0")
    assert p.returncode == 0, p.stderr[-3000:]
    again = np.load(next((tmp_path / "again").glob("samples_*.npz")))
    np.testing.assert_array_equal(again["arr_0"], arr["arr_0"])


def test_cifar10_with_rectified_flow(tmp_path, cifar_subset):
    metrics = train(tmp_path, "data=cifar10", f"data.root={cifar_subset}", "task.objective=flow",
                    "backbone.long_skips=true")
    assert "val/loss" in metrics and "val/vb" not in metrics                       # a velocity: no variance term
    assert (tmp_path / "samples" / "step_0000006.png").is_file()
    cfg = (tmp_path / "config.yaml").read_text()
    assert "objective: flow" in cfg and "long_skips: true" in cfg


def test_imagefolder(tmp_path):
    needs(CIFAR_JPG)
    root = tmp_path / "folder"
    with tarfile.open(CIFAR_JPG) as tar:                     # a small image folder: 12 images of 3 classes
        members = [m for m in tar.getmembers() if m.isfile() and m.name.split("/")[1] in ("cat", "dog", "ship")]
        picked = [m for c in ("cat", "dog", "ship") for m in [m for m in members if f"/{c}/" in m.name][:12]]
        tar.extractall(root, members=picked, filter="data")
    metrics = train(tmp_path / "run", "data=imagefolder", f"data.root={root}", "data.img_size=16",
                    "data.source.val_fraction=0.25", "task.sampler=ddpm")
    assert "val/loss" in metrics
    assert (tmp_path / "run" / "samples" / "step_0000006.png").is_file()


def test_latent_diffusion_through_a_diffusers_autoencoder(tmp_path, cifar_subset):
    diffusers = pytest.importorskip("diffusers", reason="latent diffusion needs diffusers (vitlab[diffusion])")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32)
    vae.save_pretrained(tmp_path / "vae")
    metrics = train(tmp_path / "run", "data=cifar10", f"data.root={cifar_subset}", "backbone.patch_size=2",
                    f"task.autoencoder={{kind: diffusers, path: {tmp_path / 'vae'}}}")
    assert "val/loss" in metrics
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    # the denoiser sees 4-channel 16x16 latents (downsampling 2); the frozen VAE is not in the checkpoint
    assert ckpt["state_dict"]["recipe.backbone.x_embedder.proj.weight"].shape[1] == 4
    assert not any("encoder" in k or "decoder" in k for k in ckpt["state_dict"])
    from PIL import Image

    with Image.open(tmp_path / "run" / "samples" / "step_0000006.png") as im:      # decoded to 32 px RGB
        assert im.mode == "RGB"


@pytest.mark.parametrize("args, expected", [
    (["backbone=vit_tiny"], "needs a denoiser backbone"),
    (["task=classification", "backbone=dit_tiny"], "is a diffusion denoiser"),
    (["task.sampler=euler"], "task.sampler=euler does not fit task.objective=ddpm"),
    (["task.objective=flow", "task.learn_sigma=true"], "task.learn_sigma=false or auto"),
    (["task.classifier=/nonexistent/judge.ckpt"], "task.classifier=/nonexistent/judge.ckpt is not a vitlab"),
    (["task.fid={features: inception, inception_weights: /nonexistent/pt_inception.pth}"],
     "task.fid.inception_weights"),
    (["task.fid={features: classifier}"], "set task.classifier=PATH"),
    (["data.mixup.mixup_alpha=0.8"], "mixup_alpha=0"),
])
def test_bad_diffusion_options_stop_before_any_work(args, expected, tmp_path):
    """Each mistake stops build_run (before any training step) with a message naming the fix."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import InstantiationException

    from tests.conftest import CONF
    from vitlab.lit.build import build_run

    needs(MNIST)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["task=diffusion", "data=mnist", f"data.root={MNIST}",
                                          f"paths.output_dir={tmp_path}", "logger=[]", *args])
    with pytest.raises((ValueError, FileNotFoundError, InstantiationException)) as info:
        build_run(cfg)
    err = info.value.__cause__ if isinstance(info.value, InstantiationException) else info.value
    assert expected in str(err)
    assert not (tmp_path / "checkpoints").exists()


def test_the_command_line_reports_a_bad_option_with_exit_code_2(tmp_path):
    needs(MNIST)
    p = run_cli("vitlab.cli.train", "task=diffusion", "data=mnist", f"data.root={MNIST}", "backbone=vit_small",
                f"paths.output_dir={tmp_path}", timeout=300)
    assert p.returncode == 2 and "needs a denoiser backbone" in p.stderr and "Traceback" not in p.stderr


def test_two_process_ddp_splits_the_evaluation_samples(tmp_path, judge):
    metrics = train(tmp_path, "data=mnist", f"data.root={MNIST}", "data.img_size=28", "trainer=ddp",
                    "trainer.devices=2", "trainer.max_epochs=1", f"task.classifier={judge}")
    assert metrics["ddp/world_size"] == 2 and metrics["ddp/max_param_divergence"] == 0.0
    assert metrics["val/samples"] == 12                    # 6 per rank, gathered: no sample counted twice
    assert len([k for k in metrics if k.startswith("val/sample_acc_")]) == 10
