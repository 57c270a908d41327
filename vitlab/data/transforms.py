"""Per-image augmentation: crops, flips, colour jitter, auto-augment policies and random erasing.

Everything here is built from timm's and torchvision's implementations; this
file only validates the options (every one settable from YAML under
``data.augment``), picks the pieces and puts them in timm's order, the one of
``timm.data.transforms_factory.transforms_imagenet_train`` (the DeiT pipeline):

    primary    crop (``policy``) -> horizontal flip
    secondary  auto-augment (``auto_augment``) -> colour jitter (``color_jitter``)
    final      to float in [0, 1] -> normalise -> random erasing (``re_prob``)

Inputs may be PIL images (CIFAR, image files) or tensors (uint8, or float in
[0, 1] such as the 1-channel digits). timm's auto-augment operations want PIL
images, so when an ``auto_augment`` is set a tensor is converted to a PIL image
first (mode ``L`` for 1 channel, ``RGB`` for 3; a float tensor is quantised to
8 bits there, as a decoded image file would be). The fill colour of the
auto-augment operations is the dataset mean, one value per channel (an int for
mode ``L``), so 1-channel data works with every option. Mixup / CutMix act on batches: see :mod:`vitlab.data.mixup`.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional, Sequence, Union

import torch
from PIL import Image, ImageOps
from timm.data.auto_augment import (AugMixAugment, AutoAugment, RandAugment, augment_and_mix_transform,
                                    auto_augment_transform, rand_augment_transform)
from timm.data.auto_augment import posterize as _timm_posterize
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_pil_interp
from torchvision.transforms import InterpolationMode, v2

TrainAugment = Literal["none", "crop_flip", "rrc_flip", "simple_crop"]
Interpolation = Literal["bilinear", "bicubic", "random"]
EraseMode = Literal["const", "rand", "pixel"]

POLICIES = ("none", "crop_flip", "rrc_flip", "simple_crop")
INTERPOLATIONS = ("bilinear", "bicubic", "random")
RE_MODES = ("const", "rand", "pixel")
# every key accepted under data.augment (the keyword arguments of build_transforms after the first four)
OPTIONS = ("policy", "crop_padding", "rrc_scale", "rrc_ratio", "hflip", "eval_crop_ratio", "interpolation",
           "color_jitter", "force_color_jitter", "auto_augment", "re_prob", "re_mode", "re_count")

_AA_FORMS = ("'rand-m9-mstd0.5-inc1' (RandAugment; dash-separated sections m<int> n<int> p<float> mstd<float> "
             "mmax<int> inc<0|1> t<weights|3a|3aw>), "
             "'original' | 'originalr' | 'v0' | 'v0r', optionally with '-mstd<float>' (AutoAugment), "
             "'3a' (DeiT III's 3-Augment), "
             "'augmix-m5-w4-d2' (AugMix; sections m<int> w<int> d<int> a<float> b<0|1> mstd<float>), "
             "'trivialaugment' (TrivialAugmentWide), or null (off)")
_FLOAT = r"\d+(?:\.\d*)?"
_AA_SECTIONS = {                      # what timm's parsers accept after the first dash-separated word
    "rand": rf"m\d+|n\d+|p{_FLOAT}|mstd{_FLOAT}|mmax\d+|inc[01]|t(?:weights|3a|3aw)",
    "augmix": rf"m\d+|w\d+|d\d+|a{_FLOAT}|b[01]|mstd{_FLOAT}",
    "autoaugment": rf"mstd{_FLOAT}",
}
_AA_POLICIES = ("original", "originalr", "v0", "v0r", "3a")


# ---------------------------------------------------------------- helpers ---

def _interp(name: str) -> InterpolationMode:
    return InterpolationMode.BICUBIC if name == "bicubic" else InterpolationMode.BILINEAR


def _resize(size: int, interpolation: str) -> Any:
    """Resize the short side to ``size``; ``random`` picks bilinear or bicubic per image, as timm does."""
    if interpolation == "random":
        return v2.RandomChoice([v2.Resize(size, interpolation=_interp(m), antialias=True)
                                for m in ("bilinear", "bicubic")])
    return v2.Resize(size, interpolation=_interp(interpolation), antialias=True)


def _to_float() -> list:
    # PIL / uint8 -> float in [0, 1]; a float tensor is kept as it is (not divided by 255 again)
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]


def _posterize_zero_bits_ok(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize, where keeping 0 bits gives a black image (as Pillow did before it rejected bits=0).

    timm maps RandAugment's top magnitude (``inc1``, m=10 after the ``mstd`` noise) and AutoAugment v0's
    ``('Posterize', 0.8, 2)`` to 0 bits; current Pillow raises a ValueError there, which would stop training.
    """
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    if bits_to_keep >= 8:
        return img
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(aa: Union[RandAugment, AutoAugment, AugMixAugment]) -> None:
    """Swap in :func:`_posterize_zero_bits_ok` on this transform's own ops (no change to timm's globals)."""
    if isinstance(aa, AutoAugment):
        ops = [op for sub in aa.policy for op in sub]
    else:
        ops = list(aa.ops)
    for op in ops:
        if op.aug_fn is _timm_posterize:
            op.aug_fn = _posterize_zero_bits_ok


