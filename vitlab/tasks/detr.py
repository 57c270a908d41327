"""DETR: a set-prediction detection head trained with Hungarian matching.

Carion et al., "End-to-End Object Detection with Transformers", ECCV 2020 (https://arxiv.org/abs/2005.12872).
A fixed set of learned queries attends to the feature map through a transformer decoder; each query predicts a
class (or "no object") and a box. Training matches queries one-to-one to the ground-truth boxes (Hungarian
algorithm, ``scipy.optimize.linear_sum_assignment``) and applies a classification loss to every query and box
losses (L1 + GIoU) to the matched ones, after every decoder layer (auxiliary losses). No anchors and no NMS.

With a plain ViT backbone the head reads one feature map (stride = patch size) of width ``in_channels``; the
optional transformer encoder is off by default (``enc_layers=0``): the ViT already attends globally.

Layout, top to bottom: box helpers -> :class:`PositionEmbeddingSine` -> encoder / decoder layers ->
:class:`HungarianMatcher` -> :class:`SetCriterion` -> :class:`DETRHead`. The task glue (batches, metrics) lives in
``vitlab/tasks/detection.py`` (``DetectionTask(detector="detr")``).

Boxes: the model predicts (cx, cy, w, h) normalised by the canvas (the padded S x S image) in [0, 1]; targets
and postprocessed outputs are XYXY pixels on that canvas.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou, generalized_box_iou_loss


# ------------------------------------------------------------------ helpers ---

def boxes_to_normalised(boxes: Tensor, image_size: Sequence[int]) -> Tensor:
    """XYXY pixels (n, 4) on a canvas (H, W) -> cxcywh normalised by the canvas (n, 4)."""
    h, w = int(image_size[0]), int(image_size[1])
    scale = boxes.new_tensor([w, h, w, h])
    return box_convert(boxes.float(), "xyxy", "cxcywh") / scale


def boxes_to_pixels(boxes: Tensor, image_size: Sequence[int]) -> Tensor:
    """cxcywh normalised (..., 4) -> XYXY pixels on a canvas (H, W), clipped to it."""
    h, w = int(image_size[0]), int(image_size[1])
    xyxy = box_convert(boxes.float(), "cxcywh", "xyxy") * boxes.new_tensor([w, h, w, h]).float()
    return torch.stack([xyxy[..., 0].clamp(0, w), xyxy[..., 1].clamp(0, h),
                        xyxy[..., 2].clamp(0, w), xyxy[..., 3].clamp(0, h)], dim=-1)


def padding_mask(image_size: Tensor, canvas: Sequence[int], feature_hw: Sequence[int]) -> Tensor:
    """Valid sizes (B, 2) (h, w) of images padded bottom/right onto a canvas (H, W) -> (B, fh, fw) True = padding.

    A feature cell is padding when its top-left pixel lies outside the valid image (cells straddling the border
    hold image content and stay valid).
    """
    fh, fw = int(feature_hw[0]), int(feature_hw[1])
    sy, sx = canvas[0] / fh, canvas[1] / fw                                     # pixels per feature cell
    ys = torch.arange(fh, device=image_size.device, dtype=torch.float32) * sy   # (fh,) top edge of each row
    xs = torch.arange(fw, device=image_size.device, dtype=torch.float32) * sx   # (fw,)
    valid_y = ys[None, :] < image_size[:, 0:1].float()                          # (B, fh)
    valid_x = xs[None, :] < image_size[:, 1:2].float()                          # (B, fw)
    return ~(valid_y[:, :, None] & valid_x[:, None, :])                         # (B, fh, fw)


class PositionEmbeddingSine(nn.Module):
    """DETR's 2-D sine positional encoding (normalised): half the channels encode y, half x.

    Coordinates are cumulative counts of non-padded cells, normalised to (0, 2*pi] per image, so padding does not
    shift the encoding of the valid region.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats, self.temperature, self.scale = num_pos_feats, temperature, scale

    def forward(self, mask: Tensor) -> Tensor:
        """mask (B, h, w) True = padding -> (B, 2 * num_pos_feats, h, w)."""
        not_mask = (~mask).float()
        y_embed = not_mask.cumsum(1)                                            # (B, h, w)
        x_embed = not_mask.cumsum(2)
        eps = 1e-6
        y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[..., None] / dim_t                                      # (B, h, w, F)
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)             # (B, 2F, h, w)


