"""Necks: turn a backbone's features into a multi-scale feature pyramid for the dense heads.

A plain ViT gives one map at stride ``patch_size``; detectors and segmenters want several (strides 4 .. 32).
Three ways to get them, chosen by ``FeatureNeck(source=...)``:

- ``"last"``: :class:`SimpleFeaturePyramid`, ViTDet (Li et al., "Exploring Plain Vision Transformer Backbones
  for Object Detection", ECCV 2022, Sec. 3 / Fig. 2c): every level is rescaled from the LAST map alone, by
  transposed convolutions (up) or max pooling (down), then a 1x1 and a 3x3 convolution with a norm each.
- ``"taps"``: :class:`TapPyramid`, the BEiT / ViT-Adapter neck for UPerNet (Bao et al., "BEiT", ICLR 2022,
  their semantic-segmentation code; Chen et al., "Vision Transformer Adapter for Dense Predictions", ICLR 2023):
  one rescale op per intermediate block output (the backbone's ``features["taps"]``, built with ``out_indices``).
- ``"pyramid"``: a hierarchical backbone (PVT, Swin, ConvNeXt, ResNet) already gives maps at several strides
  (``features["pyramid"]``); torchvision's :class:`~torchvision.ops.FeaturePyramidNetwork` (Lin et al., "Feature
  Pyramid Networks for Object Detection", CVPR 2017) merges them top-down.

Levels are named ``"p<k>"`` by their stride 2**k (stride 4 -> "p2", 32 -> "p5"), as in FPN; a stride that is
not a power of two (patch 14) takes the nearest k. ``top_block`` adds one more level at twice the last stride
by subsampling the last output (ViTDet's / FPN's ``LastLevelMaxPool``: max-pool with kernel 1, stride 2).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

Norm = Literal["ln", "bn", "none"]
ALLOWED_SCALES = (4.0, 2.0, 1.0, 0.5, 0.25)


# ----------------------------------------------------------------- helpers ---

def _norm(norm: str, channels: int) -> nn.Module:
    """"ln": LayerNorm over channels of a (B, C, H, W) map (ViTDet's choice); "bn": BatchNorm; "none": identity."""
    if norm == "ln":
        return LayerNorm2d(channels, eps=1e-6)
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm in ("none", "", None):
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}: use 'ln' (LayerNorm over channels), 'bn' (BatchNorm) or 'none'")


def _norm_layer(norm: str):
    """The same choice as a constructor ``f(channels) -> module`` (torchvision's ``norm_layer``), None for none."""
    _norm(norm, 4)                                                     # validates the name
    return None if norm in ("none", "", None) else (lambda c: _norm(norm, c))


def check_scales(scales: Sequence[float]) -> list[float]:
    """Validate rescale factors: non-empty, each in {4, 2, 1, 0.5, 0.25}, strictly decreasing (strides increase)."""
    scales = [float(s) for s in scales]
    if not scales:
        raise ValueError("scales is empty: give at least one, e.g. scales=[4, 2, 1, 0.5] (ViTDet's strides 4..32 "
                         "on a patch-16 ViT)")
    bad = [s for s in scales if s not in ALLOWED_SCALES]
    if bad:
        raise ValueError(f"scales {bad} are not supported: each scale must be one of {list(ALLOWED_SCALES)} "
                         "(powers of two: transposed convolutions up, max pooling down)")
    if any(a <= b for a, b in zip(scales, scales[1:])):
        raise ValueError(f"scales must be strictly decreasing (finest level first, strides increasing), got "
                         f"{scales}; e.g. scales=[4, 2, 1, 0.5]")
    return scales


def pyramid_strides(patch_size: int, scales: Sequence[float], top_block: bool = False) -> list[int]:
    """The stride of each level: patch_size / scale (+ twice the last one with ``top_block``).

    ``pyramid_strides(16, (4, 2, 1, 0.5)) == [4, 8, 16, 32]``; with top_block: ``[4, 8, 16, 32, 64]``.
    """
    strides = []
    for s in check_scales(scales):
        stride = patch_size / s
        if stride != int(stride) or stride < 1:
            raise ValueError(f"scale {s} on patch size {patch_size} gives stride {stride}, not a whole number of "
                             f"pixels: drop that scale or use a patch size divisible by {int(s)}")
        strides.append(int(stride))
    if top_block:
        strides.append(strides[-1] * 2)
    return strides


def level_names(strides: Sequence[int]) -> list[str]:
    """FPN names by stride: stride 2**k -> "p<k>" (4 -> "p2", 32 -> "p5"); other strides take the nearest k."""
    names = [f"p{round(math.log2(s))}" for s in strides]
    if len(set(names)) != len(names):
        raise ValueError(f"strides {list(strides)} give repeated level names {names}: each level needs its own "
                         "stride (about twice the previous one)")
    return names


