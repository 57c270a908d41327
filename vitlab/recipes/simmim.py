"""SimMIM pretraining (Xie et al., "SimMIM: a Simple Framework for Masked Image Modeling", CVPR 2022).

Square blocks of ``mask_patch_size`` pixels are masked at random; the encoder (the backbone, built with
``use_mask_token=True``) sees every position, the masked patches replaced by its learned mask token. A single
linear layer predicts each patch's pixels (SimMIM's 1x1 convolution + PixelShuffle is the same map), and the
loss is the L1 distance to the input on the masked pixels only.

    random_masking(B, grid) -> mask (B, N)          # True = masked, whole mask_patch_size blocks
    forward_encoder(images, mask) -> patch tokens (B, N, D), normed
    forward_decoder(tokens, grid) -> reconstruction (B, C, H, W)
    forward_loss(images, reconstruction, mask) -> loss
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.recipes.base import LRScaling
from vitlab.recipes.mae import (
    NUM_VISUALIZED,
    EncoderNorm,
    MaskedImageModeling,
    check_mask_ratio,
    eval_generator,
    unpatchify,
)


class SimMIM(MaskedImageModeling):
    """Masked image modelling with a mask token in the encoder and a linear pixel decoder; the task is frozen.

    ``mask_patch_size``: the side of the masked square blocks in pixels, a multiple of the model's patch size
    (SimMIM: 32 for ViT-B/16 at 224 px). None: 2 x the patch size when the patch grid divides by 2, else the
    patch size. Per sample exactly ceil(n_blocks x mask_ratio) blocks are masked, as SimMIM's MaskGenerator.
    """

    pretraining = True

    def __init__(self, backbone: nn.Module, task: nn.Module, mask_ratio: float = 0.6,
                 mask_patch_size: int | None = None, lr_scaling: LRScaling = "linear",
                 lr_base_batch: int = 512, monitor: str | None = None,
                 monitor_mode: Literal["max", "min"] = "min"):
        super().__init__(backbone, task, lr_scaling, lr_base_batch, monitor, monitor_mode)
        if backbone.mask_mode != "replace":
            raise ValueError("SimMIM replaces masked patches by the encoder's mask token, but this backbone has "
                             "none; build it with use_mask_token=True (SimMIM.backbone_options() gives it)")
        self.patch_size = int(backbone.patch_size)
        if mask_patch_size is not None and (mask_patch_size < self.patch_size or mask_patch_size % self.patch_size):
            raise ValueError(f"mask_patch_size={mask_patch_size} must be a multiple of the patch size "
                             f"{self.patch_size}; use e.g. {2 * self.patch_size}, or null for the default")
        self.mask_ratio = check_mask_ratio(mask_ratio)
        self.mask_patch_size = mask_patch_size
        self.in_chans = int(backbone.in_chans)
        self.freeze(task)
        self.encoder_norm = EncoderNorm(backbone)
        self.decoder = nn.Linear(backbone.embed_dim, self.patch_size ** 2 * self.in_chans)   # D -> p*p*C

    @classmethod
    def backbone_options(cls, options: dict) -> dict:
        return {"use_mask_token": True}

    # ------------------------------------------------------------ pieces ---
    def grid_of(self, images: torch.Tensor) -> tuple[int, int]:
        return images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size

    def mask_scale(self, grid: tuple[int, int]) -> int:
        """Patches per side of one masked block on this (h, w) patch grid."""
        h, w = grid
        if self.mask_patch_size is None:
            return 2 if h % 2 == 0 and w % 2 == 0 else 1
        s = self.mask_patch_size // self.patch_size
        if h % s or w % s:
            raise ValueError(f"mask_patch_size={self.mask_patch_size} does not tile the {h * self.patch_size}x"
                             f"{w * self.patch_size} image; pick a size that divides it, or null for the default")
        return s

    def random_masking(self, B: int, grid_hw: tuple[int, int], device: torch.device | str | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, h*w) bool, True = masked: random whole blocks of mask_scale x mask_scale patches, in grid order."""
        h, w = grid_hw
        s = self.mask_scale(grid_hw)
        hb, wb = h // s, w // s
        n_blocks = hb * wb
        n_mask = math.ceil(n_blocks * self.mask_ratio - 1e-9)   # SimMIM's ceil; epsilon: 0.7 * 10 = 7.0000001
        noise = torch.rand(B, n_blocks, device=device, generator=generator)
        ids_mask = torch.argsort(noise, dim=1)[:, :n_mask]                   # (B, n_mask)
        blocks = torch.zeros(B, n_blocks, dtype=torch.bool, device=noise.device).scatter(1, ids_mask, True)
        blocks = blocks.reshape(B, hb, wb).repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)   # (B, h, w)
        return blocks.reshape(B, h * w)

    def forward_encoder(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, N, D) normed patch tokens; the masked patches entered the encoder as its mask token."""
        patch = self.backbone(images, mask)["patch"]                        # normed when global_pool='token'
        return self.encoder_norm.norm(patch) if self.encoder_norm.own else patch

    def forward_decoder(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, N, D) -> (B, C, H, W) reconstructed image."""
        return unpatchify(self.decoder(tokens), self.patch_size, grid)

    def pixel_mask(self, mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, N) patch mask -> (B, 1, H, W) float pixel mask."""
        p = self.patch_size
        m = mask.reshape(mask.shape[0], *grid).repeat_interleave(p, dim=1).repeat_interleave(p, dim=2)
        return m.unsqueeze(1).float()

    def forward_loss(self, images: torch.Tensor, reconstruction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """SimMIM's loss: L1 on the masked pixels, / (masked pixels x channels) (float32)."""
        m = self.pixel_mask(mask, self.grid_of(images))                     # (B, 1, H, W)
        l1 = F.l1_loss(reconstruction.float(), images.float(), reduction="none")
        return (l1 * m).sum() / (m.sum() + 1e-5) / self.in_chans

    def _loss(self, images: torch.Tensor, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grid = self.grid_of(images)
        mask = self.random_masking(images.shape[0], grid, images.device, generator)
        rec = self.forward_decoder(self.forward_encoder(images, mask), grid)
        return self.forward_loss(images, rec, mask), rec, mask

    @torch.no_grad()
    def visualize(self, batch: dict) -> dict[str, list[torch.Tensor]]:
        """Rows: original, masked input (masked pixels = 0, the mean colour), reconstruction, reconstruction
        with the visible pixels pasted back."""
        images = batch["image"][:NUM_VISUALIZED].float()
        _, rec, mask = self._loss(images, eval_generator(images.device))
        m = self.pixel_mask(mask, self.grid_of(images)).bool()              # (n, 1, H, W)
        rec = rec.float()
        return {"reconstruction": [images, images.masked_fill(m, 0.0), rec, torch.where(m, rec, images)]}
