"""Leaf nn.Modules. Imports torch only."""

from vitlab.layers.attention import attention, get_backend, set_backend, use_backend
from vitlab.layers.drop_path import DropPath, linear_drop_path_rates
from vitlab.layers.layer_scale import LayerScale
from vitlab.layers.mlp import Mlp
from vitlab.layers.patch_embed import PatchEmbed
from vitlab.layers.pos_embed import RotaryEmbedding2D, resample_abs_pos_embed

__all__ = [
    "attention", "get_backend", "set_backend", "use_backend", "DropPath", "linear_drop_path_rates",
    "LayerScale", "Mlp", "PatchEmbed", "RotaryEmbedding2D", "resample_abs_pos_embed",
]
