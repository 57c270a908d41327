"""Batched, on-device augmentation for datasets that fit in memory.

The per-sample path (:func:`vitlab.data.transforms.build_transforms` in a
DataLoader) runs Python and a handful of small tensor ops per image on the
CPU. For a split that fits in memory (CIFAR, digits, a few thousand JPEGs
pre-decoded once) that overhead dominates, and the accelerator waits. Here:

* :class:`InMemoryImages` holds the whole split as ONE uint8 tensor
  ``(N, C, H, W)`` and answers a DataLoader's batch request with one tensor
  index (``__getitems__``), so fetching a batch does no per-sample Python work;
* :class:`BatchAugment` applies the same crop / flip / normalise policies to the
  whole batch at once on the device the batch lives on (after
  ``.to(device)``), drawing from that device's global torch RNG so a seeded
  run is reproducible and a checkpoint's saved RNG state restores it.

Typical use::

    mem = InMemoryImages.from_dataset(source.dataset("train"), img_size=32)
    loader = DataLoader(mem, batch_size=128, shuffle=True, collate_fn=passthrough_collate)
    aug = BatchAugment(32, source.mean, source.std, policy="crop_flip").to(device)
    for batch in loader:
        images = aug(batch["image"].to(device, non_blocking=True))     # (B, C, 32, 32) float, normalised

What differs from the per-sample path (same policies, same distributions):

* Crops start from the *stored* image (resized once so its shorter side is
  ``img_size``, then centre-cropped square), not from the original file:
  ``rrc_flip`` therefore samples its box inside that square (store larger
  images, ``from_dataset(ds, img_size=larger)``, to keep more of the
  original), and ``simple_crop`` cannot move along a longer side.
* ``rrc_flip`` resamples with ``torchvision.ops.roi_align(aligned=True)``:
  bilinear at pixel centres, equal to ``interpolate(bilinear,
  align_corners=False)`` of the crop when enlarging, except in the crop's
  outermost half pixel, which blends with the image pixels just outside the
  box (crop-then-resize repeats the crop's edge pixel there). When shrinking
  it averages ``ceil(crop / out)`` bilinear samples per output pixel along
  each axis (a box filter) instead of an antialiased triangle filter. The
  per-sample path resizes PIL images with PIL's filters (slightly different
  weights again, within a few 1/255 on 8-bit images).
* The box sampler draws all 10 tries of every image at once (torchvision and
  timm draw them one by one and stop at the first fit), so the boxes follow
  the same distribution but not the same random stream.
* :meth:`InMemoryImages.from_dataset` stores 8-bit pixels: float sources
  (e.g. digits) are quantised to 1/255 once, and resizing at load time rounds
  to uint8.
* Only ``policy``, ``crop_padding``, ``rrc_scale``, ``rrc_ratio``, ``hflip`` and
  ``eval_crop_ratio`` act here; per-sample-only options (auto-augment, colour
  jitter, random erasing, bicubic ``interpolation``) are accepted, reported by
  :func:`unsupported_options` / :attr:`BatchAugment.skipped` and logged.

This module imports torch and torchvision only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

log = logging.getLogger("vitlab")

Policy = Literal["none", "crop_flip", "rrc_flip", "simple_crop"]
_POLICIES = ("none", "crop_flip", "rrc_flip", "simple_crop")
# data.augment keys BatchAugment implements; any other key with an active value is per-sample only
SUPPORTED_KEYS = ("policy", "crop_padding", "rrc_scale", "rrc_ratio", "hflip", "eval_crop_ratio")


# ------------------------------------------------------------------ helpers ---

def _to_chw_tensor(image: Any) -> Tensor:
    """PIL image, HWC uint8 array or CHW tensor -> CHW tensor (uint8 or float in [0, 1])."""
    if isinstance(image, Tensor):
        return image if image.ndim == 3 else image.unsqueeze(0)            # (H, W) -> (1, H, W)
    if isinstance(image, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(image))
        return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    from torchvision.transforms.v2.functional import pil_to_tensor

    return pil_to_tensor(image)                                             # (C, H, W) uint8


def _resize_center_crop(x: Tensor, size: int, crop_ratio: float = 1.0) -> Tensor:
    """(..., C, H, W) -> (..., C, size, size): shorter side to round(size / crop_ratio), antialiased, centre crop.

    The per-sample eval geometry (``Resize(round(size / ratio))`` + ``CenterCrop(size)``); a no-op when the
    input already is ``size`` square and ``crop_ratio`` is 1.
    """
    from torchvision.transforms.v2 import functional as TF

    h, w = x.shape[-2:]
    if (h, w) == (size, size) and crop_ratio == 1.0:
        return x
    resize = round(size / crop_ratio)
    x = TF.resize(x, [resize], antialias=True)                              # shorter side -> resize
    return TF.center_crop(x, [size, size])


def _to_uint8(x: Tensor) -> Tensor:
    if x.dtype == torch.uint8:
        return x
    if x.is_floating_point():
        return x.mul(255).round_().clamp_(0, 255).to(torch.uint8)          # [0, 1] -> 8-bit, rounded
    raise TypeError(f"images must be uint8 or float in [0, 1], got {x.dtype}; convert the dataset's images first")


def passthrough_collate(batch: Any) -> Any:
    """Collate for :class:`InMemoryImages`: a batch dict from ``__getitems__`` passes through untouched.

    A list of per-sample items (a wrapper without ``__getitems__``) is stacked with ``default_collate``.
    """
    if isinstance(batch, Mapping):
        return batch
    return default_collate(batch)


# ---------------------------------------------------------------- dataset ---

class _Uint8Items(Dataset):
    """(image, label) items -> (uint8 (C, size, size), label), for loading a split into memory."""

    def __init__(self, base: Dataset, img_size: int, crop_ratio: float):
        self.base, self.img_size, self.crop_ratio = base, img_size, crop_ratio

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image, label = self.base[i]
        x = _to_chw_tensor(image)                     # float sources resize in float, quantised once at the end
        return _to_uint8(_resize_center_crop(x, self.img_size, self.crop_ratio)), int(label)


class InMemoryImages(Dataset):
    """A whole split as one uint8 tensor ``images (N, C, H, W)`` and ``labels (N,)`` (long).

    ``ds[i]`` is a per-sample dict ``{"image": uint8 (C, H, W), "label": long (), "index": long ()}``;
    ``ds.__getitems__(indices)`` (what a DataLoader calls with a whole batch's indices when the dataset
    defines it) is the batch dict ``{"image": uint8 (B, C, H, W), "label": long (B,), "index": long (B,)}``
    made with one tensor index. Use ``collate_fn=passthrough_collate``.
    """

    def __init__(self, images: Tensor, labels: Tensor):
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},) to match the images, "
                             f"got {tuple(labels.shape)}")
        self.images, self.labels = images, labels

    @classmethod
    def from_dataset(cls, ds: Dataset, img_size: int, crop_ratio: float = 1.0, num_workers: int = 0,
                     batch_size: int = 256) -> InMemoryImages:
        """Decode (and, where needed, resize) every item of a vitlab split dataset once.

        Items are (PIL image, label), (uint8 HWC array, label) or (float tensor in [0, 1], label).
        Images not already ``img_size`` square are resized (shorter side to ``img_size / crop_ratio``,
        antialiased) and centre-cropped to ``img_size``. ``num_workers`` decodes in parallel.
        """
        if len(ds) == 0:
            raise ValueError("the dataset is empty; nothing to hold in memory (check data.root and the split)")
        loader = DataLoader(_Uint8Items(ds, img_size, crop_ratio), batch_size=batch_size, shuffle=False,
                            num_workers=num_workers)
        images: Tensor | None = None
        labels = torch.empty(len(ds), dtype=torch.long)
        start = 0
        for x, y in loader:                                                 # x: (b, C, S, S) uint8
            if images is None:                                              # allocate once: no second copy
                images = torch.empty((len(ds), *x.shape[1:]), dtype=torch.uint8)
            images[start:start + len(x)] = x
            labels[start:start + len(x)] = y
            start += len(x)
        return cls(images, labels)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        return {"image": self.images[i], "label": self.labels[i], "index": torch.tensor(i, dtype=torch.long)}

    def __getitems__(self, indices: Sequence[int]) -> dict:
        idx = torch.as_tensor(indices, dtype=torch.long)                    # (B,)
        # index_select: one gather, several times faster than advanced indexing for a batch of rows
        return {"image": self.images.index_select(0, idx), "label": self.labels.index_select(0, idx), "index": idx}


# ------------------------------------------------------------ box sampler ---

def sample_rrc_boxes(n: int, height: int, width: int, scale: Sequence[float] = (0.08, 1.0),
                     ratio: Sequence[float] = (3 / 4, 4 / 3), device: torch.device | str = "cpu",
                     tries: int = 10) -> Tensor:
    """RandomResizedCrop boxes for ``n`` images of ``height x width``: long (n, 4) as (top, left, h, w).

    Torchvision's rule, vectorised: per image, up to ``tries`` draws of area fraction ~ U(scale) and
    log aspect ratio ~ U(log ratio); the first draw that fits is used, at a uniformly random position;
    when none fits, the largest centred box whose aspect ratio lies within ``ratio``.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target = area * torch.empty(n, tries, device=device).uniform_(scale[0], scale[1])     # (n, tries)
    aspect = torch.exp(torch.empty(n, tries, device=device).uniform_(log_lo, log_hi))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.int32).argmax(dim=1, keepdim=True)               # first fitting try (0 if none)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)    # (n,)
    top = torch.floor(torch.rand(n, device=device) * (height - h + 1)).clamp_(min=0)
    left = torch.floor(torch.rand(n, device=device) * (width - w + 1)).clamp_(min=0)
    top, left = torch.minimum(top, height - h), torch.minimum(left, width - w)

    # fallback: centre crop, as torchvision
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fh, fw = height, round(height * max(ratio))
    else:
        fw, fh = width, height
    any_fit = fits.any(dim=1)
    box = torch.stack([top, left, h, w], dim=1)
    fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=box.dtype, device=device)
    return torch.where(any_fit[:, None], box, fallback).long()