# ------------------------------------------------------------------- layers ---
# nn.TransformerDecoderLayer cannot add positional encodings to queries and keys at every layer (DETR's scheme:
# positions go into q/k of every attention, never into the values), so the two layers are written out here.

class EncoderLayer(nn.Module):
    """DETR's post-norm encoder layer: self-attention (pos added to q, k) -> FFN."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        q = k = src + pos                                                       # (B, N, D)
        src = self.norm1(src + self.drop1(self.self_attn(q, k, src, key_padding_mask=key_padding_mask,
                                                         need_weights=False)[0]))
        return self.norm2(src + self.drop2(self.ffn(src)))


class DecoderLayer(nn.Module):
    """DETR's post-norm decoder layer: self-attention among queries -> cross-attention to memory -> FFN."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2, self.drop3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor,
                memory_mask: Optional[Tensor]) -> Tensor:
        q = k = tgt + query_pos                                                 # (B, Q, D)
        tgt = self.norm1(tgt + self.drop1(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attn = self.cross_attn(tgt + query_pos, memory + pos, memory, key_padding_mask=memory_mask,
                               need_weights=False)[0]                           # (B, Q, D)
        tgt = self.norm2(tgt + self.drop2(attn))
        return self.norm3(tgt + self.drop3(self.ffn(tgt)))


class MLP(nn.Module):
    """A few Linear layers with ReLU between them (DETR's box head)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


# ------------------------------------------------------------------ matcher ---

class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising DETR's matching cost.

    cost = cost_class * (-p(target class)) + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU(xyxy)). Targets hold
    normalised cxcywh ``boxes`` and 0-based ``labels``. Returns, per image, (query indices, target indices) int64,
    sorted by query index, of length min(Q, n_targets).
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0, so every matching is equal: "
                             "set at least one of cost_class, cost_bbox, cost_giou > 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        B, Q = outputs["pred_logits"].shape[:2]
        prob = outputs["pred_logits"].flatten(0, 1).float().softmax(-1)         # (B*Q, K+1)
        out_bbox = outputs["pred_boxes"].flatten(0, 1).float()                  # (B*Q, 4)
        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty.clone()) for _ in range(B)]
        tgt_ids = torch.cat([t["labels"] for t in targets]).to(prob.device)     # (T,)
        tgt_bbox = torch.cat([t["boxes"] for t in targets]).to(out_bbox).float()  # (T, 4)

        # One cost matrix for the whole batch (cheap on the device), split per image for the CPU assignment.
        cost_class = -prob[:, tgt_ids]                                          # (B*Q, T)
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)                        # (B*Q, T)
        cost_giou = -generalized_box_iou(box_convert(out_bbox, "cxcywh", "xyxy"),
                                         box_convert(tgt_bbox, "cxcywh", "xyxy"))
        C = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        C = C.view(B, Q, -1).cpu()                                              # (B, Q, T)
        if not torch.isfinite(C).all():
            raise FloatingPointError("HungarianMatcher: the matching cost has NaN/inf (the model diverged or a target "
                                     "box is degenerate): lower the learning rate, clip gradients "
                                     "(trainer.gradient_clip_val=0.1 as DETR) or drop zero-area boxes")
        indices = []
        for i, c in enumerate(C.split(sizes, -1)):
            if sizes[i] == 0:
                indices.append((empty, empty.clone()))
                continue
            rows, cols = linear_sum_assignment(c[i].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


# ---------------------------------------------------------------- criterion ---

class SetCriterion(nn.Module):
    """DETR's losses after Hungarian matching, for the final output and every auxiliary (earlier layer) output.

    ``forward`` returns the *unweighted* parts (as DETR logs them): ``loss_ce`` (cross-entropy over all queries,
    unmatched ones against the no-object class whose weight is ``eos_coef``; averaged by the sum of the class
    weights as ``F.cross_entropy`` does), ``loss_bbox`` (L1 on normalised cxcywh) and ``loss_giou`` (1 - GIoU),
    both summed over matched boxes and divided by the number of target boxes in the batch (all-reduced over
    processes under torch.distributed, clamped >= 1). Auxiliary outputs get the suffixes ``_0``, ``_1``, ...
    ``weighted(losses)`` sums them with ``weight_dict`` (``loss_ce``, ``loss_bbox``, ``loss_giou``).
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, eos_coef: float = 0.1, loss_ce: float = 1.0,
                 loss_bbox: float = 5.0, loss_giou: float = 2.0):
        super().__init__()
        self.num_classes, self.matcher, self.eos_coef = num_classes, matcher, eos_coef
        self.weight_dict = {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef                                             # down-weight "no object"
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def num_boxes(self, targets: list[dict], device: torch.device) -> float:
        n = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            n = n / dist.get_world_size()
        return max(n.item(), 1.0)

    def single(self, outputs: dict, targets: list[dict], num_boxes: float) -> dict[str, Tensor]:
        """The three losses for one set of predictions (one decoder layer)."""
        logits = outputs["pred_logits"].float()                                 # (B, Q, K+1)
        indices = self.matcher(outputs, targets)
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(logits.device)
        query_idx = torch.cat([src for src, _ in indices]).to(logits.device)

        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        matched_labels = torch.cat([t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices)])
        target_classes[batch_idx, query_idx] = matched_labels.to(logits.device)
        loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight.to(logits.device))

        src_boxes = outputs["pred_boxes"][batch_idx, query_idx].float()        # (M, 4)
        tgt_boxes = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, indices)])
        tgt_boxes = tgt_boxes.to(src_boxes)                                     # (M, 4)
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num_boxes
        loss_giou = generalized_box_iou_loss(box_convert(src_boxes, "cxcywh", "xyxy"),
                                             box_convert(tgt_boxes, "cxcywh", "xyxy"), reduction="sum") / num_boxes
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        num_boxes = self.num_boxes(targets, outputs["pred_logits"].device)
        losses = self.single(outputs, targets, num_boxes)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in self.single(aux, targets, num_boxes).items()})
        return losses

    def weighted(self, losses: dict[str, Tensor]) -> Tensor:
        """Sum of every part (final and auxiliary) times its weight (``loss_ce_3`` uses ``loss_ce``'s)."""
        total = 0.0
        for name, value in losses.items():
            base = name.rsplit("_", 1)[0] if name.rsplit("_", 1)[-1].isdigit() else name
            total = total + self.weight_dict[base] * value
        return total