def _rescale(dim: int, scale: float, norm: str, reduce_channels: bool) -> tuple[nn.Module, int]:
    """One level's resampling of a (B, dim, h, w) map by ``scale`` -> (module, output channels).

    4: ConvT(k2, s2) -> norm -> GELU -> ConvT(k2, s2); 2: ConvT(k2, s2); 1: identity; 0.5 / 0.25: max-pool 2 / 4.
    ``reduce_channels`` (ViTDet): each transposed convolution halves the width (dim -> dim/2 -> dim/4), which the
    following 1x1 projects anyway; without it (BEiT's taps) the width stays ``dim``.
    """
    half = dim // 2 if reduce_channels else dim
    quarter = dim // 4 if reduce_channels else dim
    if min(half, quarter) < 1:
        raise ValueError(f"in_dim {dim} is too narrow for scale {scale} (its transposed convolutions divide the "
                         "width by 4): use a wider backbone or drop scale 4")
    if scale == 4.0:
        return nn.Sequential(
            nn.ConvTranspose2d(dim, half, kernel_size=2, stride=2),
            _norm(norm, half),
            nn.GELU(),
            nn.ConvTranspose2d(half, quarter, kernel_size=2, stride=2),
        ), quarter
    if scale == 2.0:
        return nn.ConvTranspose2d(dim, half, kernel_size=2, stride=2), half
    if scale == 1.0:
        return nn.Identity(), dim
    if scale == 0.5:
        return nn.MaxPool2d(kernel_size=2, stride=2), dim
    if scale == 0.25:
        return nn.MaxPool2d(kernel_size=4, stride=4), dim
    raise ValueError(f"unsupported scale {scale}; use one of {list(ALLOWED_SCALES)}")


def _conv_norm(cin: int, cout: int, k: int, norm: str) -> nn.Sequential:
    """Conv (no bias when a norm follows, as ViTDet) -> norm; no activation (ViTDet's output convolutions)."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=norm in ("none", "", None)), _norm(norm, cout))


def _top(x: torch.Tensor) -> torch.Tensor:
    """ViTDet's / FPN's LastLevelMaxPool: subsample by 2 (max-pool kernel 1, stride 2): (B, C, h, w) -> ceil(h/2)."""
    return F.max_pool2d(x, kernel_size=1, stride=2, padding=0)


# ------------------------------------------------------------------- necks ---

class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid (Li et al. 2022, Fig. 2c): every level from the last ViT map only.

    forward(x (B, in_dim, h, w)) -> [(B, out_channels, h*s, w*s) for s in scales] (+ P6 at half the last level's
    size when ``top_block``). Down-sampled sizes are floored (max pooling), P6 is ceil(h_last / 2).
    """

    def __init__(self, in_dim: int, out_channels: int = 256, scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
                 norm: Norm = "ln", top_block: bool = False):
        super().__init__()
        self.scales = check_scales(scales)
        self.in_dim, self.out_channels, self.top_block = in_dim, out_channels, top_block
        self.stages = nn.ModuleList()
        for s in self.scales:
            rescale, dim = _rescale(in_dim, s, norm, reduce_channels=True)
            self.stages.append(nn.Sequential(
                rescale,
                _conv_norm(dim, out_channels, 1, norm),                    # lateral 1x1
                _conv_norm(out_channels, out_channels, 3, norm),           # output 3x3
            ))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != self.in_dim:
            raise ValueError(f"SimpleFeaturePyramid expects (B, {self.in_dim}, h, w) (features['patch_2d']), "
                             f"got {tuple(x.shape)}")
        outs = [stage(x) for stage in self.stages]                         # [(B, C, h*s, w*s)]
        if self.top_block:
            outs.append(_top(outs[-1]))                                    # P6
        return outs


