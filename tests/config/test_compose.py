"""Every experiment and every group option composes and instantiates; bad input stops with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from tests.conftest import CONF, SHARED_DATA, run_cli
from vitlab.cli.common import validate_command_line
from vitlab.data.base import DataInfo
from vitlab.lit.build import build_recipe, build_source, data_info, derive

GROUPS = ["backbone", "task", "data", "recipe", "optim", "sched", "trainer", "logger", "callbacks", "paths",
          "experiment", "debug", "augment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=False)


def test_train_defaults_cover_every_group():
    defaults = OmegaConf.load(CONF / "train.yaml").defaults
    named = {next(iter(d)) for d in defaults if isinstance(d, dict) or OmegaConf.is_dict(d)}
    assert set(GROUPS) <= named
    for g in GROUPS:
        assert options(g), f"conf/{g}/ has no options"


EXPERIMENT_DATA = {"vitlab.data.VOCDetection": SHARED_DATA / "bccd" / "BCCD",
                   "vitlab.data.CamVid": SHARED_DATA / "camvid",
                   "vitlab.data.MNIST": SHARED_DATA / "mnist"}


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_builds(experiment, tmp_path, cifar_subset):
    cfg = compose_train(f"experiment={experiment}", f"paths.output_dir={tmp_path}")
    if cfg.recipe.get("teacher", "absent") is None:       # distillation: the teacher file is read on the first step
        cfg.recipe.teacher = str(tmp_path / "teacher.ckpt")
    if cfg.data.root is not None:           # the shared real data each experiment is written for
        cfg.data.root = str(EXPERIMENT_DATA.get(cfg.data.source._target_, cifar_subset))
        if not Path(cfg.data.root).is_dir():
            pytest.skip(f"the shared dataset {cfg.data.root} is not here")
    source = build_source(cfg)
    recipe = build_recipe(cfg, data_info(cfg, source)).eval()
    x = torch.randn(2, source.in_chans, cfg.data.img_size, cfg.data.img_size)
    if recipe.task.kind != "diffusion":
        out = recipe(x)
    if recipe.task.kind == "diffusion":   # the denoiser's prediction (learned variance: 2C), samples
        out = recipe.backbone(x, torch.tensor([10.0, 500.0]), torch.tensor([0, 1]))
        assert out.shape == (2, source.in_chans * (2 if recipe.task.learn_sigma else 1), *x.shape[2:])
        samples = recipe.task.generate(recipe.backbone, torch.tensor([0, 1]), seeds=[0, 1], steps=2)
        assert samples.shape == x.shape and samples.min() >= 0 and samples.max() <= 1
    elif source.task == "detection":        # detections per image
        assert len(out) == 2 and {"boxes", "scores", "labels"} <= set(out[0])
    elif source.task == "segmentation":     # logits per pixel
        assert out.shape == (2, source.num_classes, cfg.data.img_size, cfg.data.img_size)
    else:
        assert out.shape == (2, source.num_classes)
    d = derive(cfg, recipe)
    assert d.global_batch == cfg.data.batch_size
    # experiments only override: the file is a `# @package _global_` file
    assert (CONF / "experiment" / f"{experiment}.yaml").read_text().lstrip().startswith("# @package _global_")


@pytest.mark.parametrize("option", options("backbone"))
def test_every_backbone_option_instantiates(option):
    denoiser = option.startswith("dit")          # a DiT denoises for task=diffusion (pixels, 32 px, 10 classes here)
    cfg = compose_train(f"backbone={option}", *(["task=diffusion", "data.img_size=32"] if denoiser
                                                 else ["data.img_size=224"]))
    with torch.device("meta"):                   # counts and shapes without allocating ViT-H
        recipe = build_recipe(cfg, DataInfo(num_classes=10 if denoiser else 1000, in_chans=3))
    n = sum(p.numel() for p in recipe.parameters())
    expected = {"vit_tiny": 5.7, "deit_tiny": 5.7, "vit_small": 22.1, "deit_small": 22.1, "vit_base": 86.6,
                "deit_base": 86.6, "vit": 22.1, "vit_large": 304.3, "vit_huge": 632.0,
                "vit_giant": 1012.6, "vitdet": 86.6, "timm_pyramid": 3.7,
                "dit": 32.5, "dit_tiny": 8.2}.get(option)     # DiT-S/2, DiT-Ti/4 (learned variance: 6 outputs)
    assert n > 0 and (expected is None or round(n / 1e6, 1) == expected), (option, n)


@pytest.mark.parametrize("group", ["task", "recipe", "optim", "sched"])
def test_every_model_group_option_instantiates(group):
    for option in options(group):
        # distillation needs a teacher path; it is only read on the first training step
        extra = ["recipe.teacher=/nonexistent/teacher.ckpt"] if (group, option) == ("recipe", "distill") else []
        cfg = compose_train(f"{group}={option}", *extra)
        # every task trains on data of its declared kind (the builder checks that the data's task matches)
        recipe = build_recipe(cfg, DataInfo(num_classes=10, in_chans=1, task=get_class(cfg.task._target_).data_kind))
        opt = instantiate(cfg.optim, lr=1e-3, _convert_="all")(recipe)
        if group == "sched" or cfg.get("sched"):
            sched = instantiate(cfg.sched, _convert_="all")(opt, total_steps=100, steps_per_epoch=10)
            assert sched.get_last_lr()[0] > 0


@pytest.mark.parametrize("option", options("data"))
def test_every_data_option_instantiates(option, tmp_path):
    extra = [f"data.urls={tmp_path}"] if option == "webdataset" else []          # shards: urls, not root
    extra += ["data.source.num_classes=3"] if option == "segfolder" else []       # required: no default
    cfg = compose_train(f"data={option}", f"data.root={tmp_path}", *extra)
    source = build_source(cfg, check=False)
    assert source.has_split("train") or option != "digits"


@pytest.mark.parametrize("option", options("trainer"))
def test_every_trainer_option_instantiates(option, tmp_path):
    from vitlab.lit.build import build_trainer

    cfg = compose_train(f"trainer={option}", f"paths.output_dir={tmp_path}", "logger=csv")
    if option == "gpu" and not torch.cuda.is_available():
        pytest.skip("trainer=gpu needs a CUDA device")
    recipe = build_recipe(cfg, DataInfo(10, 1))
    trainer = build_trainer(cfg, derive(cfg, recipe))
    assert trainer.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("option", options("logger") + ["callbacks"])
def test_every_logger_and_callback_option_instantiates(option, tmp_path, monkeypatch):
    from vitlab.lit.build import build_trainer

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    overrides = [f"paths.output_dir={tmp_path}"] + ([f"logger={option}"] if option != "callbacks" else [])
    cfg = compose_train(*overrides)
    trainer = build_trainer(cfg, derive(cfg, build_recipe(cfg, DataInfo(10, 1))))
    assert trainer.loggers
    assert trainer.checkpoint_callback is not None and trainer.checkpoint_callback.monitor == "val/top1"


@pytest.mark.parametrize("option", options("debug"))
def test_every_debug_option_composes(option):
    cfg = compose_train(f"debug={option}")
    assert cfg.trainer.max_epochs >= 1


def test_derived_numbers_are_computed_and_described():
    cfg = compose_train("trainer.devices=4", "trainer.num_nodes=2", "trainer.accumulate_grad_batches=3",
                        "data.batch_size=16", "optim.lr=1e-3", "trainer.accelerator=cpu")
    d = derive(cfg, build_recipe(cfg, DataInfo(10, 1)))
    assert d.global_batch == 16 * 4 * 2 * 3
    assert d.lr == pytest.approx(1e-3 * 384 / 256)
    text = d.describe()
    assert "global batch = 384" in text and "x accumulation 3" in text and "0.0015" in text
    cfg = compose_train("recipe.lr_scaling=sqrt", "data.batch_size=64", "optim.lr=1e-3")
    assert derive(cfg, build_recipe(cfg, DataInfo(10, 1))).lr == pytest.approx(1e-3 * (64 / 256) ** 0.5)


# ------------------------------------------------------------ bad input ---

def _error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        validate_command_line("train", list(argv))
    assert e.value.code == 2
    return capsys.readouterr().err


def test_wrong_group_option_names_valid_choices(capsys):
    err = _error(capsys, "backbone=vit_tinyy")
    assert "'vit_tinyy' is not an option of the config group 'backbone'" in err
    assert "Did you mean vit_tiny" in err
    for option in options("backbone"):
        assert option in err


def test_unknown_key_names_valid_keys(capsys):
    err = _error(capsys, "optim.lrr=0.1")
    assert "unknown config key 'optim.lrr'" in err and "Did you mean 'optim.lr'" in err
    assert "weight_decay" in err                      # lists the valid keys
    err = _error(capsys, "data.augment.paddin=3")
    assert "'data.augment.crop_padding'" in err


def test_valid_command_line_passes():
    validate_command_line("train", ["backbone=vit_small", "optim.lr=1e-3", "trainer.max_epochs=1"])


def test_missing_dataset_is_reported_before_any_work(tmp_path):
    from vitlab.data import DatasetNotFoundError

    cfg = compose_train("data=cifar10", f"data.root={tmp_path / 'nowhere'}")
    with pytest.raises(DatasetNotFoundError, match="cifar10 not found.*data.root"):
        build_source(cfg)


@pytest.mark.parametrize("args,expected", [
    (["backbone=nope"], "is not an option of the config group 'backbone'"),
    (["trainer.max_epoch=3"], "unknown config key 'trainer.max_epoch'"),
    (["data=cifar10", "data.root=/nonexistent/cifar"], "cifar10 not found"),
    (["+task.foo=1"], "unexpected keyword argument 'foo'"),                 # a key the task does not take
])
def test_cli_stops_with_exit_code_2_and_message(args, expected, tmp_path):
    p = run_cli("vitlab.cli.train", *args, f"paths.output_dir={tmp_path}", timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert expected in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "checkpoints").exists()    # stopped before any work


def test_weights_key_loads_timm_weights_into_the_built_model(tmp_path):
    """`weights=FILE` starts the run from a timm ViT state dict; logits then match timm's."""
    import timm

    torch.manual_seed(0)
    ref = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=10,
                                                           embed_dim=96, depth=2, num_heads=3).eval()
    torch.save(ref.state_dict(), tmp_path / "timm_vit.pth")
    cfg = compose_train("experiment=digits_vit", "backbone.depth=2", "backbone.global_pool=token",
                        "backbone.drop_path_rate=0", f"weights={tmp_path / 'timm_vit.pth'}")
    recipe = build_recipe(cfg, DataInfo(num_classes=10, in_chans=1)).eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert (recipe(x) - ref(x)).abs().max() <= 1e-4


