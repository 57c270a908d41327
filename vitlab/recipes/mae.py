"""MAE pretraining (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022).

The encoder (the backbone) sees only the visible patches; a small transformer decoder, owned by the recipe,
fills the masked positions with a learned mask token and predicts their pixels. The loss is the mean squared
error on the masked patches only, against per-patch normalised pixels (``norm_pix_loss``).

Split, as in MAE's own code, into named methods that are tested one by one::

    random_masking(B, N) -> mask (B, N)            # True = masked; exactly int(N * (1 - mask_ratio)) kept
    forward_encoder(images, mask) -> latent, ids_keep
    forward_decoder(latent, ids_keep, grid) -> pred (B, N, p*p*C)
    forward_loss(images, pred, mask) -> loss

The helpers shared with SimMIM (patchify, unpatchify, the encoder's final norm, the evaluation mask seed)
live here too.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from vitlab.layers import Block
from vitlab.layers.pos_embed import sincos_2d_pos_embed
from vitlab.recipes.base import LRScaling, Recipe

EVAL_SEED = 0          # evaluation masks come from a generator seeded with this at every call: val loss is comparable
NUM_VISUALIZED = 8     # images per reconstruction picture


# ----------------------------------------------------------------- helpers ---

def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C): patches in PatchEmbed's row-major grid order, pixels (p, p, C) as MAE."""
    B, C, H, W = images.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not divisible by the patch size {p}")
    h, w = H // p, W // p
    x = images.reshape(B, C, h, p, w, p)
    x = torch.einsum("bchpwq->bhwpqc", x)                                   # (B, h, w, p, p, C)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, patch_size: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, h*p, w*p): the inverse of :func:`patchify` on an (h, w) grid."""
    B, N, L = x.shape
    h, w = grid
    p = patch_size
    if N != h * w or L % (p * p):
        raise ValueError(f"cannot unpatchify (B, N, L) = {tuple(x.shape)} on a {h}x{w} grid of {p}x{p} patches")
    C = L // (p * p)
    x = x.reshape(B, h, w, p, p, C)
    x = torch.einsum("bhwpqc->bchpwq", x)                                   # (B, C, h, p, w, p)
    return x.reshape(B, C, h * p, w * p)


def check_mask_ratio(mask_ratio: float) -> float:
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio!r} (the share of patches hidden from "
                         "the encoder, e.g. 0.75 for MAE, 0.6 for SimMIM)")
    return float(mask_ratio)


