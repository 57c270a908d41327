"""conf/augment presets (simple, deit, deit3, deit3_in21k): they compose with Hydra over every kind of dataset
config, override the dataset's own augment block, and build the transforms, the mixer and the task they name."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from timm.data.auto_augment import AutoAugment, RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import v2

from tests.conftest import CONF
from vitlab.cli.common import validate_command_line
from vitlab.data.mixup import MixupCutmix, build_mixup
from vitlab.data.transforms import build_transforms

PRESETS = sorted(p.stem for p in (CONF / "augment").glob("*.yaml"))
DATA = ["digits", "cifar10", "imagefolder"]          # the three kinds of augment block the datasets carry
CHANNELS = {"digits": 1}


def _augment(preset: str) -> str:
    """``augment=X`` once train.yaml lists the group (``- augment: null``); ``+augment=X`` before that."""
    listed = any("augment" in d for d in OmegaConf.load(CONF / "train.yaml").defaults if OmegaConf.is_dict(d))
    return f"{'' if listed else '+'}augment={preset}"


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=False)


def _transforms(cfg, is_train: bool = True, channels: int = 3):
    augment = OmegaConf.to_container(cfg.data.augment, resolve=True)
    mean, std = (0.5,) * channels, (0.25,) * channels
    return build_transforms(is_train, 32, mean, std, **augment)


def _mixup(cfg, num_classes: int = 10):
    return build_mixup(num_classes, **OmegaConf.to_container(cfg.data.mixup, resolve=True))


def _find(tf, cls):
    return [t for t in tf.transforms if isinstance(t, cls)]


def test_presets_exist():
    assert {"simple", "deit", "deit3"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_files_are_global_packages_with_a_cited_header(preset):
    text = (CONF / "augment" / f"{preset}.yaml").read_text()
    assert text.startswith("# @package _global_")
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert len(header) >= 4 and f"augment={preset}" in text                     # what it sets, how to use it


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_and_builds_over_each_dataset(preset, data):
    cfg = compose_train(_augment(preset), f"data={data}")
    channels = CHANNELS.get(data, 3)
    tf = _transforms(cfg, channels=channels)
    image = Image.new("RGB" if channels == 3 else "L", (40, 36), 100)
    tensor = torch.rand(channels, 12, 12, generator=torch.Generator().manual_seed(0))
    for x in (image, tensor):
        out = tf(x)
        assert out.shape == (channels, 32, 32) and out.dtype == torch.float32
    assert _transforms(cfg, is_train=False, channels=channels)(image).shape == (channels, 32, 32)
    mixup = _mixup(cfg)
    if mixup is not None:
        images, target = mixup(torch.randn(4, channels, 32, 32), torch.tensor([0, 1, 2, 3]))
        assert target.shape == (4, 10)
        torch.testing.assert_close(target.sum(1), torch.ones(4))
    task = instantiate(cfg.task, in_dim=8, num_classes=10, _convert_="all")
    assert task.loss(torch.randn(4, 10), torch.tensor([0, 1, 2, 3])).ndim == 0
    assert cfg.data.repeated_aug in (0, 3)
    # the preset decides the crop, whatever the dataset's own block said
    assert cfg.data.augment.policy == OmegaConf.load(CONF / "augment" / f"{preset}.yaml").data.augment.policy


def test_deit_preset():
    cfg = compose_train(_augment("deit"), "data=digits")
    a = cfg.data.augment
    assert (a.policy, a.interpolation, a.hflip, a.auto_augment) == ("rrc_flip", "bicubic", 0.5, "rand-m9-mstd0.5-inc1")
    assert (a.re_prob, a.re_mode, a.re_count, a.color_jitter) == (0.25, "pixel", 1, 0.4)
    tf = _transforms(cfg, channels=1)
    (ra,) = _find(tf, RandAugment)
    assert ra.num_layers == 2 and {op.magnitude for op in ra.ops} == {9}
    assert {op.magnitude_std for op in ra.ops} == {0.5}
    assert _find(tf, RandomErasing) and not _find(tf, v2.ColorJitter)      # jitter is off with RandAugment
    (rrc,) = _find(tf, RandomResizedCropAndInterpolation)
    assert rrc.scale == (0.08, 1.0)
    assert cfg.data.augment.hflip == 0.5                                   # digits' own hflip 0.0 is overridden
    m = _mixup(cfg)
    assert isinstance(m, MixupCutmix)
    assert (m.mixup_alpha, m.cutmix_alpha, m.switch_prob, m.mix_prob, m.label_smoothing) == (0.8, 1.0, 0.5, 1.0, 0.1)
    assert cfg.data.repeated_aug == 3
    assert (cfg.task.loss, cfg.task.label_smoothing) == ("ce", 0.1)


def test_deit3_preset():
    cfg = compose_train(_augment("deit3"), "data=cifar10")
    tf = _transforms(cfg)
    (aa,) = _find(tf, AutoAugment)
    assert [[op.name for op in sub] for sub in aa.policy] == [["Solarize"], ["Desaturate"], ["GaussianBlurRand"]]
    (cj,) = _find(tf, v2.ColorJitter)                                      # kept on with 3-Augment
    assert cj.brightness == (0.7, 1.3)
    assert not _find(tf, RandomErasing)
    assert _find(tf, RandomResizedCropAndInterpolation)                    # ImageNet-1k: RRC (no --src)
    m = _mixup(cfg)
    assert (m.mixup_alpha, m.cutmix_alpha, m.label_smoothing) == (0.8, 1.0, 0.0)
    assert cfg.data.repeated_aug == 3
    task = instantiate(cfg.task, in_dim=8, num_classes=10, _convert_="all")
    assert task.loss_type == "bce" and task.label_smoothing == 0.0
    logits, target = torch.randn(4, 10), torch.softmax(torch.randn(4, 10), -1)
    torch.testing.assert_close(task.loss(logits, target), torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.ones_like(target)))                                  # all > 0: binarised to 1 (DeiT III)


def test_deit3_in21k_preset_uses_simple_random_crop():
    cfg = compose_train(_augment("deit3_in21k"), "data=imagefolder")
    tf = _transforms(cfg)
    (crop,) = _find(tf, v2.RandomCrop)
    assert crop.padding_mode == "reflect" and crop.padding == [4, 4, 4, 4]
    assert not _find(tf, RandomResizedCropAndInterpolation)
    m = _mixup(cfg)
    assert (m.mixup_alpha, m.cutmix_alpha) == (0.0, 1.0)
    assert cfg.data.repeated_aug == 0 and cfg.task.loss == "ce"


def test_simple_preset():
    cfg = compose_train(_augment("simple"), "data=cifar10")
    tf = _transforms(cfg)
    assert _find(tf, RandomResizedCropAndInterpolation) and _find(tf, v2.RandomHorizontalFlip)
    for absent in (RandAugment, AutoAugment, RandomErasing, v2.ColorJitter):
        assert not _find(tf, absent)
    assert _mixup(cfg) is None and cfg.data.repeated_aug == 0


def test_command_line_overrides_a_preset_value():
    cfg = compose_train(_augment("deit"), "data.augment.re_prob=0.0", "data.mixup.cutmix_alpha=0.0")
    assert cfg.data.augment.re_prob == 0.0 and cfg.data.mixup.cutmix_alpha == 0.0
    assert not _find(_transforms(cfg), RandomErasing)


def test_plain_command_line_is_accepted_by_the_cli_gate():
    validate_command_line("train", [_augment("deit"), "data=cifar10"])


def test_wrong_preset_names_the_choices(capsys):
    with pytest.raises(SystemExit):
        validate_command_line("train", [_augment("deit4")])
    err = capsys.readouterr().err
    assert "deit4" in err and all(p in err for p in PRESETS)