# --------------------------------------------------------------------- head ---

class DETRHead(nn.Module):
    """DETR on one feature map: input projection -> (encoder) -> decoder with learned queries -> class + box.

    ``forward(x, mask)`` -> {"pred_logits" (B, Q, K+1), "pred_boxes" (B, Q, 4) normalised cxcywh,
    "aux_outputs": [{"pred_logits", "pred_boxes"} per earlier decoder layer] (empty when ``aux_loss=False``)}.
    ``loss(outputs, targets, image_size)`` takes XYXY pixel targets on the (H, W) canvas; ``postprocess`` turns
    outputs back into XYXY pixel detections with 0-based labels.
    """

    def __init__(self, in_channels: int, num_classes: int, hidden_dim: int = 256, num_queries: int = 100,
                 enc_layers: int = 0, dec_layers: int = 6, num_heads: int = 8, ffn_dim: int = 1024,
                 dropout: float = 0.1, aux_loss: bool = True, eos_coef: float = 0.1, cost_class: float = 1.0,
                 cost_bbox: float = 5.0, cost_giou: float = 2.0, loss_ce: float = 1.0, loss_bbox: float = 5.0,
                 loss_giou: float = 2.0):
        super().__init__()
        if hidden_dim % 2 or hidden_dim % num_heads:
            raise ValueError(f"DETRHead: hidden_dim={hidden_dim} must be even (half the sine encoding per axis) and "
                             f"divisible by num_heads={num_heads}: pick e.g. hidden_dim=256, num_heads=8")
        if dec_layers < 1:
            raise ValueError(f"DETRHead: dec_layers={dec_layers}: the decoder needs at least 1 layer")
        self.num_classes, self.num_queries, self.aux_loss = num_classes, num_queries, aux_loss
        self.input_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
        self.pos_embed = PositionEmbeddingSine(hidden_dim // 2)
        self.encoder = nn.ModuleList(EncoderLayer(hidden_dim, num_heads, ffn_dim, dropout) for _ in range(enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(hidden_dim, num_heads, ffn_dim, dropout) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)                            # shared by every layer's output
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)               # last class = no object
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        # DETR's Transformer._reset_parameters: xavier on the transformer's matrices (heads keep default inits).
        for p in [*self.encoder.parameters(), *self.decoder.parameters()]:
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        self.criterion = SetCriterion(num_classes, HungarianMatcher(cost_class, cost_bbox, cost_giou),
                                      eos_coef=eos_coef, loss_ce=loss_ce, loss_bbox=loss_bbox, loss_giou=loss_giou)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> dict:
        B, _, h, w = x.shape
        if mask is None:
            mask = torch.zeros(B, h, w, dtype=torch.bool, device=x.device)
        elif mask.shape != (B, h, w):
            raise ValueError(f"DETRHead: mask {tuple(mask.shape)} must match the feature map (B, h, w) = {(B, h, w)}: "
                             "build it at the feature resolution (vitlab.tasks.detr.padding_mask)")
        src = self.input_proj(x)                                                # (B, D, h, w)
        pos = self.pos_embed(mask).to(src.dtype).flatten(2).transpose(1, 2)     # (B, h*w, D)
        memory = src.flatten(2).transpose(1, 2)                                 # (B, h*w, D)
        key_mask = mask.flatten(1)                                              # (B, h*w) True = ignore
        # An image with no valid cell would give NaN attention: let such an image attend to all its cells.
        key_mask = key_mask & ~key_mask.all(dim=1, keepdim=True)
        for layer in self.encoder:
            memory = layer(memory, pos, key_mask)
        query_pos = self.query_embed.weight.unsqueeze(0).expand(B, -1, -1)     # (B, Q, D)
        tgt = torch.zeros_like(query_pos)
        hs = []
        for layer in self.decoder:
            tgt = layer(tgt, memory, pos, query_pos, key_mask)
            hs.append(self.decoder_norm(tgt))
        hs = torch.stack(hs)                                                    # (L, B, Q, D)
        logits = self.class_embed(hs)                                           # (L, B, Q, K+1)
        boxes = self.bbox_embed(hs).sigmoid()                                   # (L, B, Q, 4)
        aux = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])] if self.aux_loss else []
        return {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "aux_outputs": aux}

    def loss(self, outputs: dict, targets: list[dict], image_size: tuple[int, int]) -> dict[str, Tensor]:
        """targets: [{"boxes": (n, 4) XYXY pixels, "labels": (n,) 0-based, optional "iscrowd": (n,)}] on the
        (H, W) canvas. Crowd / difficult boxes (iscrowd=1) are dropped: no training loss, as the contract says."""
        norm_targets = []
        for t in targets:
            boxes, labels = t["boxes"], t["labels"]
            if "iscrowd" in t and len(t["iscrowd"]):
                keep = t["iscrowd"] == 0
                boxes, labels = boxes[keep], labels[keep]
            norm_targets.append({"boxes": boxes_to_normalised(boxes, image_size), "labels": labels.long()})
        losses = self.criterion(outputs, norm_targets)
        total = self.criterion.weighted(losses)
        return {"loss": total, "loss_ce": losses["loss_ce"], "loss_bbox": losses["loss_bbox"],
                "loss_giou": losses["loss_giou"]}

    @torch.no_grad()
    def postprocess(self, outputs: dict, image_size: tuple[int, int], top_k: Optional[int] = None) -> list[dict]:
        """-> per image {"boxes": (Q', 4) XYXY pixels, "scores": (Q',), "labels": (Q',) 0-based}, by score, highest
        first. DETR's rule: softmax over K+1 classes, drop no-object, score = the best real class's probability."""
        prob = outputs["pred_logits"].float().softmax(-1)[..., :-1]             # (B, Q, K)
        scores, labels = prob.max(-1)                                           # (B, Q)
        boxes = boxes_to_pixels(outputs["pred_boxes"], image_size)              # (B, Q, 4)
        results = []
        for s, lab, b in zip(scores, labels, boxes):
            order = s.argsort(descending=True)
            if top_k is not None:
                order = order[:top_k]
            results.append({"boxes": b[order], "scores": s[order], "labels": lab[order]})
        return results
