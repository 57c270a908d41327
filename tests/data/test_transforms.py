"""build_transforms: eval is deterministic and normalised; train policies are random; PIL and tensor inputs."""

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.data import build_transforms

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _pil(h=32, w=32, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def _gray_tensor(seed=0):
    return torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _differ_in_some_call(tf, image, tries=20):
    first = tf(image)
    return any(not torch.equal(first, tf(image)) for _ in range(tries))


def test_eval_normalises_exactly():
    color = (200, 100, 30)
    image = Image.new("RGB", (40, 40), color)                           # solid: resize keeps the value
    out = build_transforms(False, 24, MEAN, STD)(image)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    for c in range(3):
        expected = (color[c] / 255 - MEAN[c]) / STD[c]
        torch.testing.assert_close(out[c], torch.full((24, 24), expected), atol=1e-5, rtol=0)


def test_eval_is_deterministic_and_centre_crops():
    tf = build_transforms(False, 16, MEAN, STD)
    image = _pil(32, 48)                                                 # non-square: resize short side, crop
    a, b = tf(image), tf(image)
    assert a.shape == (3, 16, 16)
    assert torch.equal(a, b)


def test_eval_identity_geometry_at_native_size():
    image = _pil(32, 32)
    out = build_transforms(False, 32, MEAN, STD)(image)
    raw = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    expected = (raw - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_eval_crop_ratio_resizes_then_crops():
    # a 32x32 image whose centre 28x28 is white and its 2-pixel border black: img_size 28 at ratio 0.875 means
    # resize to round(28 / 0.875) = 32 (a no-op here), then a 28 centre crop: exactly the white part
    arr = np.zeros((32, 32, 3), dtype=np.uint8)
    arr[2:30, 2:30] = 255
    out = build_transforms(False, 28, (0, 0, 0), (1, 1, 1), eval_crop_ratio=0.875)(Image.fromarray(arr))
    assert out.shape == (3, 28, 28)
    torch.testing.assert_close(out, torch.ones(3, 28, 28))


@pytest.mark.parametrize("policy", ["crop_flip", "rrc_flip"])
def test_train_policies_shape_and_randomness(policy):
    torch.manual_seed(0)
    tf = build_transforms(True, 24, MEAN, STD, policy=policy)
    image = _pil(32, 32)
    out = tf(image)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    assert _differ_in_some_call(tf, image)


@pytest.mark.parametrize("policy", ["none", "crop_flip", "rrc_flip"])
def test_eval_ignores_the_train_policy(policy):
    tf = build_transforms(False, 16, MEAN, STD, policy=policy)
    image = _pil()
    assert not _differ_in_some_call(tf, image, tries=5)
    assert torch.equal(tf(image), build_transforms(False, 16, MEAN, STD)(image))


def test_train_none_is_the_eval_transform():
    image = _pil()
    a = build_transforms(True, 16, MEAN, STD, policy="none")(image)
    assert torch.equal(a, build_transforms(False, 16, MEAN, STD)(image))


def test_crop_flip_without_randomness_is_deterministic():
    tf = build_transforms(True, 32, MEAN, STD, policy="crop_flip", crop_padding=0, hflip=0.0)
    image = _pil()
    assert not _differ_in_some_call(tf, image, tries=5)


def test_crop_flip_flip_only_mirrors():
    torch.manual_seed(0)
    tf = build_transforms(True, 32, MEAN, STD, policy="crop_flip", crop_padding=0, hflip=1.0)
    image = _pil()
    eval_out = build_transforms(False, 32, MEAN, STD)(image)
    torch.testing.assert_close(tf(image), eval_out.flip(-1))


def test_crop_flip_pads_with_zeros():
    """With padding and no flip, some call shifts the image so a border shows the zero padding."""
    torch.manual_seed(0)
    tf = build_transforms(True, 16, (0, 0, 0), (1, 1, 1), policy="crop_flip", crop_padding=4, hflip=0.0)
    image = Image.new("RGB", (16, 16), (255, 255, 255))
    outs = [tf(image) for _ in range(20)]
    assert all(o.shape == (3, 16, 16) for o in outs)
    assert any((o == 0).any() for o in outs)
    assert all(set(o.unique().tolist()) <= {0.0, 1.0} for o in outs)


@pytest.mark.parametrize("policy", ["bogus", "randaugment", ""])
@pytest.mark.parametrize("is_train", [True, False])
def test_unknown_policy(policy, is_train):
    with pytest.raises(ValueError) as info:
        build_transforms(is_train, 16, MEAN, STD, policy=policy)
    msg = str(info.value)
    assert repr(policy) in msg and "none" in msg and "crop_flip" in msg and "rrc_flip" in msg


@pytest.mark.parametrize("is_train,policy", [(False, "none"), (True, "crop_flip"), (True, "rrc_flip")])
def test_float_tensor_input(is_train, policy):
    torch.manual_seed(0)
    x = _gray_tensor()
    before = x.clone()
    out = build_transforms(is_train, 16, (0.3,), (0.4,), policy=policy)(x)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (1, 16, 16) and out.dtype == torch.float32
    assert torch.equal(x, before)                                         # the input is not modified


def test_float_tensor_is_not_rescaled():
    """A float tensor already in [0, 1] must not be divided by 255 again."""
    x = torch.full((1, 8, 8), 0.7)
    out = build_transforms(False, 8, (0.3,), (0.4,))(x)
    torch.testing.assert_close(out, torch.full((1, 8, 8), (0.7 - 0.3) / 0.4))


def test_uint8_tensor_is_scaled():
    x = torch.full((3, 8, 8), 255, dtype=torch.uint8)
    out = build_transforms(False, 8, (0, 0, 0), (1, 1, 1))(x)
    torch.testing.assert_close(out, torch.ones(3, 8, 8))


def test_tensor_train_policies_are_random():
    torch.manual_seed(0)
    x = _gray_tensor()
    for policy in ("crop_flip", "rrc_flip"):
        assert _differ_in_some_call(build_transforms(True, 16, (0.3,), (0.4,), policy=policy), x)


def test_grayscale_pil():
    image = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8))
    out = build_transforms(False, 16, (0.5,), (0.5,))(image)
    assert out.shape == (1, 16, 16)
