"""In-memory datasets with batch fetch, and batched on-device augmentation (vitlab/data/batched.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vitlab.data.base import ArrayDataset
from vitlab.data.batched import (
    BatchAugment,
    InMemoryImages,
    crop_resize,
    passthrough_collate,
    sample_rrc_boxes,
    unsupported_options,
)
from vitlab.data.transforms import build_transforms

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _pil_dataset(n: int = 12, size: int = 8, seed: int = 0) -> tuple[ArrayDataset, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)        # (N, H, W, C) like CIFAR
    return ArrayDataset(arrays, rng.integers(0, 10, size=n), Image.fromarray), arrays


def _float_dataset(n: int = 6, size: int = 8) -> ArrayDataset:
    rng = np.random.default_rng(1)
    arrays = (rng.integers(0, 17, size=(n, size, size)) / 16.0).astype(np.float32)  # digits-like, in [0, 1]
    return ArrayDataset(arrays, np.arange(n) % 10, lambda a: torch.from_numpy(a).unsqueeze(0))


def _uint8_batch(b: int, c: int = 3, s: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, s, s), dtype=torch.uint8, generator=g)


def _window(padded: torch.Tensor, b: int, oy: int, ox: int, s: int, flip: bool) -> torch.Tensor:
    w = padded[b, :, oy:oy + s, ox:ox + s]                             # (C, s, s) window at offset (oy, ox)
    return w.flip(-1) if flip else w


# ------------------------------------------------------------ InMemoryImages ---

def test_from_pil_items_holds_exact_pixels():
    ds, arrays = _pil_dataset()
    mem = InMemoryImages.from_dataset(ds, img_size=8)
    assert mem.images.dtype == torch.uint8 and mem.images.shape == (12, 3, 8, 8)
    assert mem.labels.dtype == torch.long and mem.labels.tolist() == ds.labels.tolist()
    assert torch.equal(mem.images, torch.from_numpy(arrays).permute(0, 3, 1, 2))


def test_from_float_items_resizes_once_like_the_eval_path():
    ds = _float_dataset()
    mem = InMemoryImages.from_dataset(ds, img_size=16)
    assert mem.images.shape == (6, 1, 16, 16) and mem.images.dtype == torch.uint8
    tf = build_transforms(False, 16, (0.0,), (1.0,))                  # float resize + centre crop, no normalising
    ref = torch.stack([tf(ds[i][0]) for i in range(len(ds))])
    assert (mem.images.float() / 255 - ref).abs().max() <= 0.5 / 255 + 1e-6   # only the 8-bit rounding differs


def test_getitems_equals_stacked_getitem():
    mem = InMemoryImages.from_dataset(_pil_dataset()[0], img_size=8)
    idx = [5, 0, 11, 5]
    batch = mem.__getitems__(idx)
    items = [mem[i] for i in idx]
    assert batch["image"].shape == (4, 3, 8, 8) and batch["image"].dtype == torch.uint8
    assert torch.equal(batch["image"], torch.stack([it["image"] for it in items]))
    assert torch.equal(batch["label"], torch.stack([it["label"] for it in items]))
    assert batch["label"].dtype == torch.long and batch["index"].dtype == torch.long
    assert batch["index"].tolist() == idx and [int(it["index"]) for it in items] == idx


class _CountingImages(InMemoryImages):
    per_sample_calls = 0

    def __getitem__(self, i):
        type(self).per_sample_calls += 1
        return super().__getitem__(i)


def test_dataloader_fetches_a_batch_with_one_index():
    src = InMemoryImages.from_dataset(_pil_dataset()[0], img_size=8)
    mem = _CountingImages(src.images, src.labels)
    order = [3, 1, 4, 10, 5, 9, 2, 6]
    loader = DataLoader(mem, batch_size=4, sampler=order, collate_fn=passthrough_collate)
    batches = list(loader)
    assert _CountingImages.per_sample_calls == 0                      # torch called __getitems__, not __getitem__
    assert len(batches) == 2
    for batch, idx in zip(batches, (order[:4], order[4:])):
        want = mem.__getitems__(idx)
        assert all(torch.equal(batch[k], want[k]) for k in ("image", "label", "index"))


class _PerSampleOnly(Dataset):
    def __init__(self, mem: InMemoryImages):
        self.mem = mem

    def __len__(self) -> int:
        return len(self.mem)

    def __getitem__(self, i):
        return self.mem[i]


def test_passthrough_collate_stacks_per_sample_items():
    mem = InMemoryImages.from_dataset(_pil_dataset()[0], img_size=8)
    batch = next(iter(DataLoader(_PerSampleOnly(mem), batch_size=5, collate_fn=passthrough_collate)))
    assert torch.equal(batch["image"], mem.images[:5]) and batch["index"].tolist() == list(range(5))


def test_rejects_non_uint8_images():
    with pytest.raises(ValueError, match="uint8"):
        InMemoryImages(torch.zeros(2, 3, 4, 4), torch.zeros(2))


# -------------------------------------------------------------- BatchAugment ---

def test_policy_none_equals_the_per_sample_eval_path():
    ds, _ = _pil_dataset()
    mem = InMemoryImages.from_dataset(ds, img_size=8)
    tf = build_transforms(False, 8, MEAN, STD)
    ref = torch.stack([tf(ds[i][0]) for i in range(len(ds))])
    for train in (True, False):                                        # policy none = the eval path, as per-sample
        out = BatchAugment(8, MEAN, STD, train=train, policy="none")(mem.images)
        assert out.dtype == torch.float32 and out.shape == (12, 3, 8, 8)
        assert (out - ref).abs().max() < 1e-5
    evaluated = BatchAugment(8, MEAN, STD, train=False, policy="crop_flip")(mem.images)
    assert (evaluated - ref).abs().max() < 1e-5


def test_eval_path_leaves_a_float_input_untouched():
    x = torch.rand(2, 3, 8, 8)
    before = x.clone()
    BatchAugment(8, MEAN, STD, train=False)(x)
    assert torch.equal(x, before)


def test_crop_flip_without_padding_or_flip_resizes_like_the_per_sample_path():
    x = torch.rand(4, 3, 16, 16)                                      # float images: both resize with torch
    tf = build_transforms(True, 8, MEAN, STD, policy="crop_flip", crop_padding=0, hflip=0.0)
    ref = torch.stack([tf(img) for img in x])
    out = BatchAugment(8, MEAN, STD, policy="crop_flip", crop_padding=0, hflip=0.0)(x)   # resized on the fly
    assert out.shape == (4, 3, 8, 8) and (out - ref).abs().max() < 1e-5


def test_crop_flip_gives_each_image_an_exact_window_of_the_padded_input():
    torch.manual_seed(0)
    x, p, s = _uint8_batch(16), 2, 8
    out = BatchAugment(s, (0.0,) * 3, (1.0,) * 3, policy="crop_flip", crop_padding=p, hflip=0.5)(x)
    assert out.shape == (16, 3, s, s)
    got = torch.round(out * 255).to(torch.uint8)                       # mean 0, std 1: back to the pixels
    padded = F.pad(x, (p, p, p, p))
    found = []
    for b in range(len(x)):
        matches = [(oy, ox, f) for oy in range(2 * p + 1) for ox in range(2 * p + 1) for f in (False, True)
                   if torch.equal(got[b], _window(padded, b, oy, ox, s, f))]
        assert len(matches) == 1, f"image {b}: {len(matches)} matching windows"
        found.append(matches[0])
    assert len({m[:2] for m in found}) > 1 and len({m[2] for m in found}) == 2   # offsets and flips per image


def test_simple_crop_takes_windows_of_the_reflect_padded_input():
    torch.manual_seed(2)
    x, p, s = _uint8_batch(8), 3, 8
    out = BatchAugment(s, (0.0,) * 3, (1.0,) * 3, policy="simple_crop", crop_padding=p, hflip=0.0)(x)
    got = torch.round(out * 255).to(torch.uint8)
    padded = F.pad(x, (p, p, p, p), mode="reflect")
    for b in range(len(x)):
        assert any(torch.equal(got[b], _window(padded, b, oy, ox, s, False))
                   for oy in range(2 * p + 1) for ox in range(2 * p + 1))


def test_flips_are_per_image():
    torch.manual_seed(1)
    x = _uint8_batch(64)
    out = BatchAugment(8, (0.0,) * 3, (1.0,) * 3, policy="crop_flip", crop_padding=0, hflip=0.5)(x)
    got = torch.round(out * 255).to(torch.uint8)
    same = [torch.equal(got[b], x[b]) for b in range(64)]
    flipped = [torch.equal(got[b], x[b].flip(-1)) for b in range(64)]
    assert all(a != f for a, f in zip(same, flipped))                  # each is the image or its mirror
    assert 0 < sum(flipped) < 64
    never = BatchAugment(8, (0.0,) * 3, (1.0,) * 3, policy="crop_flip", crop_padding=0, hflip=0.0)(x)
    assert torch.equal(torch.round(never * 255).to(torch.uint8), x)


def test_rrc_boxes_lie_inside_and_follow_scale_and_ratio():
    torch.manual_seed(0)
    h, w, scale, ratio = 200, 160, (0.2, 0.9), (0.5, 2.0)
    boxes = sample_rrc_boxes(4000, h, w, scale, ratio)
    assert boxes.dtype == torch.long and boxes.shape == (4000, 4)
    top, left, bh, bw = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + bh <= h).all() and (left + bw <= w).all()
    area, aspect = (bh * bw).double() / (h * w), bw.double() / bh
    tol = 0.03                                                         # width and height are rounded to pixels
    assert area.min() >= scale[0] * (1 - tol) and area.max() <= scale[1] * (1 + tol)
    assert aspect.min() >= ratio[0] * (1 - tol) and aspect.max() <= ratio[1] * (1 + tol)
    assert area.max() - area.min() > 0.5 * (scale[1] - scale[0])      # spread over the range, not one box
    assert len(set(top.tolist())) > 10 and len(set(left.tolist())) > 10


def test_rrc_falls_back_to_the_centre_crop_when_no_try_fits():
    boxes = sample_rrc_boxes(5, 30, 30, scale=(0.95, 1.0), ratio=(3.0, 4.0))   # too wide for every try
    assert boxes.tolist() == [[10, 0, 10, 30]] * 5                    # torchvision: w = W, h = W / 3, centred


def _same_as_crop_then_resize(start: int, length: int, size: int, full: int) -> torch.Tensor:
    """Output positions where roi_align agrees with crop-then-interpolate along one axis (see batched.py)."""
    src = (torch.arange(size) + 0.5) * length / size - 0.5           # sample position inside the crop
    return ((src >= 0) | (start == 0)) & ((src <= length - 1) | (start + length == full))


def test_crop_resize_matches_bilinear_interpolation_when_enlarging():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 16, 16)
    boxes = torch.tensor([[0, 0, 8, 8], [3, 5, 7, 4], [8, 8, 8, 8], [1, 2, 15, 14], [0, 0, 16, 16], [9, 1, 5, 15]])
    out = crop_resize(x, boxes, 16)
    assert out.shape == (6, 3, 16, 16)
    for b, (t, lft, bh, bw) in enumerate(boxes.tolist()):
        ref = F.interpolate(x[b:b + 1, :, t:t + bh, lft:lft + bw], size=(16, 16), mode="bilinear",
                            align_corners=False)[0]
        rows, cols = _same_as_crop_then_resize(t, bh, 16, 16), _same_as_crop_then_resize(lft, bw, 16, 16)
        assert rows.sum() >= 12 and cols.sum() >= 12                 # only the outermost half pixel may differ
        assert (out[b][:, rows][:, :, cols] - ref[:, rows][:, :, cols]).abs().max() < 1e-5, f"box {b}"
    assert (out[4] - x[4]).abs().max() < 1e-6                        # the whole image at its own size: identity


def test_rrc_whole_image_equals_the_eval_path():
    ds, _ = _pil_dataset()
    mem = InMemoryImages.from_dataset(ds, img_size=8)
    tf = build_transforms(False, 8, MEAN, STD)
    ref = torch.stack([tf(ds[i][0]) for i in range(len(ds))])
    out = BatchAugment(8, MEAN, STD, policy="rrc_flip", rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0), hflip=0.0)
    assert (out(mem.images) - ref).abs().max() < 1e-5


def test_rrc_output_shape_and_per_image_crops():
    torch.manual_seed(0)
    x = _uint8_batch(32, s=24)
    out = BatchAugment(12, MEAN, STD, policy="rrc_flip")(x)
    assert out.shape == (32, 3, 12, 12) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert len({tuple(o.flatten()[:4].tolist()) for o in out}) == 32


@pytest.mark.parametrize("policy", ["crop_flip", "rrc_flip"])
def test_seeded_runs_repeat(policy):
    x = _uint8_batch(16)
    aug = BatchAugment(8, MEAN, STD, policy=policy)
    torch.manual_seed(7)
    a = aug(x)
    torch.manual_seed(7)
    b = aug(x)
    c = aug(x)                                                         # the stream moved on: new draws
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("policy", ["none", "crop_flip", "rrc_flip"])
def test_runs_on_the_meta_device_at_224(policy):
    aug = BatchAugment(224, MEAN, STD, policy=policy).to("meta")
    x = torch.empty(4, 3, 256, 256, dtype=torch.uint8, device="meta")
    out = aug(x)
    assert out.shape == (4, 3, 224, 224) and out.device.type == "meta" and out.dtype == torch.float32


def test_config_keys_and_errors(caplog):
    augment = {"policy": "rrc_flip", "rrc_scale": [0.5, 1.0], "hflip": 0.0, "auto_augment": "rand-m9-mstd0.5",
               "color_jitter": 0.0, "re_prob": 0.25, "re_mode": "pixel", "interpolation": "bilinear"}
    assert unsupported_options(augment) == ["auto_augment=rand-m9-mstd0.5", "re_prob=0.25"]
    assert unsupported_options({"interpolation": "bicubic"}) == ["interpolation=bicubic"]
    with caplog.at_level("WARNING", logger="vitlab"):
        aug = BatchAugment.from_config(augment, 8, MEAN, STD)
    assert aug.policy == "rrc_flip" and aug.rrc_scale == (0.5, 1.0) and aug.hflip == 0.0
    assert aug.skipped == ["auto_augment=rand-m9-mstd0.5", "re_prob=0.25"] and "auto_augment" in caplog.text
    assert BatchAugment.from_config(augment, 8, MEAN, STD, train=False).skipped == []   # eval: nothing skipped
    for train in (True, False):
        with pytest.raises(ValueError, match="unknown augmentation option 'auto_agument'.*valid:"):
            BatchAugment(8, MEAN, STD, train=train, auto_agument="rand-m9")
    with pytest.raises(ValueError, match="crop_flip"):
        BatchAugment(8, MEAN, STD, policy="randaug")
    with pytest.raises(ValueError, match="channels"):
        BatchAugment(8, MEAN, STD)(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_matches_windows_and_repeats_with_the_cuda_seed():
    x = _uint8_batch(32).cuda()
    aug = BatchAugment(8, (0.0,) * 3, (1.0,) * 3, policy="crop_flip", crop_padding=2).cuda()
    torch.cuda.manual_seed(3)
    a = aug(x)
    torch.cuda.manual_seed(3)
    assert torch.equal(a, aug(x)) and a.device.type == "cuda"
    got, padded = torch.round(a * 255).to(torch.uint8).cpu(), F.pad(x.cpu(), (2, 2, 2, 2))
    for b in range(len(x)):
        assert any(torch.equal(got[b], _window(padded, b, oy, ox, 8, f))
                   for oy in range(5) for ox in range(5) for f in (False, True))
    rrc = BatchAugment(16, MEAN, STD, policy="rrc_flip").cuda()(x)
    assert rrc.shape == (32, 3, 16, 16) and rrc.device.type == "cuda" and math.isfinite(rrc.sum().item())
