"""Fixtures for the optimizer and schedule tests: a tiny vitlab ViT + classification task."""

from __future__ import annotations

import pytest
import torch

from vitlab.backbones import vit
from vitlab.tasks import ClassificationTask
from vitlab.recipes import Supervised

# Backbone options that add the parameters weight-decay exemption cares about.
VIT_OPTIONS = {
    "plain": {},
    "layerscale_registers": {"layer_scale_init": 1e-5, "num_registers": 2, "use_mask_token": True},
    "avgpool_qknorm": {"global_pool": "avg", "qk_norm": True, "layer_scale_init": 0.1},
}



def _make_model(**vit_kwargs) -> Supervised:
    torch.manual_seed(0)
    backbone = vit("Ti", patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32, **vit_kwargs)
    return Supervised(backbone, ClassificationTask(32, 10))


@pytest.fixture
def make_model():
    """Factory: make_model(**vit_kwargs) -> Supervised(tiny ViT, ClassificationTask(32, 10)), seeded."""
    return _make_model


@pytest.fixture(params=list(VIT_OPTIONS), ids=list(VIT_OPTIONS))
def model(request) -> Supervised:
    return _make_model(**VIT_OPTIONS[request.param])


@pytest.fixture
def full_model() -> Supervised:
    """The variant with every exempt kind present: LayerScale gammas, registers, a mask token."""
    return _make_model(**VIT_OPTIONS["layerscale_registers"])