def parse_auto_augment(spec: Optional[str]) -> Optional[str]:
    """Check an ``auto_augment`` string; return its kind (rand | autoaugment | augmix | trivialaugment) or None.

    timm's own parsers skip unknown sections silently or fail with a bare assertion: this names the problem.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none")):
        return None
    if not isinstance(spec, str):
        raise ValueError(f"auto_augment must be a string or null, got {spec!r}; accepted forms: {_AA_FORMS}")
    head, *sections = spec.split("-")
    if spec == "trivialaugment":
        return "trivialaugment"
    if head in ("rand", "augmix"):
        kind = head
    elif head in _AA_POLICIES:
        kind = "autoaugment"
    else:
        raise ValueError(f"unknown auto_augment {spec!r} (first part {head!r}); accepted forms: {_AA_FORMS}")
    bad = [s for s in sections if not re.fullmatch(_AA_SECTIONS[kind], s)]
    if bad:
        raise ValueError(f"auto_augment {spec!r}: unknown section(s) {bad} for {kind}; accepted forms: {_AA_FORMS}")
    return kind


def _color_jitter(color_jitter: Union[float, Sequence[float], None]) -> Optional[tuple]:
    """timm semantics: a scalar s -> (s, s, s) for brightness, contrast, saturation; or 3 / 4 values (+ hue)."""
    if color_jitter is None:
        return None
    if isinstance(color_jitter, (int, float)) and not isinstance(color_jitter, bool):
        values = (float(color_jitter),) * 3
    elif isinstance(color_jitter, (list, tuple)) and len(color_jitter) in (3, 4) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in color_jitter):
        values = tuple(float(v) for v in color_jitter)
    else:
        raise ValueError(f"color_jitter must be a number or 3 / 4 numbers (brightness, contrast, saturation[, hue]), "
                         f"got {color_jitter!r}; 0 turns it off")
    if any(v < 0 for v in values) or (len(values) == 4 and values[3] > 0.5):
        raise ValueError(f"color_jitter values must be >= 0 (hue <= 0.5), got {color_jitter!r}")
    return values if any(values) else None


def _pair(name: str, value: Sequence[float], lo: float, hi: float) -> tuple[float, float]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and lo < value[0] <= value[1] <= hi):
        raise ValueError(f"{name} must be two numbers [min, max] with {lo} < min <= max <= {hi}, got {value!r}")
    return float(value[0]), float(value[1])


def _check_prob(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} is a probability in [0, 1], got {value!r}")


# ------------------------------------------------------------------ build ---

def build_transforms(is_train: bool, img_size: int, mean: Sequence[float], std: Sequence[float],
                     policy: TrainAugment = "crop_flip", crop_padding: int = 4,
                     rrc_scale: Sequence[float] = (0.08, 1.0), rrc_ratio: Sequence[float] = (3 / 4, 4 / 3),
                     hflip: float = 0.5, eval_crop_ratio: float = 1.0, interpolation: Interpolation = "bilinear",
                     color_jitter: Union[float, Sequence[float], None] = 0.0, force_color_jitter: bool = False,
                     auto_augment: Optional[str] = None, re_prob: float = 0.0, re_mode: EraseMode = "const",
                     re_count: int = 1, **unknown: Any) -> v2.Compose:
    """Image (PIL or tensor) -> normalised float tensor (C, img_size, img_size).

    Every option is checked for eval too, so a config typo fails at once. Train pipeline by option:

    - ``policy`` (the crop):
      ``crop_flip``: resize, random crop with ``crop_padding`` pixels of zero padding (CIFAR style,
      He et al. 2016, "Deep Residual Learning");
      ``rrc_flip``: timm's RandomResizedCrop(``rrc_scale``, ``rrc_ratio``) (Szegedy et al. 2015, "Going
      Deeper with Convolutions"; the ImageNet / DeiT crop);
      ``simple_crop``: DeiT III's Simple Random Crop (Touvron et al. 2022, "DeiT III: Revenge of the ViT";
      its ``--src`` in facebookresearch/deit augment.py): resize the short side to img_size, then a random
      img_size crop with ``crop_padding`` (4 there) pixels of *reflect* padding;
      ``none``: the eval transform, no augmentation at all (every other train option is ignored).
    - ``hflip``: probability of a horizontal flip.
    - ``auto_augment`` (a timm string, or ``trivialaugment``): RandAugment ``rand-m9-mstd0.5-inc1`` (Cubuk et
      al. 2020, "RandAugment"), AutoAugment ``original`` / ``v0`` [+ ``-mstd0.5``] (Cubuk et al. 2019,
      "AutoAugment"), AugMix ``augmix-m5-w4-d2`` (Hendrycks et al. 2020, "AugMix"), ``3a``: DeiT III's
      3-Augment (one of grayscale / solarize / Gaussian blur per image, timm's ``3a`` AutoAugment policy),
      ``trivialaugment``: torchvision's TrivialAugmentWide (Müller & Hutter 2021, "TrivialAugment").
    - ``color_jitter``: brightness / contrast / saturation[/ hue] factors (a scalar s means (s, s, s));
      0 or null is off. As in timm, it is dropped when an auto-augment other than 3-Augment is set, unless
      ``force_color_jitter``.
    - ``interpolation``: of the resizes, crops and auto-augment ops (``random``: bilinear or bicubic per
      image, timm's default); eval uses it too (``random`` -> bilinear there).
    - ``re_prob`` / ``re_mode`` / ``re_count``: timm's RandomErasing (Zhong et al. 2020, "Random Erasing
      Data Augmentation") on the normalised tensor: with probability re_prob erase 1..re_count boxes,
      filled with 0 (``const``), one normal colour per box (``rand``) or normal noise per pixel (``pixel``).

    eval: resize the short side to img_size / ``eval_crop_ratio``, centre crop img_size (0.875: the
    classic 256 -> 224).
    """
    if unknown:
        raise ValueError(f"unknown augmentation option{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(repr(k) for k in unknown)}; valid: {', '.join(OPTIONS)}")
    if policy not in POLICIES:
        raise ValueError(f"unknown augmentation policy {policy!r}; choose {', '.join(POLICIES)}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose {', '.join(INTERPOLATIONS)}")
    if re_mode not in RE_MODES:
        raise ValueError(f"unknown re_mode {re_mode!r}; choose {', '.join(RE_MODES)}")
    if not (isinstance(re_count, int) and re_count >= 1):
        raise ValueError(f"re_count (the most boxes random erasing draws) must be an integer >= 1, got {re_count!r}")
    if not (isinstance(crop_padding, int) and crop_padding >= 0):
        raise ValueError(f"crop_padding must be an integer >= 0, got {crop_padding!r}")
    if not (isinstance(eval_crop_ratio, (int, float)) and 0 < eval_crop_ratio <= 1):
        raise ValueError(f"eval_crop_ratio must be in (0, 1] (1: no crop, 0.875: 256 -> 224), got {eval_crop_ratio!r}")
    _check_prob("hflip", hflip)
    _check_prob("re_prob", re_prob)
    scale = _pair("rrc_scale", rrc_scale, 0.0, 1.0)
    ratio = _pair("rrc_ratio", rrc_ratio, 0.0, float("inf"))
    aa_kind = parse_auto_augment(auto_augment)
    jitter = _color_jitter(color_jitter)

    norm = [v2.Normalize(mean=list(mean), std=list(std))]
    if not is_train or policy == "none":
        resize = int(round(img_size / eval_crop_ratio))
        eval_interp = "bilinear" if interpolation == "random" else interpolation
        return v2.Compose([_resize(resize, eval_interp), v2.CenterCrop(img_size)] + _to_float() + norm)

    # primary: the crop and the flip, on the image as it comes (PIL stays PIL, as in timm), except that an
    # auto-augment wants PIL: then a tensor is converted first (ToPILImage passes PIL images through).
    pre = [v2.ToPILImage()] if aa_kind else []
    if policy == "crop_flip":
        geo = [_resize(img_size, interpolation), v2.CenterCrop(img_size)]
        if crop_padding:
            geo.append(v2.RandomCrop(img_size, padding=crop_padding))
    elif policy == "simple_crop":
        geo = [_resize(img_size, interpolation),
               v2.RandomCrop(img_size, padding=crop_padding or None, padding_mode="reflect")]
    else:                                                    # rrc_flip
        geo = [RandomResizedCropAndInterpolation(img_size, scale=scale, ratio=ratio, interpolation=interpolation)]
    flip = [v2.RandomHorizontalFlip(hflip)] if hflip > 0 else []

    # secondary: auto-augment, then colour jitter (timm's order and its rule for when jitter is on)
    secondary: list = []
    if aa_kind:
        secondary.append(_auto_augment(auto_augment, aa_kind, img_size, mean, interpolation))
    if jitter and (not aa_kind or force_color_jitter or "3a" in auto_augment):
        secondary.append(v2.ColorJitter(*jitter))

    # final: float, normalise, erase (erasing draws its fill from N(0, 1): it belongs after normalisation)
    final = _to_float() + norm
    if re_prob > 0:
        final.append(RandomErasing(re_prob, mode=re_mode, max_count=re_count, num_splits=0, device="cpu"))
    return v2.Compose(pre + geo + flip + secondary + final)


def _auto_augment(spec: str, kind: str, img_size: int, mean: Sequence[float], interpolation: str) -> Any:
    """The timm (or torchvision, for TrivialAugment) transform for a checked ``auto_augment`` string."""
    fill = tuple(min(255, round(255 * m)) for m in mean)        # the mean colour, 0..255 per channel
    fill_pil: Union[int, tuple] = fill[0] if len(fill) == 1 else fill   # mode L wants one int
    if kind == "trivialaugment":
        interp = _interp("bilinear" if interpolation == "random" else interpolation)
        return v2.TrivialAugmentWide(interpolation=interp, fill=fill_pil if isinstance(fill_pil, int)
                                     else list(fill_pil))
    # the hparams timm's transforms_imagenet_train passes
    hparams: dict = dict(translate_const=int(img_size * 0.45), img_mean=fill_pil)
    if interpolation != "random":
        hparams["interpolation"] = str_to_pil_interp(interpolation)
    if kind == "rand":
        aa = rand_augment_transform(spec, hparams)
    elif kind == "augmix":
        hparams["translate_pct"] = 0.3
        aa = augment_and_mix_transform(spec, hparams)
    else:
        aa = auto_augment_transform(spec, hparams)
    _patch_posterize(aa)
    return aa
