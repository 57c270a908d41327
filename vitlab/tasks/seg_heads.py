"""Semantic-segmentation decoders on ViT features: linear, UPerNet (+ its auxiliary FCN head) and SegViT's ATM.

- :class:`LinearSegHead`: the linear baseline of Segmenter (Strudel et al., "Segmenter: Transformer for Semantic
  Segmentation", ICCV 2021) and SETR-naive (Zheng et al., "Rethinking Semantic Segmentation from a
  Sequence-to-Sequence Perspective with Transformers", CVPR 2021): a norm and a 1x1 convolution on the patch grid.
- :class:`UPerHead`: UPerNet (Xiao et al., "Unified Perceptual Parsing for Scene Understanding", ECCV 2018) as
  mmsegmentation builds it and BEiT (Bao et al., ICLR 2022) uses it on a ViT: a pyramid pooling module (PSPNet,
  Zhao et al. 2017) on the coarsest level, an FPN top-down path, all levels fused by a 3x3 convolution.
  :class:`FCNHead` is the auxiliary head trained on the third level (mmseg's ``auxiliary_head``).
- :class:`ATMHead`: SegViT's Attention-to-Mask decoder (Zhang et al., "SegViT: Semantic Segmentation with Plain
  Vision Transformers", NeurIPS 2022). One learned query per class cross-attends to the projected tap features;
  the (pre-softmax) query-key similarity of that attention, through a sigmoid, IS the class's mask. Each query
  also predicts "is my class in the image" over num_classes + 1 (the last = no object). Inference:
  ``einsum(softmax(cls)[..., :-1], sigmoid(mask))``. :meth:`ATMHead.loss` is SegViT's ATMLoss (MaskFormer's
  criterion with the fixed query-to-class matching): CE over the class logits + focal (or BCE) + dice on the masks
  of the classes present, after every stage (deep supervision).

Every head maps features at the feature resolution; the task (vitlab/tasks/segmentation.py) upsamples to pixels.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ------------------------------------------------------------------ helpers ---

def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    """mmcv's ConvModule with BN and ReLU: conv (no bias: the BN has one) -> BN -> ReLU, 'same' padding."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def classifier(channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    """mmseg's ``cls_seg``: Dropout2d -> 1x1 conv, weights N(0, 0.01) as mmseg initialises ``conv_seg``."""
    conv = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(nn.Dropout2d(dropout), conv)


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


# ------------------------------------------------------------------- linear ---

class LinearSegHead(nn.Module):
    """forward(x (B, in_dim, h, w)) -> logits (B, num_classes, h, w): BatchNorm -> dropout -> 1x1 conv.

    The norm re-centres the ViT's tokens per channel (as mmseg's BEiT linear probe); the rest is one linear
    classifier per patch (Segmenter's "Linear" decoder)."""

    def __init__(self, in_dim: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_dim)
        self.cls = classifier(in_dim, num_classes, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.cls(self.norm(x))                                      # (B, C, h, w)


# ------------------------------------------------------------------ UPerNet ---

class PPM(nn.Module):
    """PSPNet's pyramid pooling: average-pool x to s x s for each scale, 1x1 conv, upsample back, concatenate with x.

    forward(x (B, cin, h, w)) -> (B, cin + len(scales) * channels, h, w)."""

    def __init__(self, cin: int, channels: int, pool_scales: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(int(s)), conv_bn_relu(cin, channels, 1))
                                    for s in pool_scales)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x] + [_resize(stage(x), x.shape[-2:]) for stage in self.stages], dim=1)


class UPerHead(nn.Module):
    """UPerNet decoder (mmseg's ``UPerHead``) over a pyramid, finest level first.

    forward([(B, in_channels[i], h_i, w_i)]) -> logits (B, num_classes, h_0, w_0) at the finest level:
      laterals: 1x1 conv per level, except the coarsest, which goes through the PPM + a 3x3 conv;
      top-down: lateral[i-1] += upsample(lateral[i]);  outputs: 3x3 conv per level (the coarsest as it is);
      fuse: upsample all to the finest, concatenate, 3x3 conv -> channels;  classify: dropout + 1x1 conv.
    """

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        self.ppm = PPM(in_channels[-1], channels, pool_scales)
        self.bottleneck = conv_bn_relu(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.cls = classifier(channels, num_classes, dropout)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]                  # [(B, ch, h_i, w_i)]
        laterals.append(self.bottleneck(self.ppm(feats[-1])))                               # coarsest: PPM
        for i in range(len(laterals) - 1, 0, -1):                                           # top-down
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], dim=1)        # (B, L * ch, h0, w0)
        fused = self.fpn_bottleneck(fused)                                                  # (B, ch, h0, w0)
        return self.cls(fused)                                                               # (B, C, h0, w0)