def crop_resize(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Crop box ``b`` of image ``b`` and resize it to ``size x size``, all images in one roi_align call.

    images: float (B, C, H, W); boxes: (B, 4) as (top, left, h, w) in pixels. ``aligned=True`` samples at
    pixel centres (half-pixel convention of ``interpolate(align_corners=False)``); ``sampling_ratio=-1``
    averages ceil(crop / size) samples per output pixel along each axis when shrinking.
    """
    from torchvision.ops import roi_align

    b = boxes.to(images.dtype)
    top, left, h, w = b.unbind(1)
    batch_idx = torch.arange(images.shape[0], device=images.device, dtype=images.dtype)
    rois = torch.stack([batch_idx, left, top, left + w, top + h], dim=1)   # (B, 5): idx, x1, y1, x2, y2
    return roi_align(images, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


# ------------------------------------------------------------- augmenter ---

class BatchAugment(nn.Module):
    """uint8 or float [0, 1] batch (B, C, H, W) -> normalised float (B, C, img_size, img_size), on its device.

    train + ``crop_flip``: resize (if not ``img_size`` square), random crop with ``crop_padding`` pixels of
    zero padding, each image its own offset; horizontal flip with probability ``hflip``, per image.
    train + ``simple_crop``: the same with *reflect* padding (DeiT III's Simple Random Crop).
    train + ``rrc_flip``: RandomResizedCrop(``rrc_scale``, ``rrc_ratio``) per image, flip per image.
    eval, or ``policy="none"`` (as in ``build_transforms``): resize to img_size / eval_crop_ratio if needed,
    centre crop, normalise. Randomness comes from the global RNG of the batch's device.

    The other ``data.augment`` options (``auto_augment``, ``color_jitter``, ``re_prob``, a non-bilinear
    ``interpolation``, ...) are accepted so a whole ``data.augment`` mapping can be passed, but they are
    per-sample only: the active ones are listed in :attr:`skipped` and logged once as a warning. A key
    ``build_transforms`` does not know either is an error.
    """

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float], train: bool = True,
                 policy: Policy = "crop_flip", crop_padding: int = 4,
                 rrc_scale: Sequence[float] = (0.08, 1.0), rrc_ratio: Sequence[float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5, eval_crop_ratio: float = 1.0, **per_sample_options: Any):
        super().__init__()
        if policy not in _POLICIES:
            raise ValueError(f"unknown augmentation policy {policy!r}; choose {', '.join(_POLICIES)}")
        if len(mean) != len(std):
            raise ValueError(f"mean ({len(mean)} values) and std ({len(std)}) must have one value per channel")
        if not (isinstance(crop_padding, int) and crop_padding >= 0):
            raise ValueError(f"crop_padding must be an integer >= 0, got {crop_padding!r}")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip is a probability in [0, 1], got {hflip!r}")
        self.img_size, self.train, self.policy = img_size, train, policy
        self.crop_padding, self.hflip, self.eval_crop_ratio = crop_padding, float(hflip), float(eval_crop_ratio)
        self.rrc_scale, self.rrc_ratio = tuple(float(s) for s in rrc_scale), tuple(float(r) for r in rrc_ratio)
        active = _check_per_sample_options(per_sample_options)             # unknown keys fail in eval too
        self.skipped = active if train and policy != "none" else []          # eval applies none of them anyway
        if self.skipped:
            log.warning("the batched augmentation does not apply the per-sample-only option%s %s; use "
                        "data.batched_augment=false to get them", "s" if len(self.skipped) > 1 else "",
                        ", ".join(self.skipped))
        # Normalize((x / 255 - mean) / std) as one multiply-add on the raw values: x * scale + shift, with
        # scale = 1 / (255 std) for uint8 input and 1 / std for float input. Crops, bilinear resampling and
        # flips are linear with weights summing to 1, so it is applied once, last, on the smallest tensor.
        # (C, 1, 1) buffers move with .to(device); not saved in state dicts (they come from the data config).
        m = torch.tensor(list(mean), dtype=torch.float64).view(-1, 1, 1)
        sd = torch.tensor(list(std), dtype=torch.float64).view(-1, 1, 1)
        self.register_buffer("mean", m.float(), persistent=False)
        self.register_buffer("scale_u8", (1.0 / (255.0 * sd)).float(), persistent=False)
        self.register_buffer("scale_float", (1.0 / sd).float(), persistent=False)
        self.register_buffer("shift", (-m / sd).float(), persistent=False)

    @classmethod
    def from_config(cls, augment: Mapping, img_size: int, mean: Sequence[float], std: Sequence[float],
                    train: bool = True) -> BatchAugment:
        """From a whole ``data.augment`` mapping (per-sample-only options are reported in ``skipped``)."""
        return cls(img_size, mean, std, train=train, **dict(augment))

    def extra_repr(self) -> str:
        if not self.train or self.policy == "none":
            return f"img_size={self.img_size}, eval, eval_crop_ratio={self.eval_crop_ratio}"
        geo = (f"rrc_scale={self.rrc_scale}, rrc_ratio={self.rrc_ratio}" if self.policy == "rrc_flip"
               else f"crop_padding={self.crop_padding}")
        return f"img_size={self.img_size}, policy={self.policy}, {geo}, hflip={self.hflip}"

    @staticmethod
    def _raw_float(x: Tensor) -> Tensor:
        """uint8 (0..255) or float (0..1) -> float32 with the values unchanged (no copy for float32)."""
        if x.dtype == torch.uint8 or x.is_floating_point():
            return x.to(torch.float32)
        raise TypeError(f"BatchAugment takes uint8 or float images, got {x.dtype}")

    def _normalize(self, x: Tensor, from_uint8: bool, inplace: bool) -> Tensor:
        scale = self.scale_u8 if from_uint8 else self.scale_float
        return x.mul_(scale).add_(self.shift) if inplace else torch.addcmul(self.shift, x, scale)

    def _flip_mask(self, n: int, device: torch.device) -> Tensor:
        return torch.rand(n, device=device) < self.hflip                    # (B,) bool, as RandomHorizontalFlip

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4:
            raise ValueError(f"BatchAugment takes a batch (B, C, H, W), got shape {tuple(images.shape)}")
        if images.shape[1] != self.mean.shape[0]:
            raise ValueError(f"images have {images.shape[1]} channels but mean/std have {self.mean.shape[0]}")
        from_uint8 = images.dtype == torch.uint8
        if not self.train or self.policy == "none":
            x = _resize_center_crop(self._raw_float(images), self.img_size, self.eval_crop_ratio)
            return self._normalize(x, from_uint8, inplace=False)          # x may be the caller's tensor
        if self.policy == "rrc_flip":
            return self._rrc_flip(images, from_uint8)
        return self._crop_flip(images, from_uint8, "reflect" if self.policy == "simple_crop" else "constant")

    def _crop_flip(self, images: Tensor, from_uint8: bool, pad_mode: str) -> Tensor:
        x = images
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):          # per-sample: Resize + CenterCrop first
            x = _resize_center_crop(self._raw_float(x), self.img_size)
        b, c, s, p = x.shape[0], x.shape[1], self.img_size, self.crop_padding
        dev = x.device
        flip = self._flip_mask(b, dev)                                       # (B,)
        ar = torch.arange(s, device=dev)                                     # (S,)
        if p > 0:
            x = F.pad(x, (p, p, p, p), mode=pad_mode)                        # (B, C, S+2p, S+2p), zeros or mirror
            oy = torch.randint(0, 2 * p + 1, (b,), device=dev)               # (B,) top-left of each window
            ox = torch.randint(0, 2 * p + 1, (b,), device=dev)
        else:
            oy = ox = torch.zeros(b, dtype=torch.long, device=dev)
        rows = oy[:, None] + ar                                              # (B, S)
        # the flip folded into the gather: a flipped image reads its window's columns right to left
        cols = ox[:, None] + torch.where(flip[:, None], ar.flip(0), ar)      # (B, S)
        # one gather over flattened pixels, the index shared by the channels (expand: no copy); several
        # times faster than 4-D advanced indexing on CPU
        width = x.shape[-1]
        flat = (rows[:, :, None] * width + cols[:, None, :]).view(b, 1, s * s).expand(b, c, s * s)
        out = torch.gather(x.reshape(b, c, -1), 2, flat).view(b, c, s, s)  # (B, C, S, S), a new tensor
        return self._normalize(self._raw_float(out), from_uint8, inplace=True)

    def _rrc_flip(self, images: Tensor, from_uint8: bool) -> Tensor:
        b, _, h, w = images.shape
        dev = images.device
        boxes = sample_rrc_boxes(b, h, w, self.rrc_scale, self.rrc_ratio, device=dev)   # (B, 4) top, left, h, w
        flip = self._flip_mask(b, dev)
        # flip(crop(x, box)) == crop(flip(x), mirrored box): flipping the input (uint8: a quarter of the bytes
        # of the float output) replaces a flip of the resampled output
        x = torch.where(flip[:, None, None, None], images.flip(-1), images)
        left = torch.where(flip, w - boxes[:, 1] - boxes[:, 3], boxes[:, 1])
        boxes = torch.stack([boxes[:, 0], left, boxes[:, 2], boxes[:, 3]], dim=1)
        out = crop_resize(self._raw_float(x), boxes, self.img_size)        # (B, C, S, S), a new tensor
        return self._normalize(out, from_uint8, inplace=True)


# options that only change how another option acts: never active on their own
_MODIFIERS = ("re_mode", "re_count", "force_color_jitter")
_INACTIVE = (None, False, 0, 0.0, "", "none", "off", "null")


def unsupported_options(augment: Mapping) -> list[str]:
    """The active ``data.augment`` options that only the per-sample path applies, as ``key=value``.

    An option counts as active unless its value is None, False, 0, empty or "none"/"off"; ``interpolation``
    unless it is "bilinear" (the batched path resamples bilinearly); ``re_mode``, ``re_count`` and
    ``force_color_jitter`` only modify other options and are never listed.
    """
    out = []
    for key, value in augment.items():
        if key in SUPPORTED_KEYS or key in _MODIFIERS or (key == "interpolation" and value == "bilinear"):
            continue
        if isinstance(value, (list, tuple, Mapping)):
            if len(value) == 0:
                continue
        elif value in _INACTIVE:
            continue
        out.append(f"{key}={value}")
    return out


def _check_per_sample_options(options: Mapping) -> list[str]:
    """Reject keys build_transforms does not know either (config typos); return the active ones."""
    if options:                                                             # lazy import: transforms loads timm
        from vitlab.data.transforms import OPTIONS

        unknown = [k for k in options if k not in OPTIONS]
        if unknown:
            raise ValueError(f"unknown augmentation option{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(repr(k) for k in unknown)}; valid: {', '.join(OPTIONS)}")
    return unsupported_options(options)