class TapPyramid(nn.Module):
    """BEiT / ViT-Adapter style neck for UPerNet: ``taps[i]`` is rescaled by ``scales[i]`` (one op per tap).

    forward(taps: [(B, in_dim, h, w)] * len(scales)) -> [(B, C, h*scales[i], w*scales[i])], C = out_channels or
    in_dim. The x4 op is BEiT's ``fpn1`` (ConvT -> norm -> GELU -> ConvT, width kept); with ``out_channels`` a
    1x1 convolution + norm per level projects to that width.
    """

    def __init__(self, in_dim: int, scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5), out_channels: Optional[int] = None,
                 norm: Norm = "bn"):
        super().__init__()
        self.scales = check_scales(scales)
        self.in_dim = in_dim
        self.out_channels = out_channels or in_dim
        self.stages = nn.ModuleList()
        for s in self.scales:
            rescale, dim = _rescale(in_dim, s, norm, reduce_channels=False)
            proj = _conv_norm(dim, out_channels, 1, norm) if out_channels else nn.Identity()
            self.stages.append(nn.Sequential(rescale, proj))

    def forward(self, taps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(taps) != len(self.stages):
            raise ValueError(f"TapPyramid has {len(self.stages)} scales {self.scales} but got {len(taps)} taps: build "
                             f"the backbone with out_indices={len(self.stages)} (one tap per scale)")
        return [stage(t) for stage, t in zip(self.stages, taps)]


class FeatureNeck(nn.Module):
    """What the dense heads call: a pyramid from whatever the backbone gives, as an OrderedDict name -> map.

    source="last":    SimpleFeaturePyramid on ``features["patch_2d"]`` (ViTDet; any plain ViT).
    source="taps":    TapPyramid on ``features["taps"]`` (backbone built with ``out_indices=len(scales)``),
                      projected to ``out_channels`` by a 1x1 convolution + norm per level.
    source="pyramid": torchvision's FeaturePyramidNetwork over ``features["pyramid"]`` of a hierarchical backbone
                      (needs ``pyramid_channels`` and ``pyramid_strides``, the backbone's attributes); ``scales``
                      is unused; ``norm`` is applied inside the FPN's convolutions ("none" = the original FPN).
    ``top_block`` adds a level at twice the last stride (max-pool kernel 1 stride 2 of the last output).

    Attributes: ``strides`` (pixels per cell of each level), ``names`` ("p2", "p3", ...), ``out_channels``.
    """

    def __init__(self, in_dim: int, patch_size: int, out_channels: int = 256,
                 scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
                 source: Literal["last", "taps", "pyramid"] = "last", top_block: bool = False, norm: Norm = "ln",
                 pyramid_channels: Optional[Sequence[int]] = None, pyramid_strides: Optional[Sequence[int]] = None):
        super().__init__()
        self.source, self.top_block, self.out_channels = source, top_block, out_channels
        if source == "last":
            self.neck = SimpleFeaturePyramid(in_dim, out_channels, scales, norm, top_block)
            self.strides = _strides(patch_size, scales, top_block)
        elif source == "taps":
            self.neck = TapPyramid(in_dim, scales, out_channels, norm)
            self.strides = _strides(patch_size, scales, top_block)
        elif source == "pyramid":
            if pyramid_channels is None or pyramid_strides is None:
                raise ValueError("FeatureNeck(source='pyramid') needs pyramid_channels and pyramid_strides: pass the "
                                 "backbone's (e.g. vitlab.backbones.timm_backbone(...).pyramid_channels), or use "
                                 "source='last' / 'taps' with a plain ViT")
            if len(pyramid_channels) != len(pyramid_strides):
                raise ValueError(f"pyramid_channels {list(pyramid_channels)} and pyramid_strides "
                                 f"{list(pyramid_strides)} must have one entry per pyramid level")
            self.neck = FeaturePyramidNetwork([int(c) for c in pyramid_channels], out_channels,
                                              extra_blocks=LastLevelMaxPool() if top_block else None,
                                              norm_layer=_norm_layer(norm))
            self.strides = [int(s) for s in pyramid_strides] + ([int(pyramid_strides[-1]) * 2] if top_block else [])
        else:
            raise ValueError(f"unknown neck source {source!r}: use 'last' (ViTDet, the last ViT map), 'taps' "
                             "(intermediate blocks, backbone out_indices) or 'pyramid' (a hierarchical backbone)")
        self.names = level_names(self.strides)

    def forward(self, features: dict) -> "OrderedDict[str, torch.Tensor]":
        if self.source == "last":
            outs = self.neck(_get(features, "patch_2d", "the backbone gives no 'patch_2d' map (masked tokens "
                                                        "dropped?): run it without a dropping mask"))
        elif self.source == "taps":
            taps = _get(features, "taps", "build the backbone with out_indices (e.g. backbone.out_indices="
                                          f"{len(self.neck.stages)}), or use neck source='last'")
            outs = self.neck(taps)
            if self.top_block:
                outs.append(_top(outs[-1]))
        else:
            pyr = _get(features, "pyramid", "source='pyramid' needs a hierarchical backbone "
                                            "(vitlab.backbones.timm_backbone); use source='last' with a plain ViT")
            n_in = len(self.neck.inner_blocks)
            if len(pyr) != n_in:
                raise ValueError(f"the neck was built for {n_in} pyramid levels but the backbone gave {len(pyr)}: "
                                 "pass the backbone's pyramid_channels / pyramid_strides")
            outs = list(self.neck(OrderedDict((str(i), p) for i, p in enumerate(pyr))).values())
        return OrderedDict(zip(self.names, outs))


def _strides(patch_size: int, scales: Sequence[float], top_block: bool) -> list[int]:
    # FeatureNeck's argument ``pyramid_strides`` shadows the module-level function inside __init__.
    return pyramid_strides(patch_size, scales, top_block)


def _get(features: dict, key: str, fix: str):
    if key not in features:
        raise KeyError(f"FeatureNeck needs features[{key!r}], which the backbone did not return "
                       f"(it gave {sorted(features)}): {fix}")
    return features[key]
