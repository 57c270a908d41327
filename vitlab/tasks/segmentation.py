"""Semantic segmentation on a ViT: the task (decoder + loss + mIoU metrics + whole / sliding-window inference).

Three decoders (their modules live in vitlab/tasks/seg_heads.py):

- ``head="linear"``: Segmenter's / SETR-naive's linear decoder on ``features["patch_2d"]`` (Strudel et al., ICCV
  2021; Zheng et al., CVPR 2021).
- ``head="upernet"``: UPerNet (Xiao et al., ECCV 2018) as BEiT (Bao et al., ICLR 2022) puts it on a plain ViT:
  4 intermediate blocks (``features["taps"]``, the backbone built with ``out_indices=taps``) rescaled x4, x2, x1,
  x0.5 by :class:`~vitlab.tasks.pyramid.TapPyramid` (strides patch/4 .. 2*patch: 4, 8, 16, 32 at patch 16), or
  a hierarchical backbone's ``features["pyramid"]``; + an auxiliary FCN head on the third level in training.
- ``head="segvit"``: SegViT's Attention-to-Mask decoder (Zhang et al., NeurIPS 2022) on the taps.

Loss: pixel cross-entropy with ``ignore_index`` on logits upsampled (bilinear) to the mask's size (mmseg), plus
``aux_weight`` x the auxiliary head's (UPerNet); SegViT trains with its own mask-classification loss.

Inference (mmseg's ``whole`` / ``slide`` test modes): one pass over the (padded) image, or windows of
``img_size`` with ``slide_stride`` whose logits are summed and divided by how many windows cover each pixel.
Evaluation scores at the mask's (original) resolution: each sample's logits on its valid region are resized
to its mask's valid size. Metrics come from one torchmetrics confusion matrix: mIoU over the classes seen in
prediction or target (mmseg leaves a class with an empty union out), pixel accuracy, mean class accuracy and
per-class IoU.
"""

from __future__ import annotations

import colorsys
import re
from typing import Any, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassConfusionMatrix
from torchvision.utils import draw_segmentation_masks

from vitlab.data.base import DataInfo
from vitlab.tasks.base import Backbone, BuildContext, Task
from vitlab.tasks.pyramid import TapPyramid
from vitlab.tasks.seg_heads import ATMHead, FCNHead, LinearSegHead, UPerHead

HEADS = ("linear", "upernet", "segvit")
TAP_SCALES = (4.0, 2.0, 1.0, 0.5)                   # BEiT's UPerNet neck: one rescale per tap
SEGVIT_DEFAULTS = dict(num_layers=3, num_heads=8, dropout=0.1, mask_loss="focal", cls_weight=1.0,
                       mask_weight=20.0, dice_weight=1.0, eos_coef=0.1)   # SegViT's ATMHead / ATMLoss defaults


# ------------------------------------------------------------------ helpers ---

def default_palette(n: int) -> list[tuple[int, int, int]]:
    """n distinct, deterministic colours: hues spaced by the golden ratio, alternating brightness."""
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 1.0 if i % 2 == 0 else 0.7)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def metric_names(class_names: Optional[Sequence[str]], num_classes: int) -> list[str]:
    """Per-class metric suffixes: lowercase, runs of non-alphanumerics -> "_" ("Traffic Light" -> "traffic_light");
    the class index where a name is missing, empty or repeated."""
    names, seen = [], set()
    for i in range(num_classes):
        name = class_names[i] if class_names is not None and i < len(class_names) else ""
        name = re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_") or str(i)
        if name in seen:
            name = f"{name}_{i}"
        seen.add(name)
        names.append(name)
    return names


