"""DINO's multi-crop augmentation (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
Transformers"; ``DataAugmentationDINO`` in facebookresearch/dino main_dino.py).

One image -> ``[global_1, global_2, local_1 .. local_N]``, each a normalised float tensor (C, H, W):

    every view   RandomResizedCrop (global: ``global_scale`` at ``global_size``; local: ``local_scale`` at
                 ``local_size``) -> horizontal flip (p 0.5) -> colour jitter (p 0.8) -> grayscale (p 0.2)
    global 1     Gaussian blur (p 1.0)
    global 2     Gaussian blur (p 0.1) -> solarize (p 0.2)
    locals       Gaussian blur (p 0.5)

The blur's sigma is drawn from (0.1, 2.0) pixels as in DINO at 224 pixels; for smaller images (CIFAR at 32)
both ends are scaled by global_size / 224, so a blur removes the same share of the image. The kernel covers
+-3 sigma and never exceeds the crop. With ``in_chans=1`` the jitter changes brightness and contrast only
(saturation and hue do not exist in one channel) and there is no grayscale step.

Inputs: PIL images (RGB or L), uint8 tensors, or float tensors in [0, 1] (the 1-channel digits). The image is
cropped in its own dtype, then converted to float in [0, 1] for the colour operations (solarize's threshold is
0.5 there, DINO's 128 of 255). All randomness comes from torch's generator, so ``torch.manual_seed`` makes
the views reproducible. After the default collate, a batch's ``"image"`` is a list of tensors
``[(B, C, Hg, Wg), (B, C, Hg, Wg), (B, C, Hl, Wl) x N]``. Built from torchvision.transforms.v2.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import torch
from torchvision.transforms import InterpolationMode, v2

Interpolation = Literal["bilinear", "bicubic"]

SOLARIZE_THRESHOLD = 0.5                 # on [0, 1] floats: the same pixels as PIL's 128 on uint8 (127/255 < 0.5)


def _clamp01(x: torch.Tensor) -> torch.Tensor:
    # bicubic resampling of a float image overshoots [0, 1] slightly; the colour ops assume that range
    return x.clamp(0.0, 1.0)


def _check_range(name: str, value: Sequence[float]) -> tuple[float, float]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            and 0.0 < value[0] <= value[1] <= 1.0):
        raise ValueError(f"{name} must be two numbers [min, max] with 0 < min <= max <= 1 (fractions of the image "
                         f"area a crop covers), got {value!r}")
    return float(value[0]), float(value[1])


def _check_size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer (pixels), got {value!r}")
    return value


class MultiCropTransform:
    """DINO's multi-crop: image -> list of 2 global and ``num_local`` local normalised views (see the module doc).

    ``color_jitter``: brightness, contrast, saturation, hue (DINO: 0.4, 0.4, 0.2, 0.1); with ``in_chans=1``
    only the first two are used.
    """

    def __init__(self, global_size: int, local_size: int, num_local: int, mean: Sequence[float],
                 std: Sequence[float], in_chans: int = 3, global_scale: Sequence[float] = (0.4, 1.0),
                 local_scale: Sequence[float] = (0.05, 0.4),
                 color_jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1), interpolation: Interpolation = "bicubic"):
        self.global_size = _check_size("global_size", global_size)
        self.local_size = _check_size("local_size", local_size)
        if isinstance(num_local, bool) or not isinstance(num_local, int) or num_local < 0:
            raise ValueError(f"num_local (the number of local crops) must be an integer >= 0, got {num_local!r}")
        self.num_local = num_local
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans!r}")
        self.in_chans = in_chans
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"mean and std need one value per channel ({in_chans}), got mean={list(mean)} "
                             f"std={list(std)}; take them from the dataset (data.source.mean / std)")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be > 0, got {list(std)}")
        self.global_scale = _check_range("global_scale", global_scale)
        self.local_scale = _check_range("local_scale", local_scale)
        if not (isinstance(color_jitter, (list, tuple)) and len(color_jitter) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in color_jitter)
                and color_jitter[3] <= 0.5):
            raise ValueError(f"color_jitter must be 4 numbers >= 0 (brightness, contrast, saturation, hue <= 0.5), "
                             f"got {color_jitter!r}; [0, 0, 0, 0] turns it off")
        self.color_jitter = tuple(float(v) for v in color_jitter)
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be bilinear or bicubic, got {interpolation!r}")
        self.interpolation = interpolation
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]

        # DINO's blur sigma in pixels at 224; smaller images scale it down with their size
        scale = min(1.0, self.global_size / 224)
        self.blur_sigma = (0.1 * scale, 2.0 * scale)
        self.global1 = self._view(self.global_size, self.global_scale, blur=1.0, solarize=0.0)
        self.global2 = self._view(self.global_size, self.global_scale, blur=0.1, solarize=0.2)
        self.local = self._view(self.local_size, self.local_scale, blur=0.5, solarize=0.0)

    # ------------------------------------------------------------ pieces ---
    def _blur(self, size: int) -> v2.GaussianBlur:
        kernel = 2 * math.ceil(3 * self.blur_sigma[1]) + 1          # covers +-3 sigma (odd)
        largest = size if size % 2 else size - 1                     # the largest odd size inside the crop
        return v2.GaussianBlur(max(1, min(kernel, largest)), sigma=self.blur_sigma)

    def _view(self, size: int, scale: tuple[float, float], blur: float, solarize: float) -> v2.Compose:
        interp = InterpolationMode.BICUBIC if self.interpolation == "bicubic" else InterpolationMode.BILINEAR
        b, c, s, h = self.color_jitter
        if self.in_chans == 1:                        # no colour in one channel: brightness / contrast only
            colour: list = [v2.RandomApply([v2.ColorJitter(b, c)], p=0.8)] if b or c else []
        else:
            colour = [v2.RandomApply([v2.ColorJitter(b, c, s, h)], p=0.8)] if any(self.color_jitter) else []
            colour.append(v2.RandomGrayscale(p=0.2))
        ops: list = [
            v2.ToImage(),                             # PIL -> uint8 tensor image; tensors keep their dtype
            v2.RandomResizedCrop(size, scale=scale, interpolation=interp, antialias=True),
            v2.RandomHorizontalFlip(0.5),
            v2.ToDtype(torch.float32, scale=True),    # uint8 -> [0, 1]; floats stay as they are
            v2.Lambda(_clamp01),
            *colour,
        ]
        if blur >= 1.0:
            ops.append(self._blur(size))
        elif blur > 0:
            ops.append(v2.RandomApply([self._blur(size)], p=blur))
        if solarize > 0:
            ops.append(v2.RandomSolarize(SOLARIZE_THRESHOLD, p=solarize))
        ops.append(v2.Normalize(mean=self.mean, std=self.std))
        return v2.Compose(ops)

    # ----------------------------------------------------------- calling ---
    def _channels(self, image: Any) -> int:
        if torch.is_tensor(image):
            return 1 if image.ndim == 2 else int(image.shape[-3])
        return len(image.getbands())

    def __call__(self, image: Any) -> list[torch.Tensor]:
        c = self._channels(image)
        if c != self.in_chans:
            raise ValueError(f"multi-crop was built for {self.in_chans}-channel images but got a {c}-channel "
                             f"image; set the backbone's in_chans to the data's channels ({c})")
        views = [self.global1(image), self.global2(image)]
        views += [self.local(image) for _ in range(self.num_local)]
        return [v.as_subclass(torch.Tensor) for v in views]          # plain tensors, not tv_tensors.Image

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(global_size={self.global_size}, local_size={self.local_size}, "
                f"num_local={self.num_local}, in_chans={self.in_chans}, global_scale={self.global_scale}, "
                f"local_scale={self.local_scale}, color_jitter={self.color_jitter}, "
                f"interpolation={self.interpolation!r}, blur_sigma=({self.blur_sigma[0]:.3g}, "
                f"{self.blur_sigma[1]:.3g}))")
