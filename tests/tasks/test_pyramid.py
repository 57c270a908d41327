"""Necks: ViTDet's simple feature pyramid, the tap pyramid, FPN over a hierarchical backbone, and FeatureNeck."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitlab.backbones import timm_backbone, vit
from vitlab.tasks import FeatureNeck, SimpleFeaturePyramid, TapPyramid, pyramid_strides
from vitlab.tasks.pyramid import check_scales, level_names

SIZES = [(64, 64), (96, 96), (128, 128), (64, 96)]


def tiny_vit(patch_size=16, **kw):
    return vit("Ti", patch_size=patch_size, embed_dim=32, depth=4, num_heads=2, img_size=64, **kw)


def expected_hw(size, patch_size, scales, top_block=False):
    """Each level's (h, w): the grid times the scale (max pooling floors), P6 = ceil(last / 2)."""
    h, w = size[0] // patch_size, size[1] // patch_size
    out = [(int(h * s) if s >= 1 else h // int(1 / s), int(w * s) if s >= 1 else w // int(1 / s)) for s in scales]
    if top_block:
        out.append((math.ceil(out[-1][0] / 2), math.ceil(out[-1][1] / 2)))
    return out


# ------------------------------------------------------------- the rules ---

def test_pyramid_strides_and_names_hand_computed():
    assert pyramid_strides(16, (4, 2, 1, 0.5)) == [4, 8, 16, 32]              # ViTDet on a /16 ViT
    assert pyramid_strides(16, (4, 2, 1, 0.5), top_block=True) == [4, 8, 16, 32, 64]
    assert pyramid_strides(8, (4, 2, 1, 0.5, 0.25)) == [2, 4, 8, 16, 32]
    assert pyramid_strides(14, (2, 1, 0.5)) == [7, 14, 28]                    # DINOv2-style /14
    assert level_names([4, 8, 16, 32, 64]) == ["p2", "p3", "p4", "p5", "p6"]
    assert level_names([7, 14, 28]) == ["p3", "p4", "p5"]                    # the nearest power of two
    with pytest.raises(ValueError, match="divisible by 4"):
        pyramid_strides(14, (4, 2, 1))                                       # stride 3.5
    with pytest.raises(ValueError, match="one of"):
        check_scales([3.0, 1.0])
    with pytest.raises(ValueError, match="one of"):
        SimpleFeaturePyramid(32, 16, scales=(8.0, 4.0))
    with pytest.raises(ValueError, match="strictly decreasing"):
        check_scales([1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        check_scales([])
    with pytest.raises(ValueError, match="unknown norm"):
        SimpleFeaturePyramid(32, 16, norm="gn")


def test_simple_pyramid_layers_follow_vitdet():
    sfp = SimpleFeaturePyramid(32, 16, norm="ln")
    up4 = sfp.stages[0]
    rescale, lateral, output = up4
    assert [type(m).__name__ for m in rescale] == ["ConvTranspose2d", "LayerNorm2d", "GELU", "ConvTranspose2d"]
    assert (rescale[0].in_channels, rescale[0].out_channels, rescale[3].out_channels) == (32, 16, 8)   # dim/2, dim/4
    assert rescale[0].kernel_size == (2, 2) and rescale[0].stride == (2, 2)
    assert lateral[0].kernel_size == (1, 1) and output[0].kernel_size == (3, 3)
    assert lateral[0].bias is None and type(lateral[1]).__name__ == "LayerNorm2d"   # a norm follows: no bias
    assert isinstance(sfp.stages[1][0], nn.ConvTranspose2d) and isinstance(sfp.stages[2][0], nn.Identity)
    assert isinstance(sfp.stages[3][0], nn.MaxPool2d)
    assert isinstance(SimpleFeaturePyramid(32, 16, norm="bn").stages[2][1][1], nn.BatchNorm2d)
    assert SimpleFeaturePyramid(32, 16, norm="none").stages[2][1][0].bias is not None


def test_simple_pyramid_downsampling_hand_computed():
    """With identity convolutions and no norm, P5 (scale 0.5) is 2x2 max pooling of the input and P6 keeps
    every other cell of P5 (max-pool with kernel 1, stride 2)."""
    sfp = SimpleFeaturePyramid(4, 4, scales=(1.0, 0.5), norm="none", top_block=True)
    with torch.no_grad():
        for stage in sfp.stages:
            lateral, output = stage[1][0], stage[2][0]
            lateral.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
            lateral.bias.zero_()
            output.weight.zero_()
            output.weight[:, :, 1, 1] = torch.eye(4)                     # the 3x3 kernel's centre tap
            output.bias.zero_()
    x = torch.randn(2, 4, 6, 6)
    p4, p5, p6 = sfp(x)
    torch.testing.assert_close(p4, x)
    torch.testing.assert_close(p5, F.max_pool2d(x, 2))
    assert p5[0, 0, 0, 0] == x[0, 0, :2, :2].max()
    torch.testing.assert_close(p6, p5[:, :, ::2, ::2])
    assert p6.shape == (2, 4, 2, 2)                                      # ceil(3 / 2)


# ----------------------------------------------------- shapes per image size ---

@pytest.mark.parametrize("patch_size", [8, 16])
@pytest.mark.parametrize("size", SIZES)
def test_simple_pyramid_shapes(size, patch_size):
    backbone = tiny_vit(patch_size)
    neck = FeatureNeck(32, patch_size, out_channels=16, top_block=True)
    out = neck(backbone(torch.randn(2, 3, *size)))
    strides = [patch_size // 4, patch_size // 2, patch_size, patch_size * 2, patch_size * 4]
    assert neck.strides == strides
    assert list(out) == neck.names == level_names(strides)
    assert [tuple(v.shape[-2:]) for v in out.values()] == expected_hw(size, patch_size, (4, 2, 1, 0.5), True)
    for v, s in zip(out.values(), strides[:4]):                          # the four ViTDet levels: exactly H / stride
        assert v.shape == (2, 16, size[0] // s, size[1] // s)
    if patch_size == 16:
        assert list(out) == ["p2", "p3", "p4", "p5", "p6"]


def test_top_block_adds_p6():
    x = {"patch_2d": torch.randn(1, 32, 8, 8)}
    plain, top = FeatureNeck(32, 16, 16), FeatureNeck(32, 16, 16, top_block=True)
    assert list(plain(x)) == ["p2", "p3", "p4", "p5"]
    out = top(x)
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"] and top.strides[-1] == 64
    assert out["p6"].shape == (1, 16, 2, 2)


@pytest.mark.parametrize("size", SIZES)
def test_tap_pyramid_with_four_taps(size):
    backbone = tiny_vit(16, out_indices=4)
    feats = backbone(torch.randn(2, 3, *size))
    assert len(feats["taps"]) == 4
    tp = TapPyramid(32)
    outs = tp(feats["taps"])
    h, w = size[0] // 16, size[1] // 16
    assert [tuple(o.shape) for o in outs] == [(2, 32, h * 4, w * 4), (2, 32, h * 2, w * 2), (2, 32, h, w),
                                              (2, 32, h // 2, w // 2)]
    assert [type(m).__name__ for m in tp.stages[0][0]] == ["ConvTranspose2d", "BatchNorm2d", "GELU",
                                                           "ConvTranspose2d"]       # BEiT's fpn1
    assert [o.shape[1] for o in TapPyramid(32, out_channels=8)(feats["taps"])] == [8] * 4
    with pytest.raises(ValueError, match="out_indices=4"):
        tp(feats["taps"][:3])


@pytest.mark.parametrize("size", SIZES)
def test_feature_neck_taps(size):
    backbone = tiny_vit(8, out_indices=4)
    neck = FeatureNeck(32, 8, out_channels=16, source="taps", top_block=True)
    out = neck(backbone(torch.randn(2, 3, *size)))
    assert list(out) == ["p1", "p2", "p3", "p4", "p5"] and neck.strides == [2, 4, 8, 16, 32]
    assert [tuple(v.shape[-2:]) for v in out.values()] == expected_hw(size, 8, (4, 2, 1, 0.5), True)
    assert all(v.shape[:2] == (2, 16) for v in out.values())


@pytest.fixture(scope="module")
def pvt():
    return timm_backbone("pvt_v2_b0", img_size=64)


@pytest.mark.parametrize("size", SIZES)
def test_feature_neck_pyramid_source(pvt, size):
    neck = FeatureNeck(pvt.embed_dim, pvt.patch_size, out_channels=16, source="pyramid", top_block=True,
                       pyramid_channels=pvt.pyramid_channels, pyramid_strides=pvt.pyramid_strides)
    out = neck(pvt(torch.randn(1, 3, *size)))
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"] and neck.strides == [4, 8, 16, 32, 64]
    for v, s in zip(out.values(), neck.strides[:4]):
        assert v.shape == (1, 16, size[0] // s, size[1] // s)
    assert out["p6"].shape[-2:] == tuple(math.ceil(d / 64) for d in size)


def test_feature_neck_errors(pvt):
    with pytest.raises(KeyError, match="out_indices"):
        FeatureNeck(32, 16, 16, source="taps")(tiny_vit(16)(torch.randn(1, 3, 64, 64)))
    with pytest.raises(ValueError, match="pyramid_channels"):
        FeatureNeck(32, 16, 16, source="pyramid")
    with pytest.raises(KeyError, match="hierarchical"):
        FeatureNeck(32, 16, 16, source="pyramid", pyramid_channels=[32], pyramid_strides=[16])(
            tiny_vit(16)(torch.randn(1, 3, 64, 64)))
    with pytest.raises(ValueError, match="unknown neck source"):
        FeatureNeck(32, 16, 16, source="fpn")
    neck = FeatureNeck(256, 32, 16, source="pyramid", pyramid_channels=[160, 256], pyramid_strides=[16, 32])
    with pytest.raises(ValueError, match="2 pyramid levels but the backbone gave 4"):
        neck(pvt(torch.randn(1, 3, 64, 64)))


@pytest.mark.parametrize("source", ["last", "taps", "pyramid"])
def test_gradients_reach_the_backbone(source, pvt):
    if source == "pyramid":
        backbone = pvt
        neck = FeatureNeck(pvt.embed_dim, pvt.patch_size, 16, source="pyramid", norm="none",
                           pyramid_channels=pvt.pyramid_channels, pyramid_strides=pvt.pyramid_strides)
        first = backbone.model.patch_embed.proj.weight
    else:
        backbone = tiny_vit(16, out_indices=4 if source == "taps" else None)
        neck = FeatureNeck(32, 16, 16, source=source, norm="bn" if source == "taps" else "ln", top_block=True)
        first = backbone.patch_embed.proj.weight
    backbone.zero_grad()
    out = neck(backbone(torch.randn(2, 3, 64, 64)))
    sum(v.square().mean() for v in out.values()).backward()
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert all(p.grad is not None for p in neck.parameters())
    backbone.zero_grad()
