"""Load timm ViT / DeiT weights into vitlab's VisionTransformer.

timm keeps the class token's (and sometimes the registers') position
embedding inside ``pos_embed``; vitlab keeps a position only for the class
token (``class_pos_embed``) and none for registers. Since a prefix token plus
its constant position embedding is itself a constant, the conversion folds
what vitlab has no slot for into the token, which is exact. The patch grid is
resampled bicubically when the image size or patch grid differs.

Distilled DeiT (timm's ``VisionTransformerDistilled``: ``dist_token``,
``head_dist``) loads into a ViT built with ``distill_token=True``; its
distillation head comes back as ``dist_head.*`` for ``vitlab.recipes.Distill``.

Sources accepted by :func:`load_timm_weights`: a local file (``.pth``, ``.bin``,
``.safetensors``), an http(s) URL (cached by ``torch.hub``), or ``timm:NAME``
for a timm model's pretrained weights from the hub (needs internet).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from vitlab.layers.pos_embed import resample_abs_pos_embed

if TYPE_CHECKING:                           # annotations only: vit.py loads timm weights through this module
    from vitlab.backbones.vit import VisionTransformer

log = logging.getLogger(__name__)

_UNSUPPORTED = ("norm_pre", "attn.norm", "mlp.norm")
_DISTILLED = ("dist_token", "head_dist")          # supported only by a ViT built with distill_token=True


def _infer_prefix_in_pos(n_pos: int, candidates: list[int], old_grid: Optional[tuple[int, int]],
                         target_grid: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """(how many of timm's position rows belong to prefix tokens, the source's patch grid).

    Without ``old_grid`` the reading must be unambiguous: a square grid, or the target's own grid
    (a same-size load of a non-square model). Two readings that disagree are refused, never guessed.
    """
    if old_grid is not None:
        for k in candidates:
            if n_pos - k == old_grid[0] * old_grid[1]:
                return k, (int(old_grid[0]), int(old_grid[1]))
        raise ValueError(f"timm's {n_pos} position embeddings do not fit old_grid={tuple(old_grid)} "
                         f"with {' or '.join(map(str, sorted(set(candidates))))} prefix rows")
    readings = set()
    for k in candidates:
        n = n_pos - k
        if n > 0 and math.isqrt(n) ** 2 == n:
            readings.add((k, (math.isqrt(n), math.isqrt(n))))
        if n == target_grid[0] * target_grid[1]:
            readings.add((k, tuple(target_grid)))
    if len(readings) == 1:
        return readings.pop()
    raise ValueError(f"cannot tell how many of timm's {n_pos} position embeddings belong to prefix tokens "
                     f"or what grid they form ({'ambiguous' if readings else 'not a square grid'}); "
                     "pass old_grid=(h, w) of the source model")


def convert_timm_vit(state_dict: dict[str, torch.Tensor], model: VisionTransformer,
                     old_grid: Optional[tuple[int, int]] = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Map a timm VisionTransformer state dict onto ``model``.

    Returns (backbone_state, head_state); head_state holds ``fc.weight`` /
    ``fc.bias`` for :class:`vitlab.tasks.ClassificationHead` when the source has
    a classifier, and ``dist_head.weight`` / ``dist_head.bias`` (the Distill
    recipe's distillation head) when it is a distilled DeiT.
    """
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    has_dist_slot = model.has_dist_token
    unsupported = _UNSUPPORTED if has_dist_slot else _UNSUPPORTED + _DISTILLED
    bad = sorted(k for k in sd if any(k == u or f".{u}." in f".{k}" for u in unsupported))
    if bad:
        raise ValueError(f"this timm checkpoint has parts vitlab's ViT does not model: {bad[:6]}. "
                         "Extra norms are not supported; Distilled DeiT tokens need a backbone built with "
                         "distill_token=True (recipe=distill).")
    backbone: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith("head."):
            head["fc." + k[len("head."):]] = v
        elif k.startswith("head_dist."):
            head["dist_head." + k[len("head_dist."):]] = v
        elif k not in ("pos_embed",):
            backbone[k] = v

    has_cls = "cls_token" in sd
    has_dist = "dist_token" in sd          # timm's prefix order: [cls, dist, registers]
    R = sd["reg_token"].shape[1] if "reg_token" in sd else 0
    if has_cls != model.has_class_token or R != model.num_registers:
        raise ValueError(f"source has class_token={has_cls}, {R} registers; the target model has "
                         f"class_token={model.has_class_token}, {model.num_registers} registers")
    if "pos_embed" in sd:
        pos = sd["pos_embed"]
        k, src_grid = _infer_prefix_in_pos(pos.shape[1], [int(has_cls) + int(has_dist) + R, 0], old_grid,
                                           model.grid)
        prefix_pos, grid_pos = pos[:, :k], pos[:, k:]
        cls_pos = prefix_pos[:, :1] if (k and has_cls) else None
        dist_pos = prefix_pos[:, 1:2] if (k and has_dist) else None
        reg_pos = prefix_pos[:, int(has_cls) + int(has_dist):] if (k and R) else None
        if reg_pos is not None:                              # vitlab registers carry no position: fold
            backbone["reg_token"] = backbone["reg_token"] + reg_pos
        if model.num_pos_prefix:
            zero = torch.zeros_like(grid_pos[:, :1])
            rows = [cls_pos if cls_pos is not None else zero]
            if has_dist_slot:                                # a source without a dist token: a zero row
                rows.append(dist_pos if dist_pos is not None else zero)
            new_pos = torch.cat(rows + [grid_pos], dim=1)
        else:
            if cls_pos is not None:                          # no class slot in the table: fold
                backbone["cls_token"] = backbone["cls_token"] + cls_pos
            if dist_pos is not None:
                backbone["dist_token"] = backbone["dist_token"] + dist_pos
            new_pos = grid_pos
        if model.pos_embed is None:
            raise ValueError("source has position embeddings but the target model was built with pos_embed='none'")
        backbone["pos_embed"] = resample_abs_pos_embed(new_pos, model.grid, src_grid, model.num_pos_prefix)
    return backbone, head


