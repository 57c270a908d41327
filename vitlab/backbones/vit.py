"""Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021).

Reads top to bottom: the model -> the variant table -> factories; its attention module and
transformer block are ``vitlab.layers.Attention`` / ``Block``. Options from later papers:

- class token or global average pooling (``global_pool``),
- register tokens (Darcet et al., "Vision Transformers Need Registers", ICLR 2024),
- a distillation token (Touvron et al., "Training data-efficient image transformers & distillation
  through attention", ICML 2021; ``distill_token``), read by ``vitlab.recipes.Distill``,
- LayerScale (Touvron et al., CaiT, ICCV 2021),
- QK-norm (Dehghani et al., "Scaling Vision Transformers to 22B Parameters", 2023),
- stochastic depth with DeiT's linear rule,
- learned absolute position embeddings, resampled bicubically to any grid,
- 2-D axial RoPE (Heo et al., "Rotary Position Embedding for Vision Transformer", 2024),
- a token mask for masked image modelling: masked patches are replaced by a
  learned mask token (BEiT / SimMIM / iBOT) when ``use_mask_token``, else
  dropped (MAE); samples may keep different numbers of patches (padded, with a
  key padding mask),
- activation checkpointing per block (``grad_checkpointing``, timm's
  ``set_grad_checkpointing``): activations are recomputed in the backward pass,
- intermediate feature taps for dense heads (``out_indices``: ``features["taps"]``, the
  outputs of chosen blocks on the patch grid; BEiT / ViT-Adapter's UPerNet input),
- window attention (Li et al., "Exploring Plain Vision Transformer Backbones for Object
  Detection", ViTDet, ECCV 2022): ``window_size`` > 0 makes every block but ``global_blocks``
  attend within non-overlapping windows of the patch grid.

Parameter names follow timm's VisionTransformer so converted checkpoints read
naturally (see ``vitlab.backbones.convert``).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitlab.backbones.base import Backbone
from vitlab.layers import (Block, PatchEmbed, RotaryEmbedding2D, linear_drop_path_rates, to_2tuple, window_partition,
                           window_shape)
from vitlab.layers.pos_embed import resample_abs_pos_embed

log = logging.getLogger(__name__)

Features = dict[str, torch.Tensor | list[torch.Tensor]]

# the stem's parameters: layer id 0 under layer-wise lr decay (timm's param_groups_layer_decay, by name)
STEM_NAMES = ("patch_embed", "cls_token", "pos_embed", "reg_token", "mask_token", "dist_token")


# ------------------------------------------------------------------- model ---

class VisionTransformer(Backbone):
    """A plain ViT that returns a dict of named features (the :class:`~vitlab.backbones.base.Backbone` contract).

    forward(images (B, C, H, W), mask (B, N) bool, True = masked) -> {
        "cls": (B, D)            class token after the final norm (if class_token)
        "dist": (B, D)           DeiT's distillation token after the final norm (if distill_token)
        "registers": (B, R, D)   register tokens after the final norm (if num_registers)
        "patch": (B, N', D)      patch tokens after the final norm (N' < N when masked tokens were
                                 dropped; with global_pool='avg' the final norm moves to fc_norm
                                 after pooling, as in timm, so these are un-normed)
        "patch_2d": (B, D, h, w) the same on the grid (when no token was dropped)
        "pooled": (B, D)         the image representation chosen by global_pool
        "prenorm": (B, T, D)     every token before the final norm
        "grid": (h, w)
        "ids_keep": (B, N')      kept patch indices (only when tokens were dropped)
        "token_valid": (B, N')   True = a real kept patch (only when samples kept different numbers)
        "taps": [(B, D, h, w)]   the outputs of blocks ``out_indices`` (prenorm, patch tokens on the grid),
                                 in that order (only when built with out_indices and no token was dropped)
    }

    ``out_indices``: an int k = k evenly spaced blocks ending at the last (depth 12, k=4 -> [2, 5, 8, 11]);
    or a list of block indices (negative ones count from the end). Resolved into ``self.out_indices``.
    ``window_size`` > 0 (ViTDet): every block not in ``global_blocks`` attends within windows (see ``Block``);
    with RoPE the angle tables are partitioned the same way, so each token keeps its grid position.

    Dropping masked tokens when samples keep different numbers: every sample's kept patches are
    padded to the largest count N' and the blocks run with a key padding mask, so each sample's
    features equal those of the sample run alone. Padded slots hold 0 in "patch" and "ids_keep"
    (arbitrary values in "prenorm"); avg pooling averages the real patches only.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        class_token: bool = True,
        distill_token: bool = False,
        global_pool: Literal["token", "avg"] = "token",
        num_registers: int = 0,
        layer_scale_init: float | None = None,
        pos_embed: Literal["learned", "none"] = "learned",
        class_pos_embed: bool = True,
        rope: bool = False,
        rope_theta: float = 100.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        use_mask_token: bool = False,
        grad_checkpointing: bool = False,
        out_indices: int | Sequence[int] | None = None,
        window_size: int = 0,
        global_blocks: Sequence[int] = (),
    ):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg' without one")
        if pos_embed not in ("learned", "none"):
            raise ValueError(f"pos_embed must be 'learned' or 'none', got {pos_embed!r}")
        if distill_token and not class_token:
            raise ValueError("distill_token=True needs class_token=True (DeiT's distillation token sits beside the "
                             "class token); set backbone.class_token=true or drop the distillation token")
        self.img_size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_layers = depth                                            # layer-wise lr decay: 0 .. depth + 1
        self.in_chans = in_chans
        self.has_dist_token = bool(distill_token)
        self.mask_mode = "replace" if use_mask_token else "drop"           # SimMIM's mask token, or MAE's dropping
        self.global_pool = global_pool
        self.has_class_token = class_token
        self.num_registers = num_registers
        self.num_prefix_tokens = int(class_token) + int(distill_token) + num_registers   # [cls, dist, registers]
        self.grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distill_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, num_registers, embed_dim)) if num_registers else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if use_mask_token else None
        # Registers never get a position (Darcet et al.); the class token does in the original ViT, and DeiT
        # gives its distillation token one too (the rows are [cls, dist, patches...]).
        self.num_pos_prefix = int(class_token and class_pos_embed) + int(distill_token and class_pos_embed)
        n_pos = self.grid[0] * self.grid[1] + self.num_pos_prefix
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, embed_dim)) if pos_embed == "learned" else None
        self.pos_drop = nn.Dropout(drop_rate)
        self.rope = RotaryEmbedding2D(embed_dim // num_heads, rope_theta) if rope else None

        self.out_indices = resolve_out_indices(out_indices, depth)
        if window_size < 0:
            raise ValueError(f"window_size must be >= 0 (0 = global attention everywhere), got {window_size}")
        self.window_size = int(window_size)
        self.global_blocks = _block_indices(global_blocks, depth, "global_blocks")
        dpr = linear_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, int(embed_dim * mlp_ratio), qkv_bias, qk_norm,
                  drop_rate, attn_drop_rate, dpr[i], layer_scale_init,
                  window_size=0 if i in self.global_blocks else self.window_size)
            for i in range(depth)
        ])
        # As in timm: with average pooling the final norm moves after the pooling (fc_norm).
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6) if global_pool == "token" else nn.Identity()
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if global_pool == "avg" else nn.Identity()
        self.grad_checkpointing = grad_checkpointing
        self.init_weights()

    # -------------------------------------------------------------- init ---
    def init_weights(self) -> None:
        for p in (self.pos_embed, self.reg_token, self.mask_token, self.dist_token):   # dist: trunc-normal, as timm
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(_init_linear)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that take no weight decay beyond norms and biases."""
        return {n for n in ("pos_embed", "cls_token", "dist_token", "reg_token", "mask_token")
                if getattr(self, n) is not None}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them (timm's name).

        Saves activation memory for ~one extra forward pass of compute; results and gradients are
        unchanged (the recomputation replays the same dropout / drop-path random draws).
        """
        self.grad_checkpointing = enable

    # ------------------------------------------------------ the contract ---
    def layer_id(self, name: str) -> int:
        """``blocks.i.*`` -> i + 1; the patch embedding, tokens and positions -> 0; the final norms -> depth + 1."""
        head, _, rest = name.partition(".")
        if head == "blocks":
            return int(rest.split(".", 1)[0]) + 1
        if head in STEM_NAMES:
            return 0
        return self.num_layers + 1

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.blocks)

    def token_norm(self) -> nn.Module | None:
        return self.norm if self.global_pool == "token" else None

    def pool_norm(self) -> nn.Module | None:
        return self.fc_norm if self.global_pool == "avg" else None

    def optional_state_keys(self) -> tuple[str, ...]:
        """A class token dropped for detection, a mask token from MAE / SimMIM pretraining, a distillation token,
        and the final norms (which one exists follows ``global_pool``)."""
        return ("mask_token", "dist_token", "cls_token", "fc_norm.weight", "fc_norm.bias", "norm.weight", "norm.bias")

    def adapt_state_dict(self, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        """A checkpoint's position table -> this backbone's grid and prefix rows (:func:`fit_pos_embed`); a table of
        another width is left for :meth:`load_pretrained` to refuse."""
        pe = state.get("pos_embed")
        own = self.pos_embed
        if pe is not None and own is not None and pe.shape != own.shape and pe.shape[-1] == own.shape[-1]:
            state["pos_embed"] = fit_pos_embed(pe, own.detach(), self.num_pos_prefix, self.grid, source)
        return state

    def load_external_weights(self, source: str, heads) -> None:
        """timm ViT / DeiT weights (a file, an URL or timm:NAME): see :mod:`vitlab.backbones.convert`."""
        from vitlab.backbones.convert import load_timm_weights

        load_timm_weights(self, source, head=heads.get("head"), dist_head=heads.get("dist_head"))

    # ----------------------------------------------------------- forward ---
    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Add position embeddings to the patches and prepend class, distillation and register tokens."""
        B = x.shape[0]
        pos = None
        if self.pos_embed is not None:
            pos = self.pos_embed
            if grid != self.grid:
                pos = resample_abs_pos_embed(pos, grid, self.grid, self.num_pos_prefix)
            x = x + pos[:, self.num_pos_prefix:]
        prefix = []
        if self.cls_token is not None:
            cls = self.cls_token
            if pos is not None and self.num_pos_prefix:
                cls = cls + pos[:, :1]
            prefix.append(cls.expand(B, -1, -1))
        if self.dist_token is not None:
            dist = self.dist_token
            if pos is not None and self.num_pos_prefix:
                dist = dist + pos[:, 1:2]                                  # row 1: the distillation token's
            prefix.append(dist.expand(B, -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(B, -1, -1))
        return torch.cat(prefix + [x], dim=1) if prefix else x

    def _drop_masked(self, x: torch.Tensor, mask: torch.Tensor, num_keep: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """MAE: keep only the unmasked patches of x (B, P + N, D), in grid order.

        Returns (x (B, P + N', D), ids_keep (B, N'), token_valid (B, N') or None). When samples keep
        different numbers, N' is the largest count, shorter samples are padded (patch index 0 at the
        padded slots, harmless because the blocks never attend to them) and token_valid marks the real ones.
        ``num_keep``: every sample keeps exactly this many (MAE's masking), so the counts are not read back
        from the device (no host sync).
        """
        D = x.shape[-1]
        P = self.num_prefix_tokens
        n_keep = (~mask).sum(1)                                              # (B,)
        n_max = int(num_keep) if num_keep is not None else int(n_keep.max())
        # A stable sort of the mask puts each sample's kept patch indices first, in increasing order.
        ids_keep = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)[:, :n_max]     # (B, N')
        token_valid = None
        if num_keep is None and not bool((n_keep == n_max).all()):
            token_valid = torch.arange(n_max, device=mask.device) < n_keep[:, None]       # (B, N')
            ids_keep = ids_keep.masked_fill(~token_valid, 0)
        kept = torch.gather(x[:, P:], 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))       # (B, N', D)
        return torch.cat([x[:, :P], kept], dim=1), ids_keep, token_valid

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None,
                num_keep: int | None = None) -> Features:
        """``num_keep`` (dropping masks only): the number of patches every sample keeps, when the caller knows it
        (MAE): the forward then never waits for the device. A mask keeping other counts gives wrong results."""
        x, grid = self.patch_embed(images)                                  # (B, N, D)
        B, N, D = x.shape
        ids_keep = token_valid = key_padding_mask = None
        if mask is not None:
            if mask.shape != (B, N):
                raise ValueError(f"mask must be (B, N) = ({B}, {N}), got {tuple(mask.shape)}")
            mask = mask.bool()
            if self.mask_token is not None:                                # BEiT / SimMIM: replace
                x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype).expand(B, N, D), x)
        x = self._pos_embed(x, grid)                                        # (B, P + N, D)
        windowed = any(blk.window_size for blk in self.blocks)
        if mask is not None and self.mask_token is None and windowed:
            raise ValueError(f"window attention (window_size={self.window_size}) needs the full patch grid, but this "
                             "mask drops the masked tokens (MAE): build the backbone with use_mask_token=true (masked "
                             "tokens replaced, BEiT / SimMIM) or window_size=0")
        if mask is not None and self.mask_token is None:                    # MAE: drop
            x, ids_keep, token_valid = self._drop_masked(x, mask, num_keep)  # (B, P + N', D)
            if token_valid is not None:                                     # prefix tokens are always real
                key_padding_mask = F.pad(token_valid, (self.num_prefix_tokens, 0), value=True)   # (B, P + N')
        x = self.pos_drop(x)

        rope = rope_windows = None
        if self.rope is not None:
            cos, sin = self.rope.angles(grid)                               # (N, Dh/2)
            if ids_keep is not None:
                cos, sin = cos[ids_keep].unsqueeze(1), sin[ids_keep].unsqueeze(1)   # (B, 1, N', Dh/2)
            rope = (cos, sin)
            if windowed:
                rope_windows = self._window_rope(grid)
        checkpointed = self.grad_checkpointing and torch.is_grad_enabled()
        taps: dict[int, torch.Tensor] = {}                                  # block index -> its output
        for i, blk in enumerate(self.blocks):
            r = rope_windows if blk.window_size else rope
            if checkpointed:    # store only the block's input; recompute the rest (same RNG draws) in backward
                x = checkpoint(blk, x, r, self.num_prefix_tokens, key_padding_mask, grid, use_reentrant=False)
            else:
                x = blk(x, r, self.num_prefix_tokens, key_padding_mask, grid)
            if i in self.out_indices and ids_keep is None:
                taps[i] = x                                                 # (B, P + N, D)
        out = self._features(x, grid, ids_keep, token_valid)
        if self.out_indices and ids_keep is None:                           # taps need the whole grid
            P = self.num_prefix_tokens
            out["taps"] = [taps[i][:, P:].transpose(1, 2).reshape(B, D, *grid) for i in self.out_indices]
        return out

    def _window_rope(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables partitioned like the windows: (nW, wh * ww, Dh/2) each.

        The angles are those of the padded grid, so a real token keeps its own (y, x) position and padded slots
        continue the grid beyond the edge.
        """
        window = window_shape(self.window_size, grid)
        padded = (grid[0] + (-grid[0]) % window[0], grid[1] + (-grid[1]) % window[1])
        tables = []
        for t in self.rope.angles(padded):                                  # (Hp*Wp, Dh/2)
            t = t.reshape(1, padded[0], padded[1], -1)
            tables.append(window_partition(t, window)[0])                   # (nW, wh*ww, Dh/2)
        return tables[0], tables[1]

    def _features(self, prenorm: torch.Tensor, grid: tuple[int, int], ids_keep: torch.Tensor | None,
                  token_valid: torch.Tensor | None = None) -> Features:
        P, R = self.num_prefix_tokens, self.num_registers
        x = self.norm(prenorm)
        patch = x[:, P:]                                                    # (B, N, D)
        if token_valid is not None:
            patch = patch.masked_fill(~token_valid.unsqueeze(-1), 0.0)
        out: Features = {"prenorm": prenorm, "patch": patch, "grid": grid}
        if self.has_class_token:
            out["cls"] = x[:, 0]
        if self.dist_token is not None:
            out["dist"] = x[:, 1]                                           # (B, D), right after the class token
        if R:
            out["registers"] = x[:, P - R:P]
        if ids_keep is None:
            out["patch_2d"] = patch.transpose(1, 2).reshape(patch.shape[0], patch.shape[2], *grid)   # (B, D, h, w)
        else:
            out["ids_keep"] = ids_keep
        if token_valid is not None:
            out["token_valid"] = token_valid
        if self.global_pool == "token":
            out["pooled"] = out["cls"]
        elif token_valid is None:
            out["pooled"] = self.fc_norm(prenorm[:, P:].mean(dim=1))
        else:                                                               # the mean of the real patches
            w = token_valid.unsqueeze(-1).to(prenorm.dtype)                 # (B, N', 1)
            out["pooled"] = self.fc_norm((prenorm[:, P:] * w).sum(1) / w.sum(1).clamp_min(1))
        return out


def resolve_out_indices(out_indices: int | Sequence[int] | None, depth: int) -> list[int]:
    """Block indices of the taps: an int k -> k evenly spaced blocks ending at the last (depth 12, k=4 ->
    [2, 5, 8, 11]); a list -> its indices made non-negative, in the given order; None -> []."""
    if out_indices is None:
        return []
    if isinstance(out_indices, int):
        if not 1 <= out_indices <= depth:
            raise ValueError(f"out_indices={out_indices} asks for that many evenly spaced taps, but the ViT has "
                             f"depth {depth}: use 1..{depth}, or a list of block indices")
        # block (i + 1) * depth / k - 1, rounded half up: the k-th is the last block
        return [(2 * (i + 1) * depth + out_indices) // (2 * out_indices) - 1 for i in range(out_indices)]
    return _block_indices(out_indices, depth, "out_indices")


def _block_indices(indices: Sequence[int], depth: int, what: str) -> list[int]:
    out = []
    for i in indices:
        i = int(i)
        if not -depth <= i < depth:
            raise ValueError(f"{what} has block index {i}, out of range for depth {depth}: use 0..{depth - 1} "
                             f"(or -{depth}..-1 from the end)")
        out.append(i % depth)
    return out


def fit_pos_embed(pe: torch.Tensor, own: torch.Tensor, own_prefix: int, grid: tuple[int, int], source: str
                  ) -> torch.Tensor:
    """A checkpoint's position table (1, P + h*w, D) -> this backbone's (``own``, with ``own_prefix`` prefix rows on
    ``grid``): the patch rows resampled to the grid, the prefix rows (class / distillation token) kept where both
    have them, dropped where only the checkpoint has them (ViTDet fine-tunes MAE weights without the class token),
    and left at their init where only this one has."""
    candidates = [own_prefix] + [p for p in (0, 1, 2) if p != own_prefix]
    src_prefix = next((p for p in candidates if pe.shape[1] > p and math.isqrt(pe.shape[1] - p) ** 2
                       == pe.shape[1] - p), None)
    if src_prefix is None:
        raise ValueError(f"cannot resample the position embeddings of {source}: {pe.shape[1]} rows are not a square "
                         "grid plus class / distillation rows")
    side = math.isqrt(pe.shape[1] - src_prefix)
    patches = pe[:, src_prefix:]
    if (side, side) != tuple(grid):
        patches = resample_abs_pos_embed(patches, tuple(grid), (side, side), 0)
        log.info("weights: position embeddings resampled from %dx%d to %dx%d", side, side, *grid)
    keep = min(src_prefix, own_prefix)
    prefix = torch.cat([pe[:, :keep], own[:, keep:own_prefix].to(pe.dtype)], dim=1)
    if src_prefix != own_prefix:
        log.info("weights: %d prefix position row(s) in %s, %d in this backbone (%s)", src_prefix, source,
                 own_prefix, "extra rows dropped" if src_prefix > own_prefix else "missing rows keep their init")
    return torch.cat([prefix, patches], dim=1)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------ the variants ---
# name: (width, depth, heads, MLP width), from the paper that introduced the size.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 3, 768),      # DeiT (Touvron et al. 2021), "DeiT-Ti", 5.7M params at /16
    "S": (384, 12, 6, 1536),      # DeiT, "DeiT-S", 22.1M at /16
    "B": (768, 12, 12, 3072),     # ViT (Dosovitskiy et al. 2021), "ViT-Base", 86.6M at /16
    "L": (1024, 24, 16, 4096),    # ViT, "ViT-Large", 304.3M at /16
    "H": (1280, 32, 16, 5120),    # ViT, "ViT-Huge", 632.0M at /14
    "g": (1408, 40, 16, 6144),    # Zhai et al., "Scaling Vision Transformers" (CVPR 2022), "ViT-g", 1.01B at /14
}


def parse_variant(variant: str) -> tuple[str, int | None]:
    """'B/16' -> ('B', 16); 'S' -> ('S', None)."""
    m = re.fullmatch(r"(Ti|S|B|L|H|g)(?:/(\d+))?", variant)
    if not m:
        raise ValueError(f"unknown ViT variant {variant!r}; use one of {', '.join(VARIANTS)} "
                         "with an optional patch size, e.g. 'B/16'")
    return m.group(1), int(m.group(2)) if m.group(2) else None


def vit(variant: str = "B/16", embed_dim: int | None = None, depth: int | None = None,
        num_heads: int | None = None, mlp_ratio: float | None = None,
        patch_size: int | None = None, **kwargs) -> VisionTransformer:
    """Build a ViT from a row of the variant table, e.g. ``vit("S/16", img_size=224)``.

    Explicit ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio`` or ``patch_size``
    override the row (for small custom models).
    """
    size, p = parse_variant(variant)
    width, d, heads, mlp = VARIANTS[size]
    return VisionTransformer(
        patch_size=patch_size or p or 16,
        embed_dim=embed_dim or width,
        depth=depth or d,
        num_heads=num_heads or heads,
        mlp_ratio=mlp_ratio or mlp / width,
        **kwargs,
    )


def vit_tiny(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return vit("Ti", patch_size=patch_size, **kwargs)


def vit_small(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return vit("S", patch_size=patch_size, **kwargs)


def vit_base(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return vit("B", patch_size=patch_size, **kwargs)


def vit_large(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return vit("L", patch_size=patch_size, **kwargs)


def vit_huge(patch_size: int = 14, **kwargs) -> VisionTransformer:
    return vit("H", patch_size=patch_size, **kwargs)


def vit_giant(patch_size: int = 14, **kwargs) -> VisionTransformer:
    return vit("g", patch_size=patch_size, **kwargs)
