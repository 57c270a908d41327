"""Object detection on a ViT: a simple feature pyramid feeding torchvision's detectors, scored by COCO mAP.

The plain-backbone recipe of ViTDet (Li et al., "Exploring Plain Vision Transformer Backbones for Object
Detection", ECCV 2022): the ViT's last feature map is rescaled into a pyramid (:class:`FeatureNeck`, deconvolutions
up, pooling down) and handed to a standard detector. The detectors are torchvision's, unchanged:

- ``faster_rcnn`` (Ren et al., NeurIPS 2015) and ``mask_rcnn`` (He et al., ICCV 2017): levels at the ``scales``
  (default 4, 2, 1, 1/2: strides 4..32 at patch 16) plus P6 (max-pool of the last level, ``top_block``) for the
  RPN only, as torchvision's FPN; RoIAlign reads every level but P6. Anchors ``8 x stride`` per level
  (torchvision's FPN default 32..512 at strides 4..64), one size per level, ``aspect_ratios`` each.
- ``retinanet`` (Lin et al., ICCV 2017) and ``fcos`` (Tian et al., ICCV 2019): P3-P7 as in their papers, i.e. the
  levels at ``scales`` (default 2, 1, 1/2: strides 8..32 at patch 16), P6 from the neck's ``top_block`` and P7 =
  max-pool of P6 (torchvision's P6/P7 are stride-2 convolutions; ViTDet's pooled P6 is used for both here, as
  for the R-CNNs). RetinaNet anchors: ``4 x stride`` with 3 octave scales (2^0, 2^1/3, 2^2/3) x ``aspect_ratios``
  (torchvision's default 32..512); FCOS: one anchor of size ``stride`` per location (FCOS reads the anchor sizes as
  its per-level scale ranges, so keep them equal to the strides).
- ``neck_source="pyramid"`` (a hierarchical backbone, e.g. ``timm_backbone``): torchvision's FPN over every level
  the backbone returns (``scales`` unused), plus P6 (and P7 for RetinaNet / FCOS) as above; pick the backbone's
  ``out_indices`` to choose the levels (e.g. strides 8..32 for RetinaNet's P3-P5).
- ``detr`` (Carion et al., ECCV 2020): :class:`vitlab.tasks.detr.DETRHead` on ONE level of the neck (the one at
  stride 16, or the nearest: ``scales=(1.0,)`` by default), set prediction with Hungarian matching, no NMS.

Images arrive resized, normalised and padded to ``(B, 3, S, S)`` by the data (vitlab's transforms), so
torchvision's ``GeneralizedRCNNTransform`` is replaced by :class:`CanvasTransform`, which neither resizes nor
normalises: every image's size is the canvas (anchors cover the padding too; boxes never fall in it) and
detections stay in the batch's pixel coordinates. Labels are 0-based; the R-CNNs reserve 0 for the background,
so they are shifted +1 in and -1 out (the heads are sized ``num_classes + 1``); RetinaNet and FCOS use one sigmoid
per class and take 0-based labels as they are. Crowd / 'difficult' boxes (``iscrowd=1``) give no training loss and
are not counted as misses by mAP (torchmetrics' :class:`MeanAveragePrecision`, COCO's protocol).

The vitlab backbone is not a submodule of the task (the recipe owns it, and checkpoints would hold it twice): it is
attached to the detector's backbone adapter for the duration of each call (:meth:`_BackboneNeck.attached`).
``forward`` is not used: a detection task needs the backbone and the images, call ``predict(backbone, images)``.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Iterator, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import MultiScaleRoIAlign
from torchvision.utils import draw_bounding_boxes

from vitlab.data.base import DataInfo
from vitlab.tasks.base import Backbone, BuildContext, Task
from vitlab.tasks.detr import DETRHead, padding_mask
from vitlab.tasks.pyramid import FeatureNeck

DETECTORS = ("faster_rcnn", "mask_rcnn", "retinanet", "fcos", "detr")
NECK_SOURCES = ("last", "taps", "pyramid")
# the neck's levels when ``scales`` is not given: ViTDet's four for the R-CNNs, P3-P5 (+ P6, P7) for the one-stage
# detectors, the stride-16 map alone for DETR
DEFAULT_SCALES = {"faster_rcnn": (4.0, 2.0, 1.0, 0.5), "mask_rcnn": (4.0, 2.0, 1.0, 0.5),
                  "retinanet": (2.0, 1.0, 0.5), "fcos": (2.0, 1.0, 0.5), "detr": (1.0,)}
MAP_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")
# box colours per class for drawn detections (tab10)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def sanitize(name: str) -> str:
    """A class name as a metric-name suffix: lowercase, runs of non-alphanumerics -> '_' ("traffic light" ->
    "traffic_light")."""
    return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_") or "class"


def _roi_pool(names: Sequence[str], strides: Sequence[int], output_size: int) -> MultiScaleRoIAlign:
    """RoIAlign over the pyramid levels. torchvision infers each level's scale from the feature / image size ratio
    and rounds it to a power of two, which is wrong for a patch-14 ViT (strides 7, 14, 28, ...: RoIs would be read
    at 7/8 of their position): the exact scales are set here, and the level mapper works on log2 of the strides."""
    from torchvision.ops.poolers import LevelMapper

    pool = MultiScaleRoIAlign(featmap_names=list(names), output_size=output_size, sampling_ratio=2)
    if any(s & (s - 1) for s in strides):                                 # not all powers of two
        pool.scales = [1.0 / float(s) for s in strides]
        lvl = [round(math.log2(s)) for s in strides]
        pool.map_levels = LevelMapper(lvl[0], lvl[-1])
    return pool


@contextmanager
def _training_mode(module: nn.Module, training: bool) -> Iterator[None]:
    """torchvision's detectors return losses in train mode and detections in eval mode: set the one a call needs,
    restore the caller's afterwards."""
    was = module.training
    module.train(training)
    try:
        yield
    finally:
        module.train(was)


