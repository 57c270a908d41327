"""Leaf nn.Modules. Imports torch only."""

from vitlab.layers.adaln import LabelEmbedder, TimestepEmbedder, modulate, timestep_embedding
from vitlab.layers.attention import (
    BACKENDS,
    Backend,
    attention,
    get_backend,
    kernel_record,
    reset_kernel_record,
    set_backend,
    use_backend,
    varlen_attention,
)
from vitlab.layers.block import Attention, Block
from vitlab.layers.drop_path import DropPath, linear_drop_path_rates
from vitlab.layers.layer_scale import LayerScale
from vitlab.layers.mlp import Mlp
from vitlab.layers.patch_embed import PatchEmbed, to_2tuple
from vitlab.layers.pos_embed import (
    RotaryEmbedding2D,
    resample_abs_pos_embed,
    sincos_2d_pos_embed,
)
from vitlab.layers.window import window_partition, window_shape, window_unpartition

__all__ = [
    "Attention",
    "BACKENDS",
    "Backend",
    "Block",
    "DropPath",
    "LabelEmbedder",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "RotaryEmbedding2D",
    "TimestepEmbedder",
    "attention",
    "get_backend",
    "kernel_record",
    "linear_drop_path_rates",
    "modulate",
    "resample_abs_pos_embed",
    "reset_kernel_record",
    "set_backend",
    "sincos_2d_pos_embed",
    "timestep_embedding",
    "use_backend",
    "to_2tuple",
    "varlen_attention",
    "window_partition",
    "window_shape",
    "window_unpartition",
]