def eval_generator(device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded with :data:`EVAL_SEED`: the same evaluation masks at every call."""
    return torch.Generator(device=device).manual_seed(EVAL_SEED)


class EncoderNorm(nn.Module):
    """The normalisation of the encoder's final tokens that a pretraining decoder reads.

    When the backbone normalises every token (its contract's ``token_norm()``, e.g. a ViT with
    ``global_pool="token"``) it is that norm (used, so trained; not registered here a second time: :meth:`forward`
    is given the backbone). When its final norm follows pooling (``pool_norm()``, timm's ``fc_norm`` with
    ``global_pool="avg"``), a reconstruction loss never reads it: this module then owns a LayerNorm of its own and
    freezes the pooled norm (DDP requires every trainable parameter to take part in the loss).
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(backbone.embed_dim, eps=1e-6) if backbone.token_norm() is None else None
        pooled = backbone.pool_norm()
        if self.norm is not None and pooled is not None:
            pooled.requires_grad_(False)

    @property
    def own(self) -> bool:
        """True when this module holds the norm (the backbone's final norm is fc_norm after pooling)."""
        return self.norm is not None

    def forward(self, tokens: torch.Tensor, backbone: nn.Module) -> torch.Tensor:
        return self.norm(tokens) if self.norm is not None else backbone.token_norm()(tokens)


def _init_decoder(m: nn.Module) -> None:
    """MAE's decoder init: xavier-uniform Linear weights, zero biases, LayerNorm weight 1 and bias 0."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ----------------------------------------------------------------- decoder ---

class MAEDecoder(nn.Module):
    """Linear D -> Dd, mask tokens at the masked positions, fixed sin-cos positions, blocks, norm, Linear -> pixels."""

    def __init__(self, embed_dim: int, out_dim: int, grid: tuple[int, int], num_cls: int, num_registers: int,
                 dim: int = 512, depth: int = 8, num_heads: int = 16, mlp_ratio: float = 4.0):
        super().__init__()
        self.num_cls, self.num_registers = num_cls, num_registers
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Fixed, so not saved: a slot for the class token (zeros, as MAE); registers get no position.
        self.register_buffer("pos_embed", sincos_2d_pos_embed(dim, grid, cls_token=bool(num_cls)), persistent=False)
        self.grid = tuple(grid)
        self.blocks = nn.ModuleList([Block(dim, num_heads, int(dim * mlp_ratio), qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)
        self.apply(_init_decoder)
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def positions(self, grid: tuple[int, int], x: torch.Tensor) -> torch.Tensor:
        """(1, P + N, Dd): the cls slot, zeros for the registers, then the grid's sin-cos table."""
        pos = self.pos_embed if tuple(grid) == self.grid else \
            sincos_2d_pos_embed(self.pos_embed.shape[-1], grid, cls_token=bool(self.num_cls)).to(x.device)
        pos = pos.to(x.dtype)
        if self.num_registers:
            regs = pos.new_zeros(1, self.num_registers, pos.shape[-1])
            pos = torch.cat([pos[:, :self.num_cls], regs, pos[:, self.num_cls:]], dim=1)
        return pos

    def forward(self, latent: torch.Tensor, ids_keep: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        P = self.num_cls + self.num_registers
        N = grid[0] * grid[1]
        x = self.embed(latent)                                              # (B, P + N', Dd)
        B, _, Dd = x.shape
        prefix, visible = x[:, :P], x[:, P:]
        # The visible tokens go back to their grid positions; every other position holds the mask token.
        full = self.mask_token.to(x.dtype).expand(B, N, Dd)
        full = full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, Dd), visible)     # (B, N, Dd)
        x = torch.cat([prefix, full], dim=1) + self.positions(grid, x)      # (B, P + N, Dd)
        for blk in self.blocks:
            x = blk(x, None, P)
        x = self.pred(self.norm(x))                                         # (B, P + N, p*p*C)
        return x[:, P:]                                                     # (B, N, p*p*C)


# ------------------------------------------------------------------ recipe ---