class CanvasTransform(nn.Module):
    """Stands in for torchvision's ``GeneralizedRCNNTransform``: the images are already resized, normalised and
    padded to one canvas by vitlab's data, so this only wraps the batch in an ``ImageList`` whose every image size
    is the canvas, and ``postprocess`` leaves the detections in the canvas' pixels."""

    def forward(self, images: torch.Tensor | Sequence[torch.Tensor], targets: Optional[list[dict]] = None
                ) -> tuple[ImageList, Optional[list[dict]]]:
        if not torch.is_tensor(images):
            images = torch.stack(list(images))                                       # (B, 3, S, S)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        return ImageList(images, [size] * images.shape[0]), targets

    def postprocess(self, result: list[dict], image_shapes: Any, original_image_sizes: Any) -> list[dict]:
        return result


class _BackboneNeck(nn.Module):
    """The detector's ``backbone``: the vitlab backbone (attached per call, not registered) -> the feature neck ->
    ``OrderedDict`` of levels, plus ``extra_levels`` max-pooled levels (stride 2 each) after the neck's last."""

    def __init__(self, neck: FeatureNeck, extra_levels: int = 0):
        super().__init__()
        self.neck = neck
        self.extra_levels = extra_levels
        self.out_channels = neck.out_channels                              # what torchvision's heads read
        self.strides = list(neck.strides)
        self.names = list(neck.names)
        for _ in range(extra_levels):
            self.strides.append(self.strides[-1] * 2)
            self.names.append(f"p{int(round(math.log2(self.strides[-1])))}")
        object.__setattr__(self, "_backbone", None)

    @contextmanager
    def attached(self, backbone: Backbone) -> Iterator[None]:
        # object.__setattr__ bypasses nn.Module's registration: the backbone's weights stay the recipe's alone
        object.__setattr__(self, "_backbone", backbone)
        try:
            yield
        finally:
            object.__setattr__(self, "_backbone", None)

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        if self._backbone is None:
            raise RuntimeError("the detector's backbone is attached per call: use DetectionTask.training_step / "
                               "evaluation_step / predict(backbone, ...), not the torchvision model directly")
        levels = self.neck(self._backbone(images))                         # {name: (B, C, S/s, S/s)}
        levels = OrderedDict(levels)
        last = next(reversed(levels.values()))
        for name in self.names[len(levels):]:
            last = F.max_pool2d(last, kernel_size=1, stride=2)             # P7 from P6, as the FPN's top block
            levels[name] = last
        return levels