class FCNHead(nn.Module):
    """mmseg's auxiliary ``FCNHead`` (one 3x3 conv, no input concat): (B, cin, h, w) -> (B, num_classes, h, w)."""

    def __init__(self, cin: int, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.conv = conv_bn_relu(cin, channels, 3)
        self.cls = classifier(channels, num_classes, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.cls(self.conv(x))


# ------------------------------------------------------------------- SegViT ---

class ATMCrossAttention(nn.Module):
    """Multi-head cross-attention that also returns its similarity map, SegViT's "attention to mask".

    forward(q (B, Q, D), mem (B, N, D)) -> (out (B, Q, D), sim (B, Q, N)): sim = q.k / sqrt(d) before the softmax,
    averaged over heads; it is the mask logit of each query (class) at each token."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.1):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"segvit decoder width {dim} is not divisible by num_heads={num_heads}: change "
                             "task.channels or task.segvit.num_heads")
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q: Tensor, mem: Tensor) -> tuple[Tensor, Tensor]:
        B, Q, D = q.shape
        N, H = mem.shape[1], self.num_heads
        q = self.q(q).view(B, Q, H, D // H).transpose(1, 2)                 # (B, H, Q, d)
        k = self.k(mem).view(B, N, H, D // H).transpose(1, 2)               # (B, H, N, d)
        v = self.v(mem).view(B, N, H, D // H).transpose(1, 2)               # (B, H, N, d)
        sim = (q @ k.transpose(-2, -1)) * self.scale                        # (B, H, Q, N)
        out = (self.attn_drop(sim.softmax(-1)) @ v).transpose(1, 2).reshape(B, Q, D)
        return self.proj(out), sim.mean(1)                                  # (B, Q, D), (B, Q, N)


class ATMDecoderLayer(nn.Module):
    """Post-norm transformer decoder layer (as torch's TransformerDecoderLayer, which SegViT subclasses):
    query self-attention -> ATM cross-attention -> MLP, each with residual + LayerNorm."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn = ATMCrossAttention(dim, num_heads, attn_drop=dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(4 * dim, dim))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2, self.drop3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, q: Tensor, mem: Tensor) -> tuple[Tensor, Tensor]:
        q = self.norm1(q + self.drop1(self.self_attn(q, q, q, need_weights=False)[0]))   # (B, Q, D)
        out, sim = self.cross_attn(q, mem)
        q = self.norm2(q + self.drop2(out))
        q = self.norm3(q + self.drop3(self.mlp(q)))
        return q, sim                                                       # (B, Q, D), (B, Q, N)


def dice_loss(logits: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """MaskFormer's dice loss per mask over its valid pixels: (M, P) logits / {0,1} targets / valid -> (M,)."""
    p = logits.sigmoid() * valid
    t = target * valid
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


def sigmoid_focal_loss(logits: Tensor, target: Tensor, valid: Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> Tensor:
    """RetinaNet's focal loss (Lin et al. 2017) averaged over each mask's valid pixels: (M, P) -> (M,)."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma * (alpha * target + (1 - alpha) * (1 - target))
    return (loss * valid).sum(-1) / valid.sum(-1).clamp_min(1)


def sigmoid_bce_loss(logits: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Binary cross-entropy averaged over each mask's valid pixels: (M, P) -> (M,)."""
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (ce * valid).sum(-1) / valid.sum(-1).clamp_min(1)


class ATMHead(nn.Module):
    """SegViT's ATM decoder (the paper's Fig. 2, its ``ATMHead``): one decoder of ``num_layers`` layers per tap.

    The taps are read deepest first; each stage projects its tap (Linear + LayerNorm to ``dim``), runs the class
    queries through its decoder (the queries carry over from stage to stage) and takes the last layer's similarity
    map as mask logits. A stage's masks are the running sum of its own and the earlier stages' maps (upsampled to
    the finest tap's grid), its class logits come from its queries: every stage is supervised (deep supervision).

    forward([(B, in_channels[i], h_i, w_i)]) -> {"class_logits": [(B, C, C + 1)] per stage,
                                                 "mask_logits": [(B, C, h, w)] per stage}   (the last = the output)
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, dim: int = 256, num_heads: int = 8,
                 num_layers: int = 3, dropout: float = 0.1):
        super().__init__()
        self.num_classes = num_classes
        in_channels = [int(c) for c in in_channels][::-1]                   # deepest first
        self.proj = nn.ModuleList(nn.Linear(c, dim) for c in in_channels)
        self.proj_norm = nn.ModuleList(nn.LayerNorm(dim) for _ in in_channels)
        self.decoders = nn.ModuleList(
            nn.ModuleList(ATMDecoderLayer(dim, num_heads, dropout) for _ in range(num_layers)) for _ in in_channels)
        self.query = nn.Embedding(num_classes, dim)                         # one query per class
        self.class_embed = nn.Linear(dim, num_classes + 1)                  # + "no object"
        for m in self.modules():                                            # SegViT's init_weights
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        feats = list(feats)[::-1]                                           # deepest first
        if len(feats) != len(self.proj):
            raise ValueError(f"the SegViT head was built for {len(self.proj)} taps but got {len(feats)}: build the "
                             f"backbone with out_indices={len(self.proj)} (task.taps)")
        B = feats[0].shape[0]
        q = self.query.weight.unsqueeze(0).expand(B, -1, -1)                # (B, C, D)
        classes, sims = [], []
        for x, proj, norm, layers in zip(feats, self.proj, self.proj_norm, self.decoders):
            h, w = x.shape[-2:]
            mem = norm(proj(x.flatten(2).transpose(1, 2)))                  # (B, h*w, D)
            for layer in layers:
                q, sim = layer(q, mem)                                      # sim (B, C, h*w)
            classes.append(self.class_embed(q))                             # (B, C, C + 1)
            sims.append(sim.view(B, -1, h, w))                              # (B, C, h, w)
        size = sims[-1].shape[-2:]
        masks, acc = [], 0
        for sim in sims:
            acc = acc + (sim if sim.shape[-2:] == size else _resize(sim, size))
            masks.append(acc)                                               # (B, C, h, w)
        return {"class_logits": classes, "mask_logits": masks}

    @staticmethod
    def scores(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
        """Per-class scores (B, C, H, W) = sum_q P(class c | query q) * sigmoid(mask_q), no-object dropped."""
        probs = class_logits.float().softmax(-1)[..., :-1]                  # (B, Q, C)
        return torch.einsum("bqc,bqhw->bchw", probs, mask_logits.float().sigmoid())

    def loss(self, out: dict[str, list[Tensor]], labels: Tensor, ignore_index: int = 255,
             mask_loss: Literal["focal", "bce"] = "focal", cls_weight: float = 1.0, mask_weight: float = 20.0,
             dice_weight: float = 1.0, eos_coef: float = 0.1) -> dict[str, Tensor]:
        """SegViT's ATMLoss over every stage. labels (B, H, W) int64 with ``ignore_index`` where unlabelled.

        Query c is matched to class c (no Hungarian matching). Class loss: CE over C + 1 with target c where class
        c is in the image, no-object elsewhere (its weight ``eos_coef``, as DETR). Mask losses: focal (SegViT's
        choice, weight 20) or BCE, plus dice, on the masks of the present classes only, upsampled to the labels'
        size, over the labelled pixels only (SegViT counts ignored pixels as background; we leave them out), each
        summed over masks and divided by their number. Returns the weighted parts summed over stages and "loss".

        Finding the present (image, class) pairs reads their count back from the device once per step (as
        SegViT's ``unique``); the masks of absent classes are never upsampled, which keeps 150-class data cheap.
        """
        if mask_loss not in ("focal", "bce"):
            raise ValueError(f"unknown segvit mask_loss {mask_loss!r}: use 'focal' (SegViT) or 'bce'")
        C = self.num_classes
        B, H, W = labels.shape
        valid_px = labels != ignore_index                                   # (B, H, W)
        safe = torch.where(valid_px, labels, C)                             # ignore -> C (one-hot column dropped)
        counts = torch.zeros(B, C + 1, device=labels.device).scatter_add_(
            1, safe.flatten(1), torch.ones(B, H * W, device=labels.device))  # (B, C + 1) pixels per class
        present = counts[:, :C] > 0                                         # (B, C)
        cls_target = torch.where(present, torch.arange(C, device=labels.device).expand(B, C), C)   # (B, C)
        weight = torch.ones(C + 1, device=labels.device)
        weight[-1] = eos_coef
        b_idx, c_idx = present.nonzero(as_tuple=True)                       # (M,) present pairs: one host sync
        num_masks = max(int(b_idx.numel()), 1)
        tgt = (labels[b_idx] == c_idx.view(-1, 1, 1)).flatten(1).float()   # (M, H*W)
        valid = valid_px[b_idx].flatten(1).float()                          # (M, H*W)
        mask_fn = sigmoid_focal_loss if mask_loss == "focal" else sigmoid_bce_loss
        parts = {"loss_cls": labels.new_zeros((), dtype=torch.float32), "loss_mask": 0.0, "loss_dice": 0.0}
        for cls_logits, mask_logits in zip(out["class_logits"], out["mask_logits"]):
            parts["loss_cls"] = parts["loss_cls"] + cls_weight * F.cross_entropy(
                cls_logits.float().transpose(1, 2), cls_target, weight)      # (B, C+1, Q) vs (B, Q)
            m = _resize(mask_logits[b_idx, c_idx].unsqueeze(1).float(), (H, W)).flatten(1)   # (M, H*W)
            parts["loss_mask"] = parts["loss_mask"] + mask_weight * mask_fn(m, tgt, valid).sum() / num_masks
            parts["loss_dice"] = parts["loss_dice"] + dice_weight * dice_loss(m, tgt, valid).sum() / num_masks
        parts["loss"] = parts["loss_cls"] + parts["loss_mask"] + parts["loss_dice"]
        return parts


__all__ = ["LinearSegHead", "PPM", "UPerHead", "FCNHead", "ATMCrossAttention", "ATMDecoderLayer", "ATMHead",
           "dice_loss", "sigmoid_focal_loss", "sigmoid_bce_loss", "conv_bn_relu", "classifier"]