def _unwrap(obj) -> dict[str, torch.Tensor]:
    """Training checkpoints (DeiT's, timm's train script) keep the weights under one of these keys."""
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            return obj[key]
    return obj


def _read_state_dict(source: str, cache_dir: Optional[str] = None) -> dict[str, torch.Tensor]:
    if source.startswith(("http://", "https://")):
        return _unwrap(torch.hub.load_state_dict_from_url(source, model_dir=cache_dir, map_location="cpu",
                                                          progress=True, check_hash=False, weights_only=True))
    if source.startswith("timm:"):
        import timm  # the hub path needs timm and internet

        name = source[len("timm:"):]
        return timm.create_model(name, pretrained=True).state_dict()
    path = Path(os.path.expanduser(source))
    if not path.is_file():
        raise FileNotFoundError(f"timm weights not found at {path}; give a file path, an http(s) URL "
                                "or timm:MODEL_NAME")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return _unwrap(torch.load(path, map_location="cpu", weights_only=True))


def load_timm_weights(model: VisionTransformer, source: str, head: Optional[torch.nn.Module] = None,
                      old_grid: Optional[tuple[int, int]] = None, cache_dir: Optional[str] = None,
                      strict: bool = True, dist_head: Optional[torch.nn.Module] = None) -> None:
    """Load timm ViT/DeiT weights from ``source`` into ``model`` (and its classifier ``head``).

    The head is loaded only when its shape matches (fine-tuning on another
    number of classes keeps the fresh head, with a log line saying so). A
    distilled DeiT's ``head_dist`` goes to ``dist_head`` (the Distill recipe's
    ``dist_head``) under the same rule. Plain ViT weights loaded into a model
    with a distillation token leave that token (and its position row, zero) fresh.
    """
    backbone_sd, head_sd = convert_timm_vit(_read_state_dict(source, cache_dir), model, old_grid)
    missing, unexpected = model.load_state_dict(backbone_sd, strict=False)
    missing = [k for k in missing if k not in ("mask_token", "dist_token")]
    if strict and (missing or unexpected):
        raise ValueError(f"timm weights do not fit this ViT: missing {missing[:6]}, unexpected {unexpected[:6]}")
    if model.has_dist_token and "dist_token" not in backbone_sd:
        log.info("the source has no distillation token: the model's starts from its initialisation")
    for module, prefix, what in ((head, "fc.", "classifier"), (dist_head, "dist_head.", "distillation head")):
        part = {k: v for k, v in head_sd.items() if k.startswith(prefix)}
        if module is None or not part:
            continue
        if prefix == "dist_head.":                          # the recipe's dist_head is a bare nn.Linear
            part = {k[len(prefix):]: v for k, v in part.items()}
        own = module.state_dict()
        if all(k in own and own[k].shape == v.shape for k, v in part.items()):
            module.load_state_dict(part, strict=False)
        else:
            log.info("timm %s not loaded: its shape differs from this head (new number of classes)", what)
    log.info("loaded timm weights from %s", source)