class DetectionTask(Task):
    """A ViT + feature pyramid + one of torchvision's detectors (or a DETR head); see the module docstring.

    ``scales``: the neck's rescale factors of the ViT's stride (None: the detector's default, see
    ``DEFAULT_SCALES``). ``anchor_sizes``: ``"auto"`` (per level from its stride, see the module docstring) or one
    size per detector level. ``detector_options``: extra keyword arguments of the torchvision detector (e.g.
    ``rpn_batch_size_per_image``, ``box_batch_size_per_image``, ``fg_iou_thresh``, ``center_sampling_radius``).
    ``detr``: :class:`vitlab.tasks.detr.DETRHead` keyword arguments. ``score_threshold``, ``nms_threshold`` and
    ``detections_per_image`` set the detectors' post-processing (DETR keeps its top ``detections_per_image``
    queries, no threshold, no NMS).
    """

    kind = "detection"
    data_kind = "detection"
    data_hint = "data=voc or data=coco"
    monitor = "val/map"
    monitor_mode = "max"
    curve_metrics = ("map", "map_50")
    lr_base_batch = 16               # recipe.lr_base_batch=auto: optim.lr is quoted for 16 images (mmdet)
    # torchvision's detectors may skip heads on some steps, and a ViTDet backbone's fc_norm feeds only the pooled
    # vector: under DDP some parameters get no gradient in a step
    find_unused_parameters = True

    def __init__(self, in_dim: int, num_classes: int, patch_size: int, img_size: int,
                 detector: Literal["faster_rcnn", "mask_rcnn", "retinanet", "fcos", "detr"] = "faster_rcnn",
                 neck_channels: int = 256, scales: Optional[Sequence[float]] = None,
                 neck_source: Literal["last", "taps", "pyramid"] = "last", neck_norm: str = "ln",
                 pyramid_channels: Optional[Sequence[int]] = None, pyramid_strides: Optional[Sequence[int]] = None,
                 anchor_sizes: Literal["auto"] | Sequence[int] = "auto",
                 aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
                 score_threshold: float = 0.05, nms_threshold: float = 0.5, detections_per_image: int = 100,
                 detr: Optional[dict] = None, detector_options: Optional[dict] = None,
                 map_backend: Literal["pycocotools", "faster_coco_eval"] = "pycocotools", per_class_map: bool = True,
                 draw_score_threshold: float = 0.5,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                 class_names: Optional[Sequence[str]] = None):
        super().__init__(mean=mean, std=std, class_names=class_names)
        if detector not in DETECTORS:
            raise ValueError(f"unknown detector {detector!r}; choose one of {', '.join(DETECTORS)} (task.detector)")
        if neck_source not in NECK_SOURCES:
            raise ValueError(f"unknown neck_source {neck_source!r}; choose one of {', '.join(NECK_SOURCES)} "
                             "(task.neck_source)")
        if map_backend not in ("pycocotools", "faster_coco_eval"):
            raise ValueError(f"unknown map_backend {map_backend!r}; choose pycocotools or faster_coco_eval")
        if detector == "fcos" and neck_channels % 32:
            raise ValueError(f"detector=fcos uses GroupNorm(32) in its head: task.neck_channels={neck_channels} "
                             "must be a multiple of 32 (e.g. 256)")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for num_classes={num_classes}: they must match")
        self.detector_name = detector
        self.num_classes = num_classes
        self.patch_size, self.img_size = patch_size, img_size
        self.score_threshold, self.nms_threshold = score_threshold, nms_threshold
        self.detections_per_image = detections_per_image
        self.map_backend, self.per_class_map = map_backend, per_class_map
        self.draw_score_threshold = draw_score_threshold
        self.scales = tuple(float(s) for s in (scales if scales is not None else DEFAULT_SCALES[detector]))
        # R-CNNs: background = 0, real classes 1..K; the sigmoid heads (RetinaNet, FCOS) and DETR take 0..K-1
        self.label_shift = 1 if detector in ("faster_rcnn", "mask_rcnn") else 0
        neck = FeatureNeck(in_dim, patch_size, out_channels=neck_channels, scales=self.scales, source=neck_source,
                           top_block=detector != "detr", norm=neck_norm, pyramid_channels=pyramid_channels,
                           pyramid_strides=pyramid_strides)
        body = _BackboneNeck(neck, extra_levels=1 if detector in ("retinanet", "fcos") else 0)
        opts = dict(detector_options or {})
        if detector == "detr":
            self.body = body
            # one level: the one at stride 16 (DETR-DC5 / ViT scale), else the nearest, coarser on a tie
            self.detr_level = min(range(len(body.strides)),
                                  key=lambda i: (abs(math.log2(body.strides[i] / 16)), -body.strides[i]))
            self.head = DETRHead(in_channels=body.out_channels, num_classes=num_classes, **(detr or {}))
            self.detector = None
        else:
            if detr:
                raise ValueError(f"task.detr options are for detector=detr, not {detector}: remove them")
            self.detector = self._build_detector(detector, body, anchor_sizes, aspect_ratios, opts)

    # ---------------------------------------------------------------- build ---
    def _anchors(self, detector: str, strides: Sequence[int], anchor_sizes: Any,
                 aspect_ratios: Sequence[float]) -> AnchorGenerator:
        if anchor_sizes == "auto":
            base = {"faster_rcnn": 8, "mask_rcnn": 8, "retinanet": 4, "fcos": 1}[detector]
            anchor_sizes = [base * s for s in strides]
        anchor_sizes = [int(a) for a in anchor_sizes]
        if len(anchor_sizes) != len(strides):
            raise ValueError(f"task.anchor_sizes has {len(anchor_sizes)} sizes for {len(strides)} detector levels "
                             f"(strides {list(strides)}): give one per level, or 'auto'")
        if detector == "retinanet":                  # 3 octave scales per level (RetinaNet, section 4)
            sizes = tuple(tuple(int(a * 2 ** (k / 3)) for k in range(3)) for a in anchor_sizes)
        else:
            sizes = tuple((a,) for a in anchor_sizes)
        ratios = (1.0,) if detector == "fcos" else tuple(float(r) for r in aspect_ratios)
        return AnchorGenerator(sizes, (ratios,) * len(sizes))

    def _build_detector(self, detector: str, body: _BackboneNeck, anchor_sizes: Any, aspect_ratios: Sequence[float],
                        opts: dict) -> nn.Module:
        anchors = self._anchors(detector, body.strides, anchor_sizes, aspect_ratios)
        # min/max size and mean/std configure torchvision's transform, replaced below by CanvasTransform
        common = dict(min_size=self.img_size, max_size=self.img_size, image_mean=list(self.mean),
                      image_std=list(self.std))
        if detector in ("faster_rcnn", "mask_rcnn"):
            roi_names = body.names[:-1]                                    # RoIAlign on every level but P6
            box_pool = _roi_pool(roi_names, body.strides[:-1], 7)
            kwargs = dict(common, num_classes=self.num_classes + 1, rpn_anchor_generator=anchors,
                          box_roi_pool=box_pool, box_score_thresh=self.score_threshold,
                          box_nms_thresh=self.nms_threshold, box_detections_per_img=self.detections_per_image)
            if detector == "mask_rcnn":
                kwargs["mask_roi_pool"] = _roi_pool(roi_names, body.strides[:-1], 14)
                model = MaskRCNN(body, **kwargs, **opts)
            else:
                model = FasterRCNN(body, **kwargs, **opts)
        else:
            cls = RetinaNet if detector == "retinanet" else FCOS
            model = cls(body, num_classes=self.num_classes, anchor_generator=anchors, score_thresh=self.score_threshold,
                        nms_thresh=self.nms_threshold, detections_per_img=self.detections_per_image, **common, **opts)
        model.transform = CanvasTransform()
        return model

    @classmethod
    def backbone_options(cls, options: dict, data: DataInfo) -> dict:
        """The data's geometry; ``neck_source=taps`` also needs one intermediate feature map per pyramid level."""
        out = super().backbone_options(options, data)
        if options.get("neck_source", "last") == "taps":
            scales = options.get("scales") or DEFAULT_SCALES[options.get("detector", "faster_rcnn")]
            out["out_indices"] = len(scales)
        return out

    @classmethod
    def from_data(cls, options: dict, data: DataInfo, backbone: Any, context: Optional[BuildContext] = None
                  ) -> "DetectionTask":
        """Width, patch and pyramid from the backbone; classes, image size, normalisation and names from the data."""
        return cls(in_dim=int(backbone.embed_dim), num_classes=int(data.num_classes),
                   patch_size=int(backbone.patch_size), img_size=int(data.img_size),
                   pyramid_channels=backbone.pyramid_channels, pyramid_strides=backbone.pyramid_strides,
                   mean=data.mean, std=data.std, class_names=data.class_names, **options)

    @property
    def _body(self) -> _BackboneNeck:
        return self.body if self.detector is None else self.detector.backbone

    # -------------------------------------------------------------- targets ---
    def _targets(self, batch: dict, device: torch.device) -> list[dict]:
        """The batch's boxes as torchvision's training targets: crowd / 'difficult' and degenerate boxes dropped,
        labels shifted for the R-CNNs, instance masks for Mask R-CNN."""
        masks = batch.get("masks")
        if self.detector_name == "mask_rcnn" and masks is None:
            raise ValueError("detector=mask_rcnn needs instance masks in the batch: use data=coco with "
                             "data.source.with_masks=true, or detector=faster_rcnn for boxes only")
        n = len(batch["boxes"])
        crowd = batch.get("iscrowd") or [None] * n
        targets = []
        for i in range(n):
            boxes = batch["boxes"][i].to(device=device, dtype=torch.float32).reshape(-1, 4)     # (n_i, 4) XYXY
            keep = (boxes[:, 2:] > boxes[:, :2]).all(dim=1)                 # torchvision refuses empty boxes
            if crowd[i] is not None:
                keep &= crowd[i].to(device) == 0
            t = {"boxes": boxes[keep], "labels": batch["labels"][i].to(device=device, dtype=torch.int64)[keep]
                 + self.label_shift}
            if self.detector_name == "mask_rcnn":
                t["masks"] = masks[i].to(device)[keep]                       # (n_i, S, S) uint8
            targets.append(t)
        return targets

    # ---------------------------------------------------------------- steps ---
    def _detr_outputs(self, backbone: Backbone, images: torch.Tensor, image_size: Optional[torch.Tensor]) -> dict:
        """DETR's outputs on its level; ``image_size`` (B, 2) valid (h, w): the padding is masked out of the
        attention and the positional encoding, as DETR does (None: the whole canvas is image)."""
        with self.body.attached(backbone):
            levels = self.body(images)
        x = list(levels.values())[self.detr_level]                         # (B, C, h, w)
        mask = None
        if image_size is not None:
            mask = padding_mask(image_size.to(x.device), images.shape[-2:], x.shape[-2:])   # (B, h, w) True = pad
        return self.head(x, mask)

    def training_step(self, backbone: Backbone, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]                                             # (B, 3, S, S)
        targets = self._targets(batch, images.device)
        if self.detector is None:
            canvas = (int(images.shape[-2]), int(images.shape[-1]))
            outputs = self._detr_outputs(backbone, images, batch.get("image_size"))
            losses = self.head.loss(outputs, targets, canvas)
            return {"loss": losses["loss"], **{k: v.detach() for k, v in losses.items() if k != "loss"}}
        with self._body.attached(backbone), _training_mode(self.detector, True):
            losses = self.detector(images, targets)
        # RetinaNet / FCOS name their parts "classification", "bbox_regression", ...: log them all as loss_*
        parts = {(k if k.startswith("loss_") else f"loss_{k}"): v for k, v in losses.items()}
        return {"loss": sum(parts.values()), **{k: v.detach() for k, v in parts.items()}}

    @torch.no_grad()
    def _detect(self, backbone: Backbone, images: torch.Tensor,
                image_size: Optional[torch.Tensor] = None) -> list[dict]:
        """Detections per image in the canvas' pixels: {"boxes" (n, 4) XYXY, "scores" (n,), "labels" (n,) 0-based,
        Mask R-CNN: "masks" (n, 1, 28, 28) per-box mask probabilities}."""
        if self.detector is None:
            canvas = (int(images.shape[-2]), int(images.shape[-1]))
            with _training_mode(self, False):
                outputs = self._detr_outputs(backbone, images, image_size)
                return self.head.postprocess(outputs, canvas, top_k=self.detections_per_image)
        with self._body.attached(backbone), _training_mode(self.detector, False):
            dets = self.detector(images)
        for d in dets:
            d["labels"] = d["labels"] - self.label_shift
        return dets

    def evaluation_step(self, backbone: Backbone, batch: dict) -> dict[str, Any]:
        """Detections and targets in the ORIGINAL images' pixels (boxes / scale), for COCO's size buckets."""
        images = batch["image"]
        dets = self._detect(backbone, images, batch.get("image_size"))
        scale = batch["scale"].to(images.device, torch.float32)              # (B,) transformed / original
        preds, target = [], []
        valid = batch.get("image_size")
        for i, d in enumerate(dets):
            boxes = d["boxes"].float()
            if valid is not None:                    # inside the image, not the padding, before mapping back
                h, w = (float(v) for v in valid[i])
                boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                                     boxes[:, 3].clamp(0, h)], dim=1)
            preds.append({"boxes": boxes / scale[i], "scores": d["scores"].float(), "labels": d["labels"].long()})
            boxes = batch["boxes"][i].to(images.device, torch.float32).reshape(-1, 4)
            labels = batch["labels"][i].to(images.device, torch.int64)
            crowd = batch["iscrowd"][i].to(images.device, torch.int64) if "iscrowd" in batch \
                else torch.zeros_like(labels)
            tgt = {"boxes": boxes / scale[i], "labels": labels, "iscrowd": crowd}
            if "area" in batch:                      # the annotation's area (COCO: the mask's) in original pixels
                tgt["area"] = batch["area"][i].to(images.device, torch.float32)
            target.append(tgt)
        return {"preds": preds, "target": target}

    def predict(self, backbone: Backbone, images: torch.Tensor) -> list[dict]:
        """Detections per image {"boxes" (n, 4) XYXY pixels of ``images``, "scores" (n,), "labels" (n,) 0-based}; Mask
        R-CNN adds "masks" (n, 1, H, W) probabilities pasted on the canvas."""
        dets = self._detect(backbone, images)
        if self.detector_name == "mask_rcnn":
            canvas = (int(images.shape[-2]), int(images.shape[-1]))
            for d in dets:
                d["masks"] = paste_masks_in_image(d["masks"], d["boxes"], canvas)
        return dets

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("DetectionTask is not called on backbone features: it needs the backbone and the images. "
                        "Use task.predict(backbone, images) for detections, task.training_step(backbone, batch) "
                        "for losses")

    # -------------------------------------------------------------- metrics ---
    def metrics(self, validate_args: bool = True):
        """COCO box mAP (torchmetrics; ``validate_args`` is accepted for the common interface and unused)."""
        from torchmetrics.detection import MeanAveragePrecision

        return MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=self.per_class_map,
                                    backend=self.map_backend)

    def class_name(self, c: int) -> str:
        return self.class_names[c] if self.class_names is not None and 0 <= c < len(self.class_names) else str(c)

    def compute_metrics(self, metric) -> dict[str, torch.Tensor]:
        """map, map_50, map_75, map_small/medium/large, mar_1/10/100 and map_<class> (per_class_map); a value of -1
        (no object of that size or class) is dropped, except for map and map_50, which are always there (the
        checkpoint callback monitors val/map). A class name that would collide with a COCO key or another class
        gets its index appended."""
        res = metric.compute()
        out = {k: res[k].reshape(()) for k in MAP_KEYS if k in res and res[k].numel() == 1
               and (float(res[k]) != -1 or k in ("map", "map_50"))}
        if self.per_class_map and "classes" in res:
            taken = {f"map_{k}" for k in ("50", "75", "small", "medium", "large")}
            for c, v in zip(res["classes"].flatten().tolist(), res["map_per_class"].flatten()):
                if float(v) != -1:
                    name = f"map_{sanitize(self.class_name(int(c)))}"
                    if name in taken or name in out:
                        name = f"{name}_{int(c)}"
                    out[name] = v
        return out

    # ------------------------------------------------------------- pictures ---
    def _draw(self, picture: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
              scores: Optional[torch.Tensor] = None) -> torch.Tensor:
        names = [self.class_name(int(c)) for c in labels]
        if scores is not None:
            names = [f"{n} {s:.2f}" for n, s in zip(names, scores.tolist())]
        colors = [PALETTE[int(c) % len(PALETTE)] for c in labels]
        if len(boxes) == 0:
            return picture
        return draw_bounding_boxes(picture, boxes.detach().float().cpu(), labels=names, colors=colors, width=2)

    def visualize(self, backbone: Backbone, batch: dict) -> dict[str, list[torch.Tensor]]:
        """{"detections": [ground truth row, predictions row]}: uint8 (n, 3, S, S) pictures, at most 8 images;
        predictions above ``draw_score_threshold``, with their scores."""
        n = min(8, batch["image"].shape[0])
        images = batch["image"][:n]
        pictures = self.to_uint8(images)                                    # (n, 3, S, S) uint8
        size = batch.get("image_size")
        dets = self._detect(backbone, images, size[:n] if size is not None else None)
        truth, predicted = [], []
        for i in range(n):
            truth.append(self._draw(pictures[i], batch["boxes"][i].reshape(-1, 4), batch["labels"][i].cpu()))
            d = dets[i]
            keep = d["scores"] > self.draw_score_threshold
            predicted.append(self._draw(pictures[i], d["boxes"][keep], d["labels"][keep].cpu(),
                                        d["scores"][keep].cpu()))
        return {"detections": [torch.stack(truth), torch.stack(predicted)]}
