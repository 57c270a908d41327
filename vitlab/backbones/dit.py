"""Diffusion Transformer (Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023).

A denoiser, not a feature extractor: ``model(x, t, y) -> out`` maps a noisy image or latent x (B, C, H, W), the
timestep t (B,) and class labels y (B,) to a prediction of the same spatial size (the noise or velocity, plus
the variance interpolation value when ``learn_sigma``). Reads top to bottom: the adaLN-Zero block -> the final
layer -> the model -> the variant table -> the factory. It reuses the ViT's pieces (``vitlab.layers.Attention``,
so every attention backend of ``vitlab.layers.attention`` works; ``Mlp``; ``PatchEmbed``; the fixed
2-D sin-cos position table; ``DropPath``) and the conditioning layers of ``vitlab.layers.adaln``.

- adaLN-Zero conditioning: c = t_emb + y_emb regresses shift / scale / gate of each block's attention and MLP
  branches; the gates and the output layer start at zero, so at initialisation every block is the identity and
  the model outputs zeros (the best of DiT's conditioning designs, its Fig. 5),
- DiT's initialisation (xavier-uniform linears, N(0, 0.02) embedders, zero modulation and output),
- ``learn_sigma``: twice the input channels out, the noise first, then the variance interpolation value
  (Nichol & Dhariwal, "Improved Denoising Diffusion Probabilistic Models", 2021),
- classifier-free guidance's null label (Ho & Salimans 2022) as the last row of the label table;
  ``num_classes=0`` builds an unconditional model,
- long skip connections between shallow and deep blocks (``long_skips``; Bao et al., "All are Worth Words: A ViT
  Backbone for Diffusion Models", U-ViT, CVPR 2023),
- fixed sin-cos (DiT) or learned (initialised from sin-cos) position embeddings, QK-norm, stochastic depth with
  DeiT's linear rule, activation checkpointing per block.

Parameter names follow DiT's reference code (``x_embedder``, ``t_embedder``, ``y_embedder``, ``blocks.i.
adaLN_modulation``, ``final_layer``), and the attention / MLP ones timm's, so the official checkpoints load with
``load_state_dict`` as they are (their ``pos_embed`` is our buffer of the same name).
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitlab.backbones.base import Backbone
from vitlab.layers import Attention, DropPath, Mlp, PatchEmbed, linear_drop_path_rates, to_2tuple
from vitlab.layers.adaln import LabelEmbedder, TimestepEmbedder, modulate
from vitlab.layers.pos_embed import resample_abs_pos_embed, sincos_2d_pos_embed


# ------------------------------------------------------------------ layers ---

class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: x + gate * Attn(modulate(LN(x))), then the same with the MLP.

    The LayerNorms have no affine parameters: the per-sample shift and scale regressed from c replace them.
    With ``skip`` (U-ViT's "out" blocks) the block first fuses its input with a long skip from a shallow block:
    x = Linear(concat(x, skip)) (B, N, 2D) -> (B, N, D).
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, qkv_bias: bool = True, qk_norm: bool = False,
                 attn_drop: float = 0.0, drop_path: float = 0.0, skip: bool = False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_norm, attn_drop)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim)
        self.mlp.act = nn.GELU(approximate="tanh")         # DiT's MLP uses the tanh approximation of GELU
        self.drop_path2 = DropPath(drop_path)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D), c (B, D), skip (B, N, D) for a block built with ``skip`` -> (B, N, D)."""
        if self.skip_linear is not None:
            if skip is None:
                raise ValueError("this block fuses a long skip (U-ViT): pass skip=the output of its paired in-block")
            x = self.skip_linear(torch.cat([x, skip], dim=-1))               # (B, N, 2D) -> (B, N, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)   # (B, D) each
        x = x + self.drop_path1(gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1)))
        x = x + self.drop_path2(gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2)))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale; no gate) -> LayerNorm -> Linear(D, p * p * out_chans): tokens back to patch pixels."""

    def __init__(self, dim: int, patch_size: int, out_chans: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_chans)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)            # (B, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))      # (B, N, p * p * C_out)


# ------------------------------------------------------------------- model ---

class DiT(Backbone):
    """The DiT denoiser: forward(x (B, C, H, W), t (B,) float, y (B,) long or None) -> (B, C_out, H, W).

    ``t`` is the model time the objective hands over (DDPM: the integer step as a float; flow matching:
    t * 1000); fractional values are fine. ``y``: class labels in [0, num_classes), or ``num_classes`` = the null
    label (classifier-free guidance); None on a conditional model means the null label for every sample; an
    unconditional model (``num_classes=0``) takes y=None only. H and W must be multiples of the patch size; a size
    other than ``img_size`` recomputes the sin-cos table for the new grid (a learned table is resampled).

    ``long_skips`` (U-ViT): the first depth // 2 blocks are "in" blocks, the last depth // 2 "out" blocks (one
    middle block between them when depth is odd); out block i fuses the output of in block depth // 2 - 1 - i.
    """

    kind = "denoiser"                       # the Backbone contract: forward(x, t, y), for task=diffusion
    num_prefix_tokens = 0

    def __init__(
        self,
        img_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        in_chans: int = 4,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        long_skips: bool = False,
        qk_norm: bool = False,
        qkv_bias: bool = True,
        pos_embed: Literal["sincos", "learned"] = "sincos",
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed must be 'sincos' (DiT's fixed table) or 'learned', got {pos_embed!r}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}")
        self.img_size = to_2tuple(img_size)
        if self.img_size[0] % patch_size or self.img_size[1] % patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {patch_size}: pick a patch "
                             "size that divides both sides (DiT uses 2, 4 or 8)")
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.out_chans = 2 * in_chans if learn_sigma else in_chans
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_layers = depth
        self.num_classes = num_classes
        self.null_class = num_classes if num_classes > 0 else None
        self.learn_sigma = learn_sigma
        self.long_skips = long_skips
        self.grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.grad_checkpointing = grad_checkpointing

        self.x_embedder = PatchEmbed(patch_size, in_chans, embed_dim)
        self.t_embedder = TimestepEmbedder(embed_dim)
        self.y_embedder = LabelEmbedder(num_classes, embed_dim) if num_classes > 0 else None
        table = sincos_2d_pos_embed(embed_dim, self.grid)                  # (1, N, D)
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(table)
        else:                                                               # fixed, as DiT; saved with the weights
            self.register_buffer("pos_embed", table)

        dpr = linear_drop_path_rates(drop_path_rate, depth)
        n_skip = depth // 2 if long_skips else 0                            # in blocks = out blocks = n_skip
        self.blocks = nn.ModuleList([
            DiTBlock(embed_dim, num_heads, int(embed_dim * mlp_ratio), qkv_bias, qk_norm, attn_drop_rate, dpr[i],
                     skip=long_skips and i >= depth - n_skip)
            for i in range(depth)
        ])
        self.num_skips = n_skip
        self.final_layer = FinalLayer(embed_dim, patch_size, self.out_chans)
        self.init_weights()

    # -------------------------------------------------------------- init ---
    def init_weights(self) -> None:
        """DiT's initialisation; afterwards every block is the identity and the model outputs zeros."""
        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.apply(basic)
        w = self.x_embedder.proj.weight                                     # (D, C, p, p): xavier as a linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for blk in self.blocks:                                             # adaLN-Zero: every gate starts at 0
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
            if blk.skip_linear is not None:
                # [I, 0]: identity on the deep path, zero on the skip, so the block stays the identity at init.
                # U-ViT initialises this layer randomly (trunc-normal); we keep DiT's identity-at-init property.
                D = self.embed_dim
                with torch.no_grad():
                    blk.skip_linear.weight.zero_()
                    blk.skip_linear.weight[:, :D].copy_(torch.eye(D))
                nn.init.zeros_(blk.skip_linear.bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def no_weight_decay(self) -> set[str]:
        """The learned position table (DiT itself trains with weight decay 0 everywhere)."""
        return {"pos_embed"} if isinstance(self.pos_embed, nn.Parameter) else set()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them (timm's name).

        Results and gradients are unchanged (the recomputation replays the same drop-path random draws).
        """
        self.grad_checkpointing = enable

    # ------------------------------------------------------ the contract ---
    def layer_id(self, name: str) -> int:
        """``blocks.i.*`` -> i + 1; the embedders and positions -> 0; the final layer -> depth + 1."""
        head, _, rest = name.partition(".")
        if head == "blocks":
            return int(rest.split(".", 1)[0]) + 1
        if head in ("x_embedder", "t_embedder", "y_embedder", "pos_embed"):
            return 0
        return self.num_layers + 1

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.blocks)

    def load_external_weights(self, source: str, heads) -> None:
        """An official DiT checkpoint (facebookresearch/DiT's ``DiT-XL-2-256x256.pt``: a plain state dict whose
        names are this model's), loaded strictly; its ``pos_embed`` replaces the buffer of the same name."""
        import os
        from pathlib import Path

        path = Path(os.path.expanduser(str(source)))
        if not path.is_file():
            raise FileNotFoundError(f"weights={source} does not exist; give a DiT state dict file")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("ema", state.get("model", state)) if isinstance(state, dict) else state
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"the weights in {source} do not fit this DiT: missing {missing[:6]}, unexpected "
                             f"{unexpected[:6]}; build the variant the file was trained as (backbone.variant, "
                             "backbone.learn_sigma, data.img_size)")

    # ----------------------------------------------------------- forward ---
    def _pos(self, grid: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """The position table for ``grid``: (1, h * w, D)."""
        if grid == self.grid:
            return self.pos_embed
        if isinstance(self.pos_embed, nn.Parameter):                        # learned: resample bicubically
            return resample_abs_pos_embed(self.pos_embed, grid, self.grid)
        return sincos_2d_pos_embed(self.embed_dim, grid).to(device=like.device, dtype=self.pos_embed.dtype)

    def condition(self, t: torch.Tensor, y: torch.Tensor | None, batch: int) -> torch.Tensor:
        """The conditioning vector c = t_emb + y_emb: (B, D)."""
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must have shape (B,) = ({batch},), got {tuple(t.shape)}")
        c = self.t_embedder(t)                                              # (B, D)
        if self.y_embedder is None:
            if y is not None:
                raise ValueError("this DiT is unconditional (num_classes=0) but got class labels y: pass y=None, "
                                 "or build the model with num_classes > 0")
            return c
        if y is None:                                                       # the unconditional prediction
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=t.device)
        if y.shape != (batch,):
            raise ValueError(f"y must have shape (B,) = ({batch},), got {tuple(y.shape)}")
        return c + self.y_embedder(y)                                       # (B, D)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, h * w, p * p * C) tokens -> (B, C, h * p, w * p); each token's channels are laid out (p, p, C)."""
        B, p, C = x.shape[0], self.patch_size, self.out_chans
        h, w = grid
        x = x.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)           # (B, C, h, p, w, p)
        return x.reshape(B, C, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"DiT expects x of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}: check "
                             "in_chans against the data (or the latent autoencoder's channels)")
        B = x.shape[0]
        # the objectives keep their schedule in float32 (x_t and the sampler's state are float32): run in the
        # weights' dtype (bf16-true training, a .half() model); the objective reads the output in float32 again
        x = x.to(self.x_embedder.proj.weight.dtype)
        tokens, grid = self.x_embedder(x)                                   # (B, N, D)
        h = tokens + self._pos(grid, tokens)
        c = self.condition(t, y, B)                                         # (B, D)

        checkpointed = self.grad_checkpointing and torch.is_grad_enabled()
        skips: list[torch.Tensor] = []
        for i, blk in enumerate(self.blocks):
            skip = skips.pop() if blk.skip_linear is not None else None     # out block i <- in block n - 1 - i
            if checkpointed:    # store only the block's inputs; recompute the rest (same RNG draws) in backward
                h = checkpoint(blk, h, c, skip, use_reentrant=False)
            else:
                h = blk(h, c, skip)                                         # (B, N, D)
            if i < self.num_skips:                                          # an in block
                skips.append(h)
        out = self.final_layer(h, c)                                        # (B, N, p * p * C_out)
        return self.unpatchify(out, grid)                                   # (B, C_out, H, W)


# ------------------------------------------------------------ the variants ---
# name: (width, depth, heads), DiT's Table 1; MLP ratio 4 throughout. Params at 256 px (32x32x4 latents, /2,
# 1000 classes, learned sigma), the paper's Table 4: S 33.0M, B 130.5M, L 458.1M, XL 675.1M.
VARIANTS: dict[str, tuple[int, int, int]] = {
    "Ti": (192, 12, 3),           # not in DiT: DeiT-Ti's shape (Touvron et al. 2021), a CPU-sized denoiser
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}


def parse_variant(variant: str) -> tuple[str, int | None]:
    """'XL/2' -> ('XL', 2); 'B' -> ('B', None)."""
    m = re.fullmatch(r"(Ti|S|B|L|XL)(?:/(\d+))?", variant)
    if not m:
        raise ValueError(f"unknown DiT variant {variant!r}; use one of {', '.join(VARIANTS)} with an optional "
                         "patch size, e.g. 'XL/2' or 'B/4'")
    return m.group(1), int(m.group(2)) if m.group(2) else None


def dit(variant: str = "S/2", embed_dim: int | None = None, depth: int | None = None,
        num_heads: int | None = None, mlp_ratio: float | None = None, patch_size: int | None = None,
        **kwargs) -> DiT:
    """Build a DiT from a row of the variant table, e.g. ``dit("XL/2", learn_sigma=True)``.

    Explicit ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio`` or ``patch_size`` override the row
    (``dit("S/2", depth=4, embed_dim=64, num_heads=2)`` for a small model); other keywords go to :class:`DiT`.
    """
    size, p = parse_variant(variant)
    width, d, heads = VARIANTS[size]
    return DiT(
        patch_size=patch_size or p or 2,
        embed_dim=embed_dim or width,
        depth=depth or d,
        num_heads=num_heads or heads,
        mlp_ratio=mlp_ratio or 4.0,
        **kwargs,
    )