# ------------------------------------------------------- the timm equivalent ---

def timm_vit_kwargs(model: VisionTransformer, num_classes: int) -> tuple[dict, list[str]]:
    """Arguments for timm's ``VisionTransformer`` that build the same network as ``model`` (the benchmark's
    reference), and the differences timm cannot express (e.g. 2-D RoPE), which are left out.

    Read from the built module, not the config, so custom widths and every variant map the same way.
    """
    blk = model.blocks[0]
    attn = blk.attn
    kwargs = dict(
        img_size=model.img_size, patch_size=model.patch_size, in_chans=model.patch_embed.proj.in_channels,
        num_classes=num_classes, global_pool=model.global_pool, embed_dim=model.embed_dim, depth=model.depth,
        num_heads=attn.num_heads, mlp_ratio=blk.mlp.fc1.out_features / model.embed_dim,
        qkv_bias=attn.qkv.bias is not None, qk_norm=isinstance(attn.q_norm, torch.nn.LayerNorm),
        init_values=float(blk.ls1.gamma.detach().flatten()[0]) if hasattr(blk.ls1, "gamma") else None,
        class_token=model.has_class_token, reg_tokens=model.num_registers,
        pos_embed="learn" if model.pos_embed is not None else "none",
        # timm's no_embed_class=True gives no prefix token a position, like vitlab's class_pos_embed=False
        no_embed_class=not model.num_pos_prefix,
        fc_norm=model.global_pool == "avg",
    )
    differences = []
    if model.rope is not None:
        differences.append("2-D RoPE (timm's VisionTransformer has none; the reference runs without it)")
    if model.has_dist_token:
        differences.append("the DeiT distillation token (timm's VisionTransformer has none; the reference runs "
                           "without it)")
    if model.num_registers and model.num_pos_prefix:
        # vitlab gives registers no position; timm with no_embed_class=False gives every prefix token one
        differences.append("position rows for registers (timm adds them; vitlab's registers have none)")
    return kwargs, differences


def create_timm_equivalent(model: VisionTransformer, num_classes: int, drop_path_rate: float = 0.0,
                           **overrides) -> tuple[torch.nn.Module, list[str]]:
    """timm's VisionTransformer with ``model``'s architecture (and a ``num_classes`` head), randomly initialised;
    plus the differences :func:`timm_vit_kwargs` could not express. timm's fused attention (F.sdpa) stays on."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    kwargs, differences = timm_vit_kwargs(model, num_classes)
    kwargs.update(drop_path_rate=drop_path_rate, **overrides)
    return TimmViT(**kwargs), differences


_TIMM_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge", 1408: "giant"}


def timm_model_name(model: VisionTransformer, num_classes: int) -> Optional[str]:
    """timm's registry name for ``model``'s architecture (e.g. 'vit_base_patch16_224') when timm has one with the
    same configuration, else None. Checked by building both on the meta device (no memory, no weights)."""
    import timm

    size = _TIMM_SIZES.get(model.embed_dim)
    name = f"vit_{size}_patch{model.patch_size}_{model.img_size[0]}"
    if size is None or model.img_size[0] != model.img_size[1] or name not in timm.list_models(name):
        return None
    kwargs, differences = timm_vit_kwargs(model, num_classes)
    if differences:
        return None
    with torch.device("meta"):
        registered = timm.create_model(name, pretrained=False, num_classes=num_classes,
                                       in_chans=kwargs["in_chans"])
        ours, _ = create_timm_equivalent(model, num_classes)
    shapes = [{k: v.shape for k, v in m.state_dict().items()} for m in (registered, ours)]
    return name if shapes[0] == shapes[1] and registered.global_pool == ours.global_pool else None
