"""Hierarchical backbones from timm (PVT-v2, Swin, ConvNeXt, ResNet, ...) as vitlab backbones for dense tasks.

A hierarchical backbone gives feature maps at several strides (4, 8, 16, 32), the input of an FPN
(``vitlab.tasks.pyramid.FeatureNeck(source="pyramid")``). Any model timm builds with ``features_only=True``
works; the default is PVT-v2-b0 (Wang et al., "PVT v2: Improved Baselines with Pyramid Vision Transformer",
Computational Visual Media 2022), a 3.4M-parameter pyramid transformer.

The models are always built with ``pretrained=False`` (runs are offline); ``weights`` names a local file of
timm weights (``.pth``/``.bin``/``.safetensors`` of the full timm model, e.g. from the Hugging Face hub's
``timm/<name>``) loaded non-strictly: what did not load is logged and kept in ``load_report``.
"""

from __future__ import annotations

import logging
import re
from typing import Optional, Sequence

import timm
import torch
from torch import nn

from vitlab.backbones.base import Backbone

log = logging.getLogger(__name__)


class TimmFeatures(Backbone):
    """A timm ``features_only`` model behind the :class:`~vitlab.backbones.base.Backbone` contract.

    forward(images (B, C, H, W), mask=None) -> {
        "pyramid": [(B, C_i, H / s_i, W / s_i)]   the maps of ``out_indices``, NCHW (NHWC models are permuted)
        "patch_2d": (B, C, h, w)                   the last map
        "patch": (B, h * w, C)                     the same as tokens
        "pooled": (B, C)                           global average of the last map (for a classification head)
        "grid": (h, w)
    }
    Attributes: ``embed_dim`` (channels of the last map), ``patch_size`` (its stride), ``num_prefix_tokens`` = 0,
    ``pyramid_channels``, ``pyramid_strides``, ``grid`` (of the last map at ``img_size``), ``load_report``.
    """

    def __init__(self, model: nn.Module, model_name: str, img_size: tuple[int, int], in_chans: int):
        super().__init__()
        self.model = model
        self.model_name = model_name
        self.img_size = tuple(img_size)
        self.in_chans = in_chans
        info = model.feature_info
        self.pyramid_channels: list[int] = [int(c) for c in info.channels()]
        self.pyramid_strides: list[int] = [int(r) for r in info.reduction()]
        self.embed_dim = self.pyramid_channels[-1]
        self.patch_size = self.pyramid_strides[-1]
        self.num_prefix_tokens = 0
        self.grid = (img_size[0] // self.patch_size, img_size[1] // self.patch_size)
        self.channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"    # Swin's maps are (B, H, W, C)
        self.load_report: dict[str, list[str]] = {}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass (timm's own per-stage checkpointing)."""
        self.model.set_grad_checkpointing(enable)

    def load_external_weights(self, source: str, heads) -> None:
        """``weights=PATH``: a timm checkpoint of the full model (see :meth:`load_weights`)."""
        self.load_weights(source)

    def forward(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None) -> dict:
        if mask is not None:
            raise ValueError(f"the timm backbone {self.model_name!r} takes no token mask: masked image modelling "
                             "(MAE, SimMIM, BEiT, iBOT) needs a ViT backbone (backbone=vit ...)")
        maps = self.model(images)
        if self.channels_last:
            maps = [m.permute(0, 3, 1, 2) for m in maps]                    # (B, H, W, C) -> (B, C, H, W)
        last = maps[-1]                                                     # (B, C, h, w)
        return {
            "pyramid": list(maps),
            "patch_2d": last,
            "patch": last.flatten(2).transpose(1, 2),                       # (B, h*w, C)
            "pooled": last.mean(dim=(2, 3)),                                # (B, C)
            "grid": tuple(last.shape[-2:]),
        }

    def load_weights(self, path: str) -> dict[str, list[str]]:
        """Load a local timm checkpoint of the full model non-strictly; returns and logs what did not load.

        features_only flattens the stage containers (``stages.0`` -> ``stages_0``); the keys are mapped back. The
        classifier head and tensors whose shape differs (e.g. Swin's relative-position tables at another window)
        are skipped and reported.
        """
        state = timm.models.load_state_dict(path)
        own = self.model.state_dict()
        loaded, skipped_shape = {}, []
        for key, value in own.items():
            src = key if key in state else re.sub(r"^(\w+?)_(\d+)\.", r"\1.\2.", key)   # stages_0.x -> stages.0.x
            if src not in state:
                continue
            if state[src].shape != value.shape:
                skipped_shape.append(f"{key} {tuple(state[src].shape)} -> {tuple(value.shape)}")
                continue
            loaded[key] = state[src]
        if not loaded:
            raise ValueError(f"weights file {path} matches none of the {len(own)} tensors of timm model "
                             f"{self.model_name!r}: pass a timm checkpoint of that model (e.g. the hub's "
                             f"timm/{self.model_name} weights) or weights=null")
        self.model.load_state_dict(loaded, strict=False)
        used = {k if k in state else re.sub(r"^(\w+?)_(\d+)\.", r"\1.\2.", k) for k in loaded}
        report = {
            "missing": sorted(k for k in own if k not in loaded and not any(k in s for s in skipped_shape)),
            "shape_mismatch": skipped_shape,
            "unexpected": sorted(k for k in state if k not in used),
        }
        log.info("timm backbone %s: loaded %d/%d tensors from %s; missing %d, shape mismatch %d, unused %d "
                 "(e.g. the classifier head)", self.model_name, len(loaded), len(own), path, len(report["missing"]),
                 len(skipped_shape), len(report["unexpected"]))
        if report["missing"] or skipped_shape:
            log.warning("timm backbone %s: not loaded from %s: missing %s; shape mismatch %s", self.model_name, path,
                        report["missing"][:10], skipped_shape[:10])
        self.load_report = report
        return report


def timm_backbone(model_name: str = "pvt_v2_b0", img_size: int | tuple[int, int] = 224, in_chans: int = 3,
                  out_indices: int | Sequence[int] = (0, 1, 2, 3), weights: Optional[str] = None,
                  **kwargs) -> TimmFeatures:
    """Build a timm model with ``features_only=True`` (never pretrained: offline) as a hierarchical backbone.

    ``out_indices``: the feature levels (stages) to return, or an int n = the last n levels (timm's rule).
    ``img_size`` goes to models that take one (Swin, PVT-v1, ...) and sets ``grid``; ``kwargs`` go to
    ``timm.create_model`` (e.g. ``drop_path_rate``); ``weights`` is a local timm checkpoint (see
    ``TimmFeatures.load_weights``).
    """
    size = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
    out_indices = int(out_indices) if isinstance(out_indices, int) else tuple(int(i) for i in out_indices)
    args = dict(pretrained=False, features_only=True, out_indices=out_indices,
                in_chans=in_chans, **kwargs)
    levels_error = (f"out_indices {out_indices} asks for feature levels timm model {model_name!r} does not "
                    "have: pick indices among 0..{}")
    try:
        try:
            model = timm.create_model(model_name, img_size=size, **args)
        except TypeError as e:                    # convolutional models (ResNet, ConvNeXt, PVT-v2) take no img_size
            if "img_size" not in str(e):
                raise
            model = timm.create_model(model_name, **args)
    except IndexError as e:                       # timm's own error for an out-of-range level: an IndexError
        n = len(timm.create_model(model_name, pretrained=False, features_only=True).feature_info.info)
        raise ValueError(levels_error.format(n - 1)) from e
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"timm has no model {model_name!r}: pick one of timm.list_models(), e.g. pvt_v2_b0, "
                             "swin_tiny_patch4_window7_224, convnext_tiny, resnet50") from e
        raise
    n_levels = len(model.feature_info.info)
    wanted = range(n_levels - out_indices, n_levels) if isinstance(out_indices, int) else out_indices
    if not 0 < len(wanted) <= n_levels or any(not -n_levels <= int(i) < n_levels for i in wanted):
        raise ValueError(levels_error.format(n_levels - 1))
    backbone = TimmFeatures(model, model_name, size, in_chans)
    if weights:
        backbone.load_weights(weights)
    return backbone