def slide_windows(height: int, width: int, window: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg's slide_inference grid: (y1, y2, x1, x2) windows of ``window`` pixels every ``stride``, the last one
    of each row / column moved back to end at the border; one window per axis when the image is smaller."""
    def starts(size: int) -> list[tuple[int, int]]:
        n = max(size - window + stride - 1, 0) // stride + 1
        spans = []
        for i in range(n):
            end = min(i * stride + window, size)
            spans.append((max(end - window, 0), end))
        return spans
    return [(y1, y2, x1, x2) for y1, y2 in starts(height) for x1, x2 in starts(width)]


def confusion_scores(confmat: Tensor) -> dict[str, Tensor]:
    """From a confusion matrix (C, C) (rows = target, columns = prediction, as torchmetrics) ->
    {"iou": (C,) NaN where a class is in neither prediction nor target, "miou": the mean of the others,
     "pixel_acc", "acc": (C,) NaN where a class is not in the target, "macc": the mean of the others}."""
    cm = confmat.double()
    tp = cm.diagonal()
    gt, pred = cm.sum(1), cm.sum(0)
    union = gt + pred - tp
    nan = torch.full_like(tp, float("nan"))
    iou = torch.where(union > 0, tp / union.clamp_min(1), nan)
    acc = torch.where(gt > 0, tp / gt.clamp_min(1), nan)
    total = cm.sum()
    return {"iou": iou, "miou": iou.nanmean(), "pixel_acc": tp.sum() / total if total > 0 else total.new_tensor(0.0),
            "acc": acc, "macc": acc.nanmean()}


def _taps_len(taps: int | Sequence[int]) -> int:
    return int(taps) if isinstance(taps, int) else len(list(taps))


def _pad_to(x: Tensor, multiple: int) -> Tensor:
    """Pad (B, C, H, W) bottom/right with zeros (the mean colour, once normalised) to multiples of ``multiple``."""
    H, W = x.shape[-2:]
    ph, pw = -H % multiple, -W % multiple
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


def _get(features: dict, key: str, head: str, fix: str) -> object:
    if key not in features:
        raise KeyError(f"head={head} reads features[{key!r}], which the backbone did not return (it gave "
                       f"{sorted(features)}): {fix}")
    return features[key]


# --------------------------------------------------------------------- task ---

class SegmentationTask(Task):
    """Decoder + pixel loss + mIoU. :meth:`from_data` passes ``in_dim``, ``patch_size`` (and a hierarchical
    backbone's ``pyramid_channels`` / ``pyramid_strides``) from the backbone, ``num_classes``, ``img_size``,
    ``ignore_index``, ``mean``, ``std``, ``class_names``, ``palette`` from the data; :meth:`backbone_options`
    gives the backbone its taps.

    ``channels``: decoder width (UPerNet, SegViT). ``taps``: intermediate blocks read by UPerNet (4) / SegViT
    (the backbone's ``out_indices``: a count, or block indices). ``aux_weight``: UPerNet's auxiliary FCN loss
    weight (0 = no auxiliary head). ``segvit``: ATM options (see ``SEGVIT_DEFAULTS``; SegViT used 3 taps).
    ``inference``: "whole" (one pass) or "slide" (windows of ``img_size`` every ``slide_stride`` pixels,
    default 2/3 of img_size as mmseg's ADE20K configs).
    """

    kind = "segmentation"
    data_kind = "segmentation"
    data_hint = "data=camvid, ade20k or segfolder"
    monitor = "val/miou"
    monitor_mode = "max"
    curve_metrics = ("miou", "pixel_acc")
    lr_base_batch = 16               # recipe.lr_base_batch=auto: optim.lr is quoted for 16 images (mmseg)
    # UPerNet reads the pre-norm taps, not the final norm: under DDP those parameters get no gradient
    find_unused_parameters = True

    def __init__(self, in_dim: int, num_classes: int, patch_size: int, img_size: int,
                 head: Literal["linear", "upernet", "segvit"] = "linear", ignore_index: int = 255,
                 channels: int = 256, taps: int | Sequence[int] = 4, pool_scales: Sequence[int] = (1, 2, 3, 6),
                 dropout: float = 0.1, aux_weight: float = 0.4, segvit: Optional[dict] = None,
                 inference: Literal["whole", "slide"] = "whole", slide_stride: Optional[int] = None,
                 pyramid_channels: Optional[Sequence[int]] = None, pyramid_strides: Optional[Sequence[int]] = None,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                 class_names: Optional[Sequence[str]] = None, palette: Optional[Sequence[Sequence[int]]] = None):
        super().__init__(mean, std, class_names)
        if head not in HEADS:
            raise ValueError(f"unknown segmentation head {head!r}: choose one of {', '.join(HEADS)} (task.head)")
        if inference not in ("whole", "slide"):
            raise ValueError(f"unknown inference mode {inference!r}: use 'whole' (one pass over the image) or "
                             "'slide' (windows of img_size, task.slide_stride apart)")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names for num_classes={num_classes}: give one name per class")
        self.head_type, self.num_classes, self.ignore_index = head, int(num_classes), int(ignore_index)
        self.patch_size, self.img_size = int(patch_size), int(img_size)
        self.inference = inference
        self.slide_stride = int(slide_stride) if slide_stride else max(1, (2 * self.img_size) // 3)
        if self.slide_stride > self.img_size:
            raise ValueError(f"task.slide_stride={self.slide_stride} > img_size={self.img_size} leaves pixels no "
                             "window covers: use a stride <= img_size")
        self.hierarchical = pyramid_channels is not None
        # Whole-image passes pad to a multiple of what the backbone divides by.
        self.size_multiple = int(max(pyramid_strides)) if self.hierarchical and pyramid_strides else self.patch_size
        self.aux_weight = float(aux_weight)
        self.palette = self._palette(palette)
        self.names = metric_names(self.class_names, self.num_classes)

        n_taps = _taps_len(taps)
        if head == "linear":
            width = int(pyramid_channels[-1]) if self.hierarchical else in_dim
            self.head = LinearSegHead(width, num_classes, dropout)
        elif head == "upernet":
            if self.hierarchical:
                levels = [int(c) for c in pyramid_channels]
                self.neck = nn.Identity()
            else:
                if n_taps != len(TAP_SCALES):
                    raise ValueError(f"head=upernet rescales {len(TAP_SCALES)} taps x{TAP_SCALES} (BEiT) but "
                                     f"task.taps={taps!r} gives {n_taps}: set task.taps=4 or 4 block indices")
                self.neck = TapPyramid(in_dim, TAP_SCALES, norm="bn")   # widths kept (B, in_dim, h*s, w*s)
                levels = [in_dim] * len(TAP_SCALES)
            self.head = UPerHead(levels, channels, num_classes, pool_scales, dropout)
            self.aux_head = FCNHead(levels[2], channels, num_classes, dropout) if self.aux_weight > 0 else None
        else:
            opts = dict(SEGVIT_DEFAULTS)
            unknown = set(segvit or {}) - set(opts)
            if unknown:
                raise ValueError(f"unknown task.segvit options {sorted(unknown)}; valid: {sorted(opts)}")
            opts.update(segvit or {})
            self.segvit_opts = opts
            levels = [int(c) for c in pyramid_channels] if self.hierarchical else [in_dim] * n_taps
            self.head = ATMHead(levels, num_classes, channels, int(opts["num_heads"]), int(opts["num_layers"]),
                                float(opts["dropout"]))

    def _palette(self, palette: Optional[Sequence[Sequence[int]]]) -> list[tuple[int, int, int]]:
        out = [tuple(int(c) for c in p[:3]) for p in palette] if palette is not None else []
        return (out + default_palette(self.num_classes)[len(out):])[:self.num_classes]

    @classmethod
    def backbone_options(cls, options: dict, data: DataInfo) -> dict:
        """The data's geometry; UPerNet and SegViT read intermediate blocks: the backbone must return
        ``features["taps"]``."""
        out = super().backbone_options(options, data)
        if options.get("head", "linear") in ("upernet", "segvit"):
            taps = options.get("taps", 4)
            out["out_indices"] = int(taps) if isinstance(taps, int) else [int(t) for t in taps]
        return out

    @classmethod
    def from_data(cls, options: dict, data: DataInfo, backbone: Any, context: Optional[BuildContext] = None
                  ) -> "SegmentationTask":
        if data.ignore_index is not None:        # the data's own unlabelled value wins over task.ignore_index
            options = {**options, "ignore_index": int(data.ignore_index)}
        return cls(in_dim=int(backbone.embed_dim), num_classes=int(data.num_classes),
                   patch_size=int(backbone.patch_size), img_size=int(data.img_size),
                   pyramid_channels=backbone.pyramid_channels, pyramid_strides=backbone.pyramid_strides,
                   mean=data.mean, std=data.std, class_names=data.class_names, palette=data.palette,
                   **options)

    # ------------------------------------------------------------ forward ---
    def _inputs(self, features: dict) -> Tensor | list[Tensor]:
        """The features the decoder reads: the last map (linear) or the list of levels (UPerNet / SegViT)."""
        if self.hierarchical:
            pyr = _get(features, "pyramid", self.head_type, "pyramid_channels was given, so a hierarchical "
                       "backbone (vitlab.backbones.timm_backbone) is expected")
            return pyr[-1] if self.head_type == "linear" else list(pyr)
        if self.head_type == "linear":
            return _get(features, "patch_2d", self.head_type, "run the backbone without a token-dropping mask")
        return list(_get(features, "taps", self.head_type, "build the backbone with out_indices=task.taps (the "
                         "builder passes SegmentationTask.backbone_options)"))

    def forward_features(self, features: dict) -> dict:
        """Backbone features -> {"logits": (B, C, h, w) at the decoder's resolution, "aux": (B, C, h', w')
        (UPerNet in training)} or, for SegViT, the ATM outputs {"class_logits": [...], "mask_logits": [...]}."""
        x = self._inputs(features)
        if self.head_type == "linear":
            return {"logits": self.head(x)}
        if self.head_type == "segvit":
            return self.head(x)
        levels = self.neck(x)                                               # [(B, in_dim, h*s, w*s)]
        out = {"logits": self.head(levels)}                                 # (B, C, h0, w0) at the finest level
        if self.training and self.aux_head is not None:
            out["aux"] = self.aux_head(levels[2])
        return out

    def _dense(self, out: dict, size: Sequence[int]) -> Tensor:
        """Decoder outputs -> per-pixel scores (B, C, *size): bilinear logits, or SegViT's class-weighted masks
        (its mask logits are upsampled before the sigmoid, as SegViT's ``semantic_inference``)."""
        if self.head_type == "segvit":
            masks = F.interpolate(out["mask_logits"][-1], size=tuple(size), mode="bilinear", align_corners=False)
            return ATMHead.scores(out["class_logits"][-1], masks)
        return F.interpolate(out["logits"], size=tuple(size), mode="bilinear", align_corners=False)

    def _whole(self, backbone: Backbone, images: Tensor) -> Tensor:
        """One pass: images (B, 3, H, W) -> scores (B, C, H, W), padding to the backbone's multiple first."""
        H, W = images.shape[-2:]
        x = _pad_to(images, self.size_multiple)
        return self._dense(self.forward_features(backbone(x)), x.shape[-2:])[..., :H, :W]

    def _slide(self, backbone: Backbone, images: Tensor) -> Tensor:
        """mmseg's slide_inference: windows of img_size (smaller windows padded to it), logits summed / counts."""
        B, _, H, W = images.shape
        S = self.img_size
        total = count = None
        for y1, y2, x1, x2 in slide_windows(H, W, S, self.slide_stride):
            crop = images[:, :, y1:y2, x1:x2]
            h, w = crop.shape[-2:]
            logits = self._whole(backbone, F.pad(crop, (0, S - w, 0, S - h)))[..., :h, :w]   # (B, C, h, w)
            if total is None:
                total = logits.new_zeros(B, logits.shape[1], H, W, dtype=torch.float32)   # fp32 sums under AMP
                count = logits.new_zeros(1, 1, H, W, dtype=torch.float32)
            total[:, :, y1:y2, x1:x2] += logits
            count[:, :, y1:y2, x1:x2] += 1
        return total / count

    def predict(self, backbone: Backbone, images: Tensor) -> Tensor:
        """images (B, 3, H, W) -> logits (B, C, H, W) (SegViT: class scores in [0, 1]) at the images' size."""
        return self._slide(backbone, images) if self.inference == "slide" else self._whole(backbone, images)

    # --------------------------------------------------------------- loss ---
    def pixel_ce(self, logits: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy over the labelled pixels (0 when there are none, where torch's mean gives NaN)."""
        loss = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index, reduction="sum")
        return loss / (target != self.ignore_index).sum().clamp_min(1)

    def training_step(self, backbone: Backbone, batch: dict) -> dict[str, Tensor]:
        """-> {"loss", "loss_seg" (+ "loss_aux", unweighted, UPerNet)} or SegViT's {"loss", "loss_cls",
        "loss_mask", "loss_dice"} (weighted, summed over stages). Logits are upsampled to the mask's size."""
        mask = batch["mask"]                                                # (B, Hm, Wm)
        if self.head_type == "upernet" and batch["image"].shape[0] < 2:
            raise ValueError("head=upernet batch-normalises its global pooling branch (one value per channel and "
                             "image), which needs at least 2 images per device in training: raise data.batch_size "
                             "to 2 or more, or use task.head=linear")
        out = self.forward_features(backbone(batch["image"]))
        if self.head_type == "segvit":
            o = self.segvit_opts
            return self.head.loss(out, mask, self.ignore_index, o["mask_loss"], float(o["cls_weight"]),
                                  float(o["mask_weight"]), float(o["dice_weight"]), float(o["eos_coef"]))
        size = mask.shape[-2:]
        res = {"loss_seg": self.pixel_ce(self._dense(out, size), mask)}
        res["loss"] = res["loss_seg"]
        if "aux" in out:
            res["loss_aux"] = self.pixel_ce(F.interpolate(out["aux"], size=tuple(size), mode="bilinear",
                                                          align_corners=False), mask)
            res["loss"] = res["loss"] + self.aux_weight * res["loss_aux"]
        return res

    # ---------------------------------------------------------- evaluation ---
    def _valid_sizes(self, batch: dict) -> tuple[list[list[int]], list[list[int]]]:
        B, _, H, W = batch["image"].shape
        Hm, Wm = batch["mask"].shape[-2:]
        img = batch["image_size"].tolist() if "image_size" in batch else [[H, W]] * B
        msk = batch["mask_size"].tolist() if "mask_size" in batch else [[Hm, Wm]] * B
        return img, msk

    def evaluation_step(self, backbone: Backbone, batch: dict) -> dict:
        """Per sample: logits on its valid region, resized (bilinear) to its mask's valid size, argmax.
        -> {"preds", "target": 1-D int64 over the labelled pixels of the batch, "loss": CE on those pixels}.

        Each image is predicted at its own valid size (images of one size together), never on the batch's padded
        canvas: the ViT attends globally, so padding tokens would change the result with the batch's make-up."""
        images, mask = batch["image"], batch["mask"]
        img_sizes, mask_sizes = self._valid_sizes(batch)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, hw in enumerate(img_sizes):
            groups.setdefault((int(hw[0]), int(hw[1])), []).append(i)
        logits: dict[int, Tensor] = {}
        for (h, w), idx in groups.items():
            out = self.predict(backbone, images[idx, :, :h, :w])            # (n, C, h, w)
            logits.update({i: out[j:j + 1] for j, i in enumerate(idx)})
        preds, target, loss_sum = [], [], images.new_zeros((), dtype=torch.float32)
        for i, (hm, wm) in enumerate(mask_sizes):
            lg = F.interpolate(logits[i].float(), size=(int(hm), int(wm)), mode="bilinear",
                               align_corners=False)[0]                       # (C, hm, wm)
            tgt = mask[i, :hm, :wm]
            keep = tgt != self.ignore_index                                 # (hm, wm)
            lg_px, tgt_px = lg.permute(1, 2, 0)[keep], tgt[keep]            # (P, C), (P,)
            preds.append(lg_px.argmax(-1))
            target.append(tgt_px)
            if self.head_type == "segvit":                                  # scores: NLL of the normalised scores
                p = lg_px.clamp_min(1e-8)
                loss_sum = loss_sum + F.nll_loss((p / p.sum(-1, keepdim=True)).log(), tgt_px, reduction="sum")
            else:
                loss_sum = loss_sum + F.cross_entropy(lg_px, tgt_px, reduction="sum")
        preds_t, target_t = torch.cat(preds), torch.cat(target)
        return {"preds": preds_t, "target": target_t, "loss": loss_sum / max(target_t.numel(), 1)}

    def metrics(self, validate_args: bool = True) -> MetricCollection:
        """One confusion matrix; compute_metrics derives mIoU, pixel accuracy, mean accuracy and per-class IoU."""
        return MetricCollection({"confmat": MulticlassConfusionMatrix(self.num_classes,
                                                                      validate_args=validate_args)})

    def compute_metrics(self, metric: MetricCollection) -> dict[str, Tensor]:
        """-> {"miou", "pixel_acc", "macc", "iou_<class>"} as 0-d tensors; a class in neither prediction nor
        target gets NaN and stays out of the mean (mmseg)."""
        s = confusion_scores(metric.compute()["confmat"])
        out = {"miou": s["miou"].float(), "pixel_acc": s["pixel_acc"].float(), "macc": s["macc"].float()}
        out.update({f"iou_{n}": s["iou"][i].float() for i, n in enumerate(self.names)})
        return out

    # ------------------------------------------------------------- drawing ---
    def _overlay(self, image: Tensor, label: Tensor) -> Tensor:
        """uint8 (3, H, W) + class map (H, W) -> the classes painted at alpha 0.5, ignored pixels untouched."""
        classes = torch.arange(self.num_classes).view(-1, 1, 1)
        masks = label.unsqueeze(0) == classes                               # (C, H, W)
        return draw_segmentation_masks(image, masks, alpha=0.5, colors=self.palette)

    @torch.no_grad()
    def visualize(self, backbone: Backbone, batch: dict, max_images: int = 8) -> dict[str, list[Tensor]]:
        """-> {"segmentation": [images, ground truth, prediction]}, each uint8 (n, 3, H, W) at the image's size
        (the mask resized with nearest when it is at another resolution), n <= 8."""
        n = min(max_images, batch["image"].shape[0])
        images = batch["image"][:n]
        pics = self.to_uint8(images)                                        # (n, 3, H, W)
        H, W = pics.shape[-2:]
        pred = self.predict(backbone, images).argmax(1).cpu()               # (n, H, W)
        img_sizes, mask_sizes = self._valid_sizes(batch)
        gts, preds = [], []
        for i in range(n):
            (h, w), (hm, wm) = img_sizes[i], mask_sizes[i]
            gt = torch.full((H, W), self.ignore_index, dtype=torch.long)
            m = batch["mask"][i, :hm, :wm].cpu().long()
            gt[:h, :w] = F.interpolate(m[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
            pr = torch.full((H, W), self.ignore_index, dtype=torch.long)
            pr[:h, :w] = pred[i, :h, :w]
            gts.append(self._overlay(pics[i], gt))
            preds.append(self._overlay(pics[i], pr))
        return {"segmentation": [pics, torch.stack(gts), torch.stack(preds)]}
