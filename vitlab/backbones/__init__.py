"""Backbones and their factories: the targets of conf/backbone/*.yaml."""

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

__all__ = ["VARIANTS", "VisionTransformer", "vit", "vit_base", "vit_giant", "vit_huge", "vit_large", "vit_small",
           "vit_tiny"]