def test_plain_defaults_without_an_experiment_build_a_sensible_model():
    cfg = compose_train()
    recipe = build_recipe(cfg, DataInfo(num_classes=10, in_chans=1))
    assert recipe.backbone.grid[0] * recipe.backbone.grid[1] >= 4     # not a one-token image


def test_webdataset_urls_take_a_folder_or_a_quoted_brace_pattern(tmp_path):
    from vitlab.data import Digits
    from vitlab.data.shards import write_shards

    write_shards(Digits(), tmp_path, max_count=400, progress=False)         # train-000000..000003.tar
    folder = build_source(compose_train("data=webdataset", f"data.urls={tmp_path}"))
    assert len(folder.shard_list("train")) == 4 and folder.num_classes == 10 and folder.in_chans == 1
    # Hydra's override grammar needs the braces quoted, as the config's header says
    braced = build_source(compose_train("data=webdataset", f"data.urls='{tmp_path}/train-{{000000..000001}}.tar'"))
    assert [u for u, _ in braced.shard_list("train")] == [str(tmp_path / f"train-00000{i}.tar") for i in (0, 1)]
    assert braced.has_split("val")                                            # val-*.tar found beside them


@pytest.mark.parametrize("recipe", ["mae", "dino", "distill"])
def test_a_dense_task_with_another_recipe_than_supervised_is_refused(recipe):
    """Distillation reads class logits, MAE / DINO pretrain on images: none trains a detector or a segmenter; the
    builder says to use recipe=supervised (and to fine-tune a pretrained backbone with weights=)."""
    extra = ["recipe.teacher=/nonexistent/teacher.ckpt"] if recipe == "distill" else []
    cfg = compose_train("task=detection", f"recipe={recipe}", *extra)
    with pytest.raises(ValueError, match="use recipe=supervised"):
        build_recipe(cfg, DataInfo(num_classes=3, in_chans=3, task="detection"))
