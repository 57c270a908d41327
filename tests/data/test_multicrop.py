"""MultiCropTransform: DINO's 2 global + N local views, on PIL RGB / L and uint8 / float tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from vitlab.data import DictDataset, MultiCropTransform

MEAN3, STD3 = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def rgb_image(h: int = 40, w: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def find(pipe: v2.Compose, kind: type) -> list[tuple[object, float]]:
    """The ops of a kind in a view pipeline, with the probability they are applied (RandomApply unwrapped)."""
    out = []
    for op in pipe.transforms:
        if isinstance(op, kind):
            out.append((op, 1.0))
        elif isinstance(op, v2.RandomApply) and isinstance(op.transforms[0], kind):
            out.append((op.transforms[0], op.p))
    return out


def mc(**kw) -> MultiCropTransform:
    args = dict(global_size=32, local_size=12, num_local=4, mean=MEAN3, std=STD3)
    args.update(kw)
    return MultiCropTransform(**args)


# ------------------------------------------------------------ outputs ---

@pytest.mark.parametrize("num_local", [0, 1, 4])
def test_pil_rgb_gives_two_globals_then_the_locals(num_local):
    views = mc(num_local=num_local)(rgb_image())
    assert len(views) == 2 + num_local
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 12, 12)] * num_local
    assert all(type(v) is torch.Tensor and v.dtype == torch.float32 for v in views)


def test_uint8_tensor_input():
    img = torch.from_numpy(np.array(rgb_image())).permute(2, 0, 1).contiguous()          # (3, H, W) uint8
    views = mc()(img)
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 12, 12)] * 4
    assert all(torch.isfinite(v).all() for v in views)


@pytest.mark.parametrize("kind", ["pil_L", "float_tensor", "uint8_tensor"])
def test_one_channel_inputs(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 20, 20, generator=g)                                     # like the digits: float in [0, 1]
    img = {"pil_L": Image.fromarray((x[0].numpy() * 255).astype(np.uint8), "L"),
           "float_tensor": x, "uint8_tensor": (x * 255).to(torch.uint8)}[kind]
    t = MultiCropTransform(16, 8, 3, mean=(0.3,), std=(0.4,), in_chans=1)
    views = t(img)
    assert [tuple(v.shape) for v in views] == [(1, 16, 16)] * 2 + [(1, 8, 8)] * 3
    # one channel: brightness / contrast jitter only, and no grayscale step
    ops = t.global1.transforms
    assert not any(isinstance(op, v2.RandomGrayscale) for op in ops)
    jitter = find(t.global1, v2.ColorJitter)
    assert len(jitter) == 1 and jitter[0][0].saturation is None and jitter[0][0].hue is None


def test_float_input_is_not_rescaled_and_is_normalised():
    """A constant image stays constant through crop, flip, blur and grayscale (jitter off; its value is below
    the solarize threshold), so every view equals (value - mean) / std: the float input is taken as [0, 1]."""
    t = MultiCropTransform(16, 8, 2, mean=(0.3,), std=(0.4,), in_chans=1, color_jitter=(0, 0, 0, 0))
    torch.manual_seed(0)
    for v in t(torch.full((1, 24, 24), 0.35)):
        torch.testing.assert_close(v, torch.full_like(v, (0.35 - 0.3) / 0.4), atol=1e-5, rtol=0)
    t3 = mc(color_jitter=(0, 0, 0, 0))
    img = Image.new("RGB", (40, 40), (100, 100, 100))
    expected = torch.tensor([(100 / 255 - m) / s for m, s in zip(MEAN3, STD3)]).view(3, 1, 1)
    for v in t3(img):
        torch.testing.assert_close(v, expected.expand_as(v), atol=1e-5, rtol=0)


def test_views_differ_from_each_other():
    views = mc(num_local=3)(rgb_image())
    assert not torch.equal(views[0], views[1])
    locals_ = views[2:]
    assert all(not torch.equal(a, b) for i, a in enumerate(locals_) for b in locals_[i + 1:])


def test_torch_manual_seed_makes_the_views_reproducible():
    t, img = mc(), rgb_image()
    torch.manual_seed(123)
    a = t(img)
    torch.manual_seed(123)
    b = t(img)
    torch.manual_seed(124)
    c = t(img)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_the_view_pipelines_follow_dino():
    """DINO's DataAugmentationDINO: blur p=1 on global 1; blur p=0.1 + solarize p=0.2 on global 2; blur p=0.5
    on the locals; colour jitter p=0.8 and grayscale p=0.2 everywhere; crops at the configured scales."""
    t = mc(global_scale=(0.5, 1.0), local_scale=(0.1, 0.3))

    blur_p = [find(p, v2.GaussianBlur)[0][1] for p in (t.global1, t.global2, t.local)]
    assert blur_p == [1.0, 0.1, 0.5]
    assert [op.p for op in t.global2.transforms if isinstance(op, v2.RandomSolarize)] == [0.2]
    assert not any(isinstance(op, v2.RandomSolarize) for p in (t.global1, t.local) for op in p.transforms)
    for p in (t.global1, t.global2, t.local):
        assert find(p, v2.ColorJitter)[0][1] == 0.8
        assert [op.p for op in p.transforms if isinstance(op, v2.RandomGrayscale)] == [0.2]
    rrc = [next(op for op in p.transforms if isinstance(op, v2.RandomResizedCrop)) for p in (t.global1, t.local)]
    assert rrc[0].scale == (0.5, 1.0) and rrc[1].scale == (0.1, 0.3)


@pytest.mark.parametrize("size", [16, 32, 224, 448])
def test_blur_sigma_scales_with_small_images_and_the_kernel_fits(size):
    t = MultiCropTransform(size, max(4, size // 4), 1, mean=MEAN3, std=STD3)
    s = min(1.0, size / 224)
    assert t.blur_sigma == pytest.approx((0.1 * s, 2.0 * s))
    for pipe, crop in ((t.global1, size), (t.local, t.local_size)):
        blur = find(pipe, v2.GaussianBlur)[0][0]
        k = blur.kernel_size[0]
        assert k % 2 == 1 and k <= crop
        assert k >= min(2 * math.ceil(3 * t.blur_sigma[1]) + 1, crop - (1 - crop % 2))   # +-3 sigma when it fits


def test_default_collate_gives_a_list_of_batched_views():
    g = torch.Generator().manual_seed(0)
    base = [(torch.rand(1, 20, 20, generator=g), i % 3) for i in range(6)]
    ds = DictDataset(base, MultiCropTransform(16, 8, 2, mean=(0.3,), std=(0.4,), in_chans=1))
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert isinstance(batch["image"], list)
    assert [tuple(x.shape) for x in batch["image"]] == [(4, 1, 16, 16)] * 2 + [(4, 1, 8, 8)] * 2
    assert batch["label"].tolist() == [0, 1, 2, 0]


# -------------------------------------------------------------- errors ---

def test_channel_mismatch_names_the_fix():
    with pytest.raises(ValueError, match=r"3-channel.*in_chans"):
        MultiCropTransform(16, 8, 2, mean=(0.3,), std=(0.4,), in_chans=1)(rgb_image())


@pytest.mark.parametrize("kw, match", [
    (dict(global_size=0), "global_size"),
    (dict(local_size=2.5), "local_size"),
    (dict(num_local=-1), "num_local"),
    (dict(in_chans=2, mean=(0.5, 0.5), std=(0.2, 0.2)), "in_chans"),
    (dict(mean=(0.5,)), "one value per channel"),
    (dict(std=(0.2, 0.0, 0.2)), "std"),
    (dict(global_scale=(0.0, 1.0)), "global_scale"),
    (dict(local_scale=(0.5, 0.2)), "local_scale"),
    (dict(color_jitter=(0.4, 0.4, 0.2)), "color_jitter"),
    (dict(color_jitter=(0.4, 0.4, 0.2, 0.7)), "hue"),
    (dict(interpolation="nearest"), "interpolation"),
])
def test_bad_arguments_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        mc(**kw)