class MaskedImageModeling(Recipe):
    """What MAE and SimMIM share: a random mask per training step, a fixed one (seeded) for evaluation, so the
    validation loss is comparable across epochs. Subclasses implement ``_loss(images, generator)``."""

    pretraining = True

    def _loss(self, images: torch.Tensor, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (loss, prediction, mask)."""
        raise NotImplementedError

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": self._loss(batch["image"])[0]}

    def evaluation_step(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]
        return {"loss": self._loss(images, eval_generator(images.device))[0]}


class MAE(MaskedImageModeling):
    """Masked autoencoder pretraining. The task is frozen (its head is fine-tuned later, on the pretrained backbone).

    Defaults are the paper's (ViT-B/L/H on ImageNet: 75% masking, a 512-wide, 8-block decoder, normalised pixel
    targets, lr = 1.5e-4 x batch / 256).
    """

    pretraining = True

    def __init__(self, backbone: nn.Module, task: nn.Module, mask_ratio: float = 0.75,
                 decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                 decoder_mlp_ratio: float = 4.0, norm_pix_loss: bool = True, lr_scaling: LRScaling = "linear",
                 lr_base_batch: int = 256, monitor: str | None = None,
                 monitor_mode: Literal["max", "min"] = "min"):
        super().__init__(backbone, task, lr_scaling, lr_base_batch, monitor, monitor_mode)
        if backbone.mask_mode != "drop":
            raise ValueError("MAE drops the masked patches, but this backbone " + (
                "was built with use_mask_token=True (it would replace them); build it without (SimMIM is the recipe "
                "that uses it)" if backbone.mask_mode == "replace" else
                f"({type(backbone).__name__}) takes no token mask: use a ViT backbone (backbone=vit_tiny, ...)"))
        self.mask_ratio = check_mask_ratio(mask_ratio)
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = int(backbone.patch_size)
        self.freeze(task)
        self.encoder_norm = EncoderNorm(backbone)
        num_cls = int(backbone.has_class_token)
        num_registers = int(backbone.num_prefix_tokens) - num_cls   # registers (and a DeiT dist token): no position
        self.decoder = MAEDecoder(backbone.embed_dim, self.patch_size ** 2 * int(backbone.in_chans),
                                  tuple(backbone.grid), num_cls, num_registers, decoder_embed_dim,
                                  decoder_depth, decoder_num_heads, decoder_mlp_ratio)

    def fsdp_units(self) -> list[nn.Module]:
        return super().fsdp_units() + list(self.decoder.blocks)

    # ------------------------------------------------------------ pieces ---
    def grid_of(self, images: torch.Tensor) -> tuple[int, int]:
        return images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        return patchify(images, self.patch_size)                            # (B, N, p*p*C)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return unpatchify(x, self.patch_size, grid)                         # (B, C, H, W)

    def random_masking(self, B: int, N: int, device: torch.device | str | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, N) bool, True = masked: per-sample uniform noise, the len_keep lowest-noise patches stay visible."""
        len_keep = int(N * (1 - self.mask_ratio))
        if len_keep < 1:
            raise ValueError(f"mask_ratio={self.mask_ratio} keeps no patch of {N}; lower the mask ratio or use "
                             "a smaller patch size (more patches)")
        noise = torch.rand(B, N, device=device, generator=generator)       # (B, N)
        ids_keep = torch.argsort(noise, dim=1)[:, :len_keep]                # (B, len_keep)
        mask = torch.ones(B, N, dtype=torch.bool, device=noise.device)
        return mask.scatter(1, ids_keep, False)

    def forward_encoder(self, images: torch.Tensor, mask: torch.Tensor, num_keep: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone on the visible patches only -> (latent (B, P + N', D) normed, ids_keep (B, N')).
        ``num_keep``: the visible count of every sample when known (random_masking's): no host sync."""
        f = self.backbone(images, mask, num_keep=num_keep)
        if "token_valid" in f:
            raise ValueError("MAE needs the same number of visible patches in every sample; make the mask with "
                             "random_masking")
        return self.encoder_norm(f["prenorm"], self.backbone), f["ids_keep"]

    def forward_decoder(self, latent: torch.Tensor, ids_keep: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, P + N', D) visible tokens -> (B, N, p*p*C) predicted pixels of every patch of the (h, w) grid."""
        return self.decoder(latent, ids_keep, grid)

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) float32 regression target: the patches, normalised per patch with norm_pix_loss."""
        t = self.patchify(images.float())
        if self.norm_pix_loss:
            mean, var = t.mean(dim=-1, keepdim=True), t.var(dim=-1, keepdim=True)
            t = (t - mean) / (var + 1e-6).sqrt()
        return t

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the masked patches only (float32)."""
        loss = (pred.float() - self.target(images)).pow(2).mean(dim=-1)    # (B, N)
        m = mask.float()
        return (loss * m).sum() / m.sum().clamp_min(1.0)

    def _loss(self, images: torch.Tensor, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grid = self.grid_of(images)
        N = grid[0] * grid[1]
        mask = self.random_masking(images.shape[0], N, images.device, generator)
        # random_masking keeps exactly int(N * (1 - mask_ratio)) per sample: the backbone need not count them
        latent, ids_keep = self.forward_encoder(images, mask, num_keep=int(N * (1 - self.mask_ratio)))
        pred = self.forward_decoder(latent, ids_keep, grid)
        return self.forward_loss(images, pred, mask), pred, mask

    @torch.no_grad()
    def visualize(self, batch: dict) -> dict[str, list[torch.Tensor]]:
        """Rows: original, masked input (masked patches = 0, the mean colour), reconstruction, reconstruction
        with the visible patches pasted back. With norm_pix_loss the prediction is un-normalised with each
        original patch's mean and variance, as MAE's visualisation does."""
        images = batch["image"][:NUM_VISUALIZED].float()
        grid = self.grid_of(images)
        _, pred, mask = self._loss(images, eval_generator(images.device))
        patches = self.patchify(images)                                     # (n, N, p*p*C)
        pred = pred.float()
        if self.norm_pix_loss:
            mean, var = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mean
        m = mask.unsqueeze(-1)                                              # (n, N, 1)
        masked = self.unpatchify(patches.masked_fill(m, 0.0), grid)
        recon = self.unpatchify(pred, grid)
        pasted = self.unpatchify(torch.where(m, pred, patches), grid)
        return {"reconstruction": [images, masked, recon, pasted]}
