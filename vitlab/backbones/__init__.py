"""Backbones and their factories: the targets of conf/backbone/*.yaml. Every backbone implements the contract of
:mod:`vitlab.backbones.base`."""

from vitlab.backbones.base import Backbone

from vitlab.backbones.dit import DiT, dit
from vitlab.backbones.timm_features import TimmFeatures, timm_backbone
from vitlab.backbones.vit import (
    VARIANTS,
    VisionTransformer,
    vit,
    vit_base,
    vit_giant,
    vit_huge,
    vit_large,
    vit_small,
    vit_tiny,
)

__all__ = ["Backbone", "DiT", "TimmFeatures", "VARIANTS", "VisionTransformer", "dit", "timm_backbone", "vit", "vit_base",
           "vit_giant", "vit_huge", "vit_large", "vit_small", "vit_tiny"]
