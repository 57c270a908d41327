"""The Backbone contract: what every backbone offers and everything the rest of vitlab reads from one.

Tasks, recipes, the optimizer builder, FSDP and the composition root (``vitlab/lit/build.py``) read these members
and the feature dict, never a backbone's internals (its parameter names, its norms, its block class). A new
backbone subclasses :class:`Backbone`, sets the declared attributes in ``__init__`` and implements ``forward`` and
the methods marked *required*; CONTRIBUTING.md lists the files to touch and the tests to write.

Declared attributes
-------------------
``kind``                 ``"encoder"`` (images -> a feature dict, for every task but diffusion) or ``"denoiser"``
                         (``forward(x, t, y)`` -> a prediction of x's shape: DiT, for task=diffusion). The builder
                         refuses a backbone whose kind does not match the task's ``backbone_kind``.
``embed_dim``            width of the ``cls`` / ``patch`` / ``pooled`` features (a hierarchical model: its last map).
``patch_size``           stride of the ``patch`` / ``patch_2d`` features (a ViT's patch; a pyramid's last stride).
``in_chans``             image channels it embeds.
``img_size``             (H, W) it was built for (position tables, window partitions); other sizes may work.
``grid``                 (h, w) of ``patch_2d`` at ``img_size``.
``num_prefix_tokens``    tokens before the patches in the token sequence (class, distillation, registers; 0 = none).
``has_class_token``      a ``cls`` feature exists.
``num_registers``        register tokens (``registers`` feature, Darcet et al. 2024).
``has_dist_token``       DeiT's distillation token (``dist`` feature; recipe=distill reads it).
``pyramid_channels``     a hierarchical backbone's channels per ``pyramid`` level (None: a plain ViT, no pyramid).
``pyramid_strides``      their strides in pixels (None likewise).
``mask_mode``            how ``forward(images, mask)`` treats masked patches: ``"drop"`` (MAE: the encoder sees the
                         visible ones only), ``"replace"`` (BEiT / SimMIM / iBOT: a learned mask token) or None (no
                         masks: masked image modelling needs another backbone).
``num_layers``           the depth that layer-wise lr decay counts (:meth:`layer_id` runs 0 .. num_layers + 1);
                         0 = the backbone has no layers to decay (layer decay is refused with the fix).

Methods
-------
``forward(images, mask=None) -> dict``   required; named features: ``cls`` (B, D), ``patch`` (B, N, D),
                         ``patch_2d`` (B, D, h, w), ``pooled`` (B, D), ``registers`` (B, R, D), ``dist`` (B, D),
                         ``prenorm`` (B, T, D), ``taps`` [(B, D, h, w)], ``pyramid`` [(B, C_i, H/s_i, W/s_i)],
                         ``grid`` (h, w); a denoiser's forward is ``(x, t, y) -> tensor`` instead.
``layer_id(name) -> int``              the layer of parameter ``name`` (relative to the backbone) for layer-wise
                         lr decay (BEiT): 0 = the stem (patch embedding, tokens, positions), i + 1 = block i,
                         ``num_layers + 1`` = what follows the last block (final norm).
``fsdp_units() -> list[nn.Module]``    the submodules FSDP shards as one unit each (transformer blocks); the
                         rest of the model is the root unit.
``set_grad_checkpointing(enable)``     recompute activations in the backward pass (timm's name).
``no_weight_decay() -> set[str]``      names of parameters beside norms and biases that take no weight decay
                         (positions, tokens).
``token_norm()`` / ``pool_norm()``     the final norm applied to every token (None when it follows pooling), and
                         the one applied after pooling (None when it precedes it): what a token-level loss (MAE,
                         SimMIM) must normalise with, and what it must freeze (DDP trains no unused parameter).
``adapt_state_dict(state, source)``    a checkpoint's backbone state -> this backbone's layout (e.g. position
                         embeddings resampled to this grid); :meth:`load_pretrained` checks and loads it.
``optional_state_keys()``              keys either side may lack when loading pretrained weights (a mask token
                         from SimMIM pretraining, a distillation token, the final norms).
``load_external_weights(source, heads)``  weights in another library's format (timm for a ViT, a timm model's own
                         file for a timm backbone); ``heads`` maps head names (``head``, ``dist_head``) to modules
                         that take a classifier of the source when its shape fits.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Mapping, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

Kind = Literal["encoder", "denoiser"]
MaskMode = Optional[Literal["drop", "replace"]]


class Backbone(nn.Module):
    """Base class of every vitlab backbone: the declared members of the module docstring, with the defaults of a
    plain encoder that has no tokens, no pyramid, no masks and no layers to decay. Subclasses set what differs."""

    kind: Kind = "encoder"
    embed_dim: int
    patch_size: int
    in_chans: int
    img_size: tuple[int, int]
    grid: tuple[int, int]
    num_prefix_tokens: int = 0
    has_class_token: bool = False
    num_registers: int = 0
    has_dist_token: bool = False
    pyramid_channels: Optional[list[int]] = None
    pyramid_strides: Optional[list[int]] = None
    mask_mode: MaskMode = None
    num_layers: int = 0

    # ------------------------------------------------------------ layers ---
    def layer_id(self, name: str) -> int:
        """Layer of parameter ``name`` for layer-wise lr decay; without layers everything trains at the full lr."""
        return self.num_layers + 1

    def fsdp_units(self) -> list[nn.Module]:
        """Submodules sharded as one FSDP unit each (default: none; the whole backbone is in the root unit)."""
        return []

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        raise ValueError(f"{type(self).__name__} does not support activation checkpointing; set "
                         "model.activation_checkpointing=false")

    def no_weight_decay(self) -> set[str]:
        return set()

    # -------------------------------------------------------------- norms ---
    def token_norm(self) -> Optional[nn.Module]:
        """The final norm of every token, or None when the final norm follows pooling (see :meth:`pool_norm`)."""
        return None

    def pool_norm(self) -> Optional[nn.Module]:
        """The norm applied after pooling (timm's ``fc_norm``), or None."""
        return None

    # ---------------------------------------------------------- weights ---
    def adapt_state_dict(self, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        """A pretrained backbone state -> this backbone's layout (default: as it is)."""
        return state

    def optional_state_keys(self) -> tuple[str, ...]:
        """Keys that either this backbone or a pretrained state may lack without an error."""
        return ()

    def load_pretrained(self, state: Mapping[str, torch.Tensor], source: str) -> dict[str, list[str]]:
        """Load the backbone state of another vitlab checkpoint (``weights=PATH``): adapted by
        :meth:`adapt_state_dict`, then every tensor must fit except :meth:`optional_state_keys` on either side,
        which are reported (kept fresh / not used). Returns {"missing": [...], "unexpected": [...]}."""
        own = self.state_dict()
        state = self.adapt_state_dict(dict(state), source)
        optional = set(self.optional_state_keys())
        shape_bad = [k for k in own if k in state and state[k].shape != own[k].shape]
        if shape_bad:
            raise ValueError(f"the weights in {source} do not fit this backbone: {', '.join(shape_bad[:5])} differ "
                             "in shape (a different width, depth or patch size?); use the backbone the checkpoint "
                             "was trained with")
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if [k for k in missing if k not in optional] or [k for k in unexpected if k not in optional]:
            raise ValueError(f"the weights in {source} do not fit this backbone: missing {missing[:6]}, unexpected "
                             f"{unexpected[:6]}; use the backbone configuration the checkpoint was trained with")
        self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        log.info("weights: backbone initialised from %s%s", source,
                 f" (kept fresh: {', '.join(missing)}; not used: {', '.join(unexpected)})"
                 if missing or unexpected else "")
        return {"missing": missing, "unexpected": unexpected}

    def load_external_weights(self, source: str, heads: Mapping[str, Optional[nn.Module]]) -> None:
        """Weights in another library's format (``weights=`` that is not a vitlab checkpoint)."""
        raise ValueError(f"weights={source} is not a vitlab checkpoint, and {type(self).__name__} reads no other "
                         "format: give a vitlab checkpoint (a run's checkpoints/best.ckpt)")

    # -------------------------------------------------------------- text ---
    def describe(self) -> dict[str, Any]:
        """The declared members, for logs and tests."""
        return {k: getattr(self, k) for k in ("kind", "embed_dim", "patch_size", "in_chans", "img_size", "grid",
                                               "num_prefix_tokens", "has_class_token", "num_registers",
                                               "has_dist_token", "pyramid_channels", "pyramid_strides", "mask_mode",
                                               "num_layers")}


KIND_TEXT: dict[str, str] = {"encoder": "an image encoder", "denoiser": "a diffusion denoiser"}


def kind_of(target: Any) -> Kind:
    """The kind of backbone a config's ``_target_`` builds, known before it is called (the builder checks it
    against the task before building anything): a :class:`Backbone` subclass's ``kind``, or that of the class a
    factory's return annotation names (``def vit(...) -> VisionTransformer``). A factory annotated with anything
    else builds an encoder."""
    if isinstance(target, type):
        return target.kind if issubclass(target, Backbone) else "encoder"
    import typing

    try:
        returned = typing.get_type_hints(target).get("return")
    except Exception:                      # noqa: BLE001 - an annotation that does not resolve: no declaration
        returned = None
    return returned.kind if isinstance(returned, type) and issubclass(returned, Backbone) else "encoder"
