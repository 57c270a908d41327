"""Object-detection data: Pascal VOC XML and COCO json sources, their box-aware transforms and collate.

Every source hands out raw samples (see :mod:`vitlab.data.dense`)::

    {"image": tv_tensors.Image uint8 (3, H, W), "boxes": tv_tensors.BoundingBoxes (n, 4) XYXY pixels, canvas (H, W),
     "labels": int64 (n,), "iscrowd": uint8 (n,), "area": float32 (n,) (original pixels: COCO's annotation area,
     else the box's), "masks": tv_tensors.Mask uint8 (n, H, W) (COCO, with_masks),
     "image_id": int, "orig_size": (H, W)}

Annotations are parsed once per split into a list of records held in memory; images are read in ``__getitem__``
(so an unreadable file raises an ``OSError``, which :class:`vitlab.data.dense.DenseDataset` turns into a skip).
Boxes of zero (or negative) width or height, once clipped to the image, are dropped when the annotation is read,
with one log line per split; ``source.dropped[split]`` counts them.

Transforms (``source.build_transform``) move the boxes and instance masks with the image (torchvision v2):

    train "lsj"     large-scale jitter (Ghiasi et al., "Simple Copy-Paste is a Strong Data Augmentation Method for
                    Instance Segmentation", CVPR 2021; the ViTDet recipe, Li et al., ECCV 2022): flip -> resize by
                    U(scale_range) x (S / longer side) -> random S x S crop, padded bottom/right with the mean
                    colour when smaller -> drop boxes cut below 1 px -> float -> normalise
    train "resize"  flip -> the eval geometry -> drop boxes below 1 px
    eval            resize so the longer side is S (aspect kept) -> pad bottom/right to S x S

The resize maps pixel coordinates by exactly one factor ``scale`` on both axes (``F.interpolate`` with the
scale factor, not a rounded output size), so ``boxes / scale`` are the original pixels, which is what mAP is
scored on; the padding is the mean colour, so it normalises to 0. Datasets:

- Pascal VOC: Everingham et al., "The PASCAL Visual Object Classes (VOC) Challenge", IJCV 2010.
- COCO: Lin et al., "Microsoft COCO: Common Objects in Context", ECCV 2014.
"""

from __future__ import annotations

import json
import logging
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as TF
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from vitlab.data.base import SPLITS, DataConfigError, DatasetNotFoundError
from vitlab.data.dense import DenseSource

log = logging.getLogger("vitlab")

Policy = Literal["lsj", "resize"]
POLICIES = ("lsj", "resize")
# every key accepted under data.augment (the keyword arguments of build_transform after img_size)
AUGMENT_OPTIONS = ("policy", "scale_range", "hflip", "color_jitter")
_DENSE_TYPES = (tv_tensors.Image, tv_tensors.BoundingBoxes, tv_tensors.Mask)


# ----------------------------------------------------------------------------------------------- records, raw data

@dataclass
class DetectionRecord:
    """One image's annotation, parsed once: the boxes are already clipped and free of degenerate ones."""

    path: Path
    image_id: int
    size: Optional[tuple[int, int]]          # (H, W) the annotation was made on; None when the file does not say
    boxes: np.ndarray                        # (n, 4) float32 XYXY pixels
    labels: np.ndarray                       # (n,) int64
    iscrowd: np.ndarray                      # (n,) uint8
    segs: Optional[list] = None              # COCO segmentations (polygons / RLE), one per box, when masks are asked
    area: Optional[np.ndarray] = None        # (n,) float32 object area in original pixels (COCO: the annotation's,
                                             # i.e. the mask's; else the box's): COCO's small / medium / large buckets


def clip_boxes(boxes: np.ndarray, size: Optional[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Clip XYXY ``boxes`` (n, 4) to an image of ``size`` (H, W) (only to >= 0 when the size is unknown); return
    the clipped boxes and the mask of those with positive width and height."""
    boxes = boxes.astype(np.float32).reshape(-1, 4)
    hi = np.array([size[1], size[0], size[1], size[0]], np.float32) if size is not None else np.inf
    boxes = np.clip(boxes, 0.0, hi)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes, keep


def log_dropped(name: str, split: str, count: int, files: list[str]) -> None:
    """The one line per split that says how many degenerate boxes were dropped and where."""
    if count:
        shown = ", ".join(files[:5]) + (", ..." if len(files) > 5 else "")
        log.warning("%s %s: dropped %d degenerate box%s (zero width or height) in %s", name, split, count,
                    "" if count == 1 else "es", shown)


def decode_segmentation(seg: Any, h: int, w: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) -> (h, w) uint8 mask, via pycocotools."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):                                 # polygons: [[x0, y0, x1, y1, ...], ...]
        polygons = [p for p in seg if len(p) >= 6]            # fewer than 3 points encloses nothing
        if not polygons:
            return np.zeros((h, w), np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):   # uncompressed RLE (crowd regions)
        rle = mask_utils.frPyObjects(seg, h, w)
    elif isinstance(seg, dict):                               # compressed RLE
        rle = dict(seg, counts=seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"])
    else:
        return np.zeros((h, w), np.uint8)
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


class DetectionDataset(Dataset):
    """Records -> raw samples; the image is read here (PIL, RGB). ``path_of(i)`` names the image file."""

    def __init__(self, records: list[DetectionRecord], with_masks: bool = False):
        self.records, self.with_masks = records, with_masks

    def __len__(self) -> int:
        return len(self.records)

    def path_of(self, i: int) -> str:
        return str(self.records[i].path)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        with Image.open(r.path) as im:                        # OSError when missing / unreadable: a skip
            image = tv_tensors.Image(F.pil_to_tensor(im.convert("RGB")))     # (3, H, W) uint8
        h, w = image.shape[-2:]
        if r.size is not None and (h, w) != tuple(r.size):
            # ValueError is a decode error for DenseDataset: the item is skipped with this message and its file
            raise ValueError(f"the image is {h}x{w} but its annotation says {r.size[0]}x{r.size[1]} (height x "
                             "width); fix the annotation or the image")
        boxes = tv_tensors.BoundingBoxes(torch.from_numpy(r.boxes).reshape(-1, 4), format="XYXY", canvas_size=(h, w))
        area = r.area if r.area is not None else (r.boxes[:, 2] - r.boxes[:, 0]) * (r.boxes[:, 3] - r.boxes[:, 1])
        sample = {"image": image, "boxes": boxes, "labels": torch.from_numpy(r.labels),
                  "iscrowd": torch.from_numpy(r.iscrowd), "area": torch.from_numpy(np.asarray(area, np.float32))}
        if self.with_masks:
            segs = r.segs or []
            masks = (np.stack([decode_segmentation(s, h, w) for s in segs]) if segs
                     else np.zeros((0, h, w), np.uint8))
            sample["masks"] = tv_tensors.Mask(torch.from_numpy(masks))          # (n, H, W) uint8
        sample["image_id"], sample["orig_size"] = r.image_id, (h, w)
        return sample


class DetectionSource(DenseSource):
    """What the VOC and COCO sources share: the records cache, the transforms and the collate."""

    task = "detection"
    with_masks: bool = False

    def __init__(self):
        self.dropped: dict[str, int] = {}
        self._records: dict[str, list[DetectionRecord]] = {}

    def records(self, split: str) -> list[DetectionRecord]:
        """The parsed annotations of ``split`` (parsed on the first call, then kept)."""
        if split not in self._records:
            self._records[split] = self._parse(split)
        return self._records[split]

    def _parse(self, split: str) -> list[DetectionRecord]:
        raise NotImplementedError

    def _load(self, split: str) -> Dataset:
        self.check()
        return DetectionDataset(self.records(split), with_masks=self.with_masks)

    def build_transform(self, train: bool, img_size: int, policy: Policy = "lsj",
                        scale_range: Sequence[float] = (0.1, 2.0), hflip: float = 0.5,
                        color_jitter: float = 0.0, **other: Any) -> "DetectionTransform":
        if other:
            raise ValueError(f"unknown detection augment option(s) {sorted(other)} under data.augment; choose from "
                             f"{', '.join(AUGMENT_OPTIONS)}")
        return DetectionTransform(train, img_size, mean=self.mean, std=self.std, policy=policy,
                                  scale_range=scale_range, hflip=hflip, color_jitter=color_jitter)

    def collate(self, samples: list[dict]) -> dict:
        return detection_collate(samples)


# ------------------------------------------------------------------------------------------------------------ VOC

class VOCDetection(DetectionSource):
    """Pascal VOC layout: ``root/JPEGImages/<id>.jpg``, ``root/Annotations/<id>.xml`` and
    ``root/ImageSets/Main/<list>.txt`` (one id per line). The vitlab splits train / val / test read the lists
    ``train_split`` / ``val_split`` / ``test_split`` (e.g. ``train_split="trainval"`` for VOC07+12-style training);
    a split exists when its list does.

    ``classes``: the class names in label order; None takes the sorted names found in the annotations of every
    available split. VOC boxes are 1-based inclusive pixel indices: xmin / ymin are shifted by -1 (as torchvision's
    and detectron2's VOC loaders do), so a box covering the whole image is (0, 0, W, H). A box with xmax <= xmin or
    ymax <= ymin as written (a click without a drag) is degenerate and dropped. ``difficult`` objects become crowd
    regions (iscrowd = 1: not scored, no loss) or, with ``keep_difficult=False``, are left out.
    """

    name = "voc"

    def __init__(self, root: str, classes: Optional[Sequence[str]] = None, keep_difficult: bool = True,
                 train_split: str = "train", val_split: str = "val", test_split: str = "test"):
        super().__init__()
        self.root = Path(root).expanduser()
        self.keep_difficult = keep_difficult
        self.lists = {"train": train_split, "val": val_split, "test": test_split}
        if classes is not None:
            classes = [str(c) for c in classes]
            dup = sorted({c for c in classes if classes.count(c) > 1})
            if dup:
                raise DataConfigError(f"data.source.classes names {dup} more than once; give each class once")
        self._classes: Optional[list[str]] = classes
        self._objects: dict[str, list[tuple[DetectionRecord, list[str], Path]]] = {}   # split -> (rec, names, xml)

    def _list_file(self, split: str) -> Path:
        return self.root / "ImageSets" / "Main" / f"{self.lists[split]}.txt"

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(s for s in SPLITS if self._list_file(s).is_file())

    def check(self) -> None:
        layout = (f"expected the Pascal VOC layout {self.root}/JPEGImages/<id>.jpg, {self.root}/Annotations/<id>.xml "
                  f"and {self.root}/ImageSets/Main/{{train,val}}.txt; set data.root (data.source.root) to the folder "
                  "that holds them (e.g. VOCdevkit/VOC2012)")
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"no VOC data folder at {self.root}: {layout}")
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            if not (self.root / sub).is_dir():
                raise DatasetNotFoundError(f"missing folder {self.root / sub}: {layout}")
        if not self.splits:
            names = ", ".join(f"{v}.txt" for v in self.lists.values())
            raise DatasetNotFoundError(f"no split lists in {self.root / 'ImageSets/Main'} (looked for {names}): "
                                       f"{layout}")

    @property
    def class_names(self) -> list[str]:
        if self._classes is None:
            self.check()
            # the labelled splits only: VOC's test lists may come without annotations
            read = [s for s in self.splits if s != "test"] or list(self.splits)
            names = {n for s in read for _, obj, _ in self._parse_objects(s) for n in obj}
            self._classes = sorted(names)
            log.info("voc: %d classes found in the annotations of %s: %s (set data.source.classes to choose the "
                     "order)", len(self._classes), ", ".join(read), ", ".join(self._classes))
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _ids(self, split: str) -> list[str]:
        lines = self._list_file(split).read_text().splitlines()
        return [line.split()[0] for line in lines if line.strip()]   # per-class lists hold "<id> <1|-1>": keep <id>

    def _read_xml(self, xml: Path, image_id: int) -> tuple[DetectionRecord, list[str], int]:
        """One annotation file -> (record with placeholder labels, the kept objects' names, boxes dropped)."""
        if not xml.is_file():
            raise DatasetNotFoundError(f"missing annotation {xml} (listed in ImageSets/Main); add it or remove the "
                                       "id from the list")
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError as e:
            raise DataConfigError(f"cannot parse {xml}: {e}; fix the file or remove its id from ImageSets/Main")
        fname = root.findtext("filename") or ""
        path = self.root / "JPEGImages" / fname
        if not fname or not path.is_file():
            path = self.root / "JPEGImages" / f"{xml.stem}.jpg"
        width, height = (int(float(root.findtext(f"size/{k}") or 0)) for k in ("width", "height"))
        size: Optional[tuple[int, int]] = (height, width) if width > 0 and height > 0 else None
        if size is None:                            # some VOC-style files say 0 x 0: read the image's header
            try:
                with Image.open(path) as im:
                    size = (im.height, im.width)
            except OSError:
                pass                                # unreadable: __getitem__ skips it anyway
        names, boxes, crowd, dropped = [], [], [], 0
        for obj in root.iter("object"):
            name = (obj.findtext("name") or "").strip()
            bnd = obj.find("bndbox")
            if not name or bnd is None:
                raise DataConfigError(f"{xml}: an <object> lacks its <name> or <bndbox>; fix the annotation")
            difficult = int(float(obj.findtext("difficult") or 0)) == 1
            if difficult and not self.keep_difficult:
                continue
            x1, y1, x2, y2 = (float(bnd.findtext(k) or "nan") for k in ("xmin", "ymin", "xmax", "ymax"))
            if not (x2 > x1 and y2 > y1):           # zero extent as annotated (NaN too): degenerate
                dropped += 1
                continue
            names.append(name)
            boxes.append((x1 - 1.0, y1 - 1.0, x2, y2))   # 1-based inclusive -> 0-based pixel edges
            crowd.append(difficult)
        boxes_np, keep = clip_boxes(np.array(boxes, np.float32), size)
        dropped += int((~keep).sum())
        rec = DetectionRecord(path=path, image_id=image_id, size=size, boxes=boxes_np[keep],
                              labels=np.zeros(int(keep.sum()), np.int64),
                              iscrowd=np.array(crowd, np.uint8).reshape(-1)[keep])
        return rec, [n for n, k in zip(names, keep) if k], dropped

    def _parse_objects(self, split: str) -> list[tuple[DetectionRecord, list[str], Path]]:
        """The records of ``split`` with their object names and annotation files (labels: see :meth:`_parse`)."""
        if split not in self._objects:
            out, count, files = [], 0, []
            for i, stem in enumerate(self._ids(split)):
                xml = self.root / "Annotations" / f"{stem}.xml"
                rec, names, dropped = self._read_xml(xml, i)
                out.append((rec, names, xml))
                if dropped:
                    count += dropped
                    files.append(xml.name)
            self.dropped[split] = count
            log_dropped(self.name, split, count, files)
            self._objects[split] = out
        return self._objects[split]

    def _parse(self, split: str) -> list[DetectionRecord]:
        index = {c: k for k, c in enumerate(self.class_names)}
        records = []
        for rec, names, xml in self._parse_objects(split):
            unknown = sorted(set(names) - index.keys())
            if unknown:
                raise DataConfigError(
                    f"{xml} has objects named {unknown}, which are "
                    f"not in data.source.classes {self.class_names}: add them to the list, or set "
                    "data.source.classes=null to take the classes from the annotations")
            records.append(replace(rec, labels=np.array([index[n] for n in names], np.int64)))
        self._objects.pop(split, None)               # the names are no longer needed
        return records


# ----------------------------------------------------------------------------------------------------------- COCO

class COCODetection(DetectionSource):
    """COCO layout: ``root/annotations/instances_<split><year>.json`` and images in ``root/<split><year>/``; a split
    exists when its json does. Category ids map to contiguous labels 0..K-1 in the order of their ids (the
    categories of the train json, or of the first json found); ``class_names`` are their names. Boxes (x, y, w, h)
    become XYXY; ``iscrowd`` is kept (crowd regions: not scored, no loss); images without annotations are kept
    with no boxes. ``with_masks``: instance masks decoded from the polygons / RLE with pycocotools.
    """

    name = "coco"

    def __init__(self, root: str, year: str = "2017", with_masks: bool = False):
        super().__init__()
        self.root = Path(root).expanduser()
        self.year, self.with_masks = str(year), with_masks
        self._cat_index: Optional[dict[int, int]] = None
        self._class_names: Optional[list[str]] = None

    def ann_file(self, split: str) -> Path:
        return self.root / "annotations" / f"instances_{split}{self.year}.json"

    def image_dir(self, split: str) -> Path:
        return self.root / f"{split}{self.year}"

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(s for s in SPLITS if self.ann_file(s).is_file())

    def check(self) -> None:
        y = self.year
        layout = (f"expected the COCO layout {self.root}/annotations/instances_{{train,val}}{y}.json with the images "
                  f"in {self.root}/train{y}/ and {self.root}/val{y}/; set data.root (data.source.root) to that "
                  "folder, or data.source.year to the year in the file names")
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"no COCO data folder at {self.root}: {layout}")
        if not (self.root / "annotations").is_dir():
            raise DatasetNotFoundError(f"missing folder {self.root / 'annotations'}: {layout}")
        if not self.splits:
            raise DatasetNotFoundError(f"no instances_<split>{y}.json in {self.root / 'annotations'}: {layout}")
        for split in self.splits:
            if not self.image_dir(split).is_dir():
                raise DatasetNotFoundError(f"missing folder {self.image_dir(split)} (the images of "
                                           f"{self.ann_file(split).name}): {layout}")
        if self.with_masks:
            try:
                import pycocotools.mask  # noqa: F401
            except ImportError as e:
                raise DataConfigError("data.source.with_masks=true decodes COCO polygons / RLE with pycocotools: "
                                      "pip install pycocotools") from e

    def _read_json(self, split: str) -> dict:
        path = self.ann_file(split)
        try:
            with open(path) as f:
                return json.load(f)
        except json.JSONDecodeError as e:
            raise DataConfigError(f"cannot parse {path}: {e}; re-download or fix the file") from e

    def _set_categories(self, categories: list[dict]) -> None:
        cats = sorted(categories, key=lambda c: int(c["id"]))
        self._cat_index = {int(c["id"]): k for k, c in enumerate(cats)}
        self._class_names = [str(c["name"]) for c in cats]

    def _ensure_categories(self) -> None:
        if self._cat_index is None:
            self.check()
            first = "train" if "train" in self.splits else self.splits[0]
            self.records(first)                     # parsing the category source sets them

    @property
    def class_names(self) -> list[str]:
        self._ensure_categories()
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _parse(self, split: str) -> list[DetectionRecord]:
        data = self._read_json(split)
        source = "train" if "train" in self.splits else self.splits[0]
        if split == source:
            if not data.get("categories"):
                raise DataConfigError(f"{self.ann_file(split)} has no categories; a COCO instances json lists them")
            self._set_categories(data["categories"])
        else:
            self._ensure_categories()
        per_image: dict[int, list[dict]] = {}
        for ann in data.get("annotations", []):
            per_image.setdefault(int(ann["image_id"]), []).append(ann)
        records, count, files = [], 0, []
        folder = self.image_dir(split)
        for img in data.get("images", []):
            image_id, size = int(img["id"]), (int(img["height"]), int(img["width"]))
            anns = [a for a in per_image.get(image_id, []) if not a.get("ignore", 0)]
            unknown = sorted({int(a["category_id"]) for a in anns} - self._cat_index.keys())
            if unknown:
                raise DataConfigError(f"{self.ann_file(split)}: annotations of image {image_id} use category ids "
                                      f"{unknown}, which the categories of {self.ann_file(source).name} lack; use "
                                      "annotation files with the same categories")
            xywh = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
            xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
            boxes, keep = clip_boxes(xyxy, size)
            if not keep.all():
                count += int((~keep).sum())
                files.append(img["file_name"])
            kept = [a for a, k in zip(anns, keep) if k]
            records.append(DetectionRecord(
                path=folder / img["file_name"], image_id=image_id, size=size, boxes=boxes[keep],
                labels=np.array([self._cat_index[int(a["category_id"])] for a in kept], np.int64),
                iscrowd=np.array([int(a.get("iscrowd", 0)) for a in kept], np.uint8),
                segs=[a.get("segmentation") for a in kept] if self.with_masks else None,
                area=np.array([float(a["area"]) if a.get("area") else float((b[2] - b[0]) * (b[3] - b[1]))
                               for a, b in zip(kept, boxes[keep])], np.float32).reshape(-1)))
        self.dropped[split] = count
        log_dropped(self.name, split, count, files)
        return records


# ----------------------------------------------------------------------------------------------------- transforms

def _rescale(sample: dict, s: float) -> tuple[dict, tuple[int, int]]:
    """Scale the image, boxes and masks of ``sample`` by exactly ``s`` (pixel edge x -> s * x on both axes).
    Returns the sample and the new (h, w) = floor of the scaled size."""
    image = sample["image"]
    H, W = image.shape[-2:]
    # F.interpolate with a scale factor (not a size) samples at exactly (i + 0.5) / s - 0.5; the output size is
    # floor(H * s). A hair above s keeps floor(640 * (64 / 640)) from rounding down to 63.
    s_img = s * (1.0 + 1e-7)
    h, w = math.floor(H * s_img), math.floor(W * s_img)
    out = dict(sample)
    for key, value in sample.items():
        if isinstance(value, tv_tensors.Image):           # (3, H, W) float -> (3, h, w), antialiased when shrinking
            x = TF.interpolate(value[None].as_subclass(torch.Tensor), scale_factor=s_img, mode="bilinear",
                               antialias=True, align_corners=False, recompute_scale_factor=False)[0]
            out[key] = tv_tensors.wrap(x, like=value)
        elif isinstance(value, tv_tensors.BoundingBoxes):   # XYXY: every coordinate times s
            out[key] = tv_tensors.wrap(value.as_subclass(torch.Tensor) * s, like=value, canvas_size=(h, w))
        elif isinstance(value, tv_tensors.Mask):            # (n, H, W) uint8 -> (n, h, w), nearest pixel centre
            m = value.as_subclass(torch.Tensor)
            if m.shape[0] == 0:
                x = m.new_zeros((0, h, w))
            else:
                x = TF.interpolate(m[None], scale_factor=s_img, mode="nearest-exact",
                                   recompute_scale_factor=False)[0]
            out[key] = tv_tensors.wrap(x, like=value)
    return out, (h, w)


def _crop_pad(sample: dict, top: int, left: int, h: int, w: int, size: int, fill: Sequence[float],
              crop: bool = True) -> dict:
    """Crop the (h, w) window at (top, left) (``crop``; else the sample is (h, w) already), then pad bottom/right
    to size x size (the image with ``fill``, masks with 0)."""
    out = dict(sample)
    for key, value in sample.items():
        if isinstance(value, _DENSE_TYPES):
            x = F.crop(value, top, left, h, w) if crop else value    # boxes: shifted and clamped to the window
            pad_fill: Any = list(fill) if isinstance(value, tv_tensors.Image) else 0
            out[key] = F.pad(x, [0, 0, size - w, size - h], fill=pad_fill)   # [left, top, right, bottom]
    return out


def _labels_and_crowd(sample: dict) -> tuple[torch.Tensor, ...]:
    """What SanitizeBoundingBoxes drops along with a box (instance masks it finds itself)."""
    return tuple(sample[k] for k in ("labels", "iscrowd", "area") if k in sample)


class DetectionTransform:
    """The v2 pipeline of one split (see the module docstring): raw sample -> the sample the collate batches::

        {"image": float (3, S, S) normalised, "boxes": float (n, 4) XYXY pixels of it, "labels": int64 (n,),
         "iscrowd": uint8 (n,), "area": float32 (n,) original pixels (not rescaled: mAP's size buckets),
         "masks": uint8 (n, S, S) (when the source gives them), "image_id": int,
         "orig_size": int64 (2,) (H, W), "image_size": int64 (2,) valid (h, w), "scale": float (resize factor)}
    """

    def __init__(self, train: bool, img_size: int, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), policy: Policy = "lsj",
                 scale_range: Sequence[float] = (0.1, 2.0), hflip: float = 0.5, color_jitter: float = 0.0):
        if policy not in POLICIES:
            raise ValueError(f"data.augment.policy={policy!r} is not a detection policy; choose one of "
                             f"{', '.join(POLICIES)} (lsj: large-scale jitter, resize: resize + flip)")
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"data.augment.scale_range={list(scale_range)} must be [low, high] with 0 < low <= high, "
                             "e.g. [0.1, 2.0] (ViTDet)")
        if not 0.0 <= hflip <= 1.0 or color_jitter < 0:
            raise ValueError(f"data.augment.hflip={hflip} must be a probability in [0, 1] and color_jitter="
                             f"{color_jitter} >= 0")
        if int(img_size) < 1:
            raise ValueError(f"data.img_size={img_size} must be a positive number of pixels, e.g. 512")
        self.train, self.size, self.policy = train, int(img_size), policy
        self.scale_range = (lo, hi)
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.flip = v2.RandomHorizontalFlip(hflip) if train and hflip > 0 else None
        self.jitter = (v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter)
                       if train and color_jitter > 0 else None)
        # boxes cut below 1 px by the crop carry no signal; labels / iscrowd / masks follow the boxes kept
        self.sanitize = v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=_labels_and_crowd)

    def __repr__(self) -> str:
        return (f"DetectionTransform(train={self.train}, img_size={self.size}, policy={self.policy!r}, "
                f"scale_range={self.scale_range}, flip={self.flip}, jitter={self.jitter})")

    def __call__(self, sample: dict) -> dict:
        sample = dict(sample)
        image = sample["image"]
        H, W = image.shape[-2:]
        S = self.size
        sample["image"] = F.to_dtype(image, torch.float32, scale=True)          # (3, H, W) in [0, 1]
        if self.flip is not None:
            sample = self.flip(sample)
        if self.jitter is not None:                   # on the image alone, before the padding (which stays the mean)
            sample["image"] = self.jitter(sample["image"])
        s = S / max(H, W)                             # the longer side to S
        lsj = self.train and self.policy == "lsj"
        if lsj:                                       # ScaleJitter's factor: U(scale_range) x the fit to S x S
            lo, hi = self.scale_range
            s *= lo + (hi - lo) * float(torch.rand(()))
        s = max(s, 1.0 / min(H, W))                   # keep at least one pixel on the shorter side
        sample, (h, w) = _rescale(sample, s)
        top = left = 0
        if lsj:                                       # a random S x S window of the jittered image (or all of it)
            ch, cw = min(h, S), min(w, S)
            top = int(torch.randint(h - ch + 1, ()))
            left = int(torch.randint(w - cw + 1, ()))
            h, w = ch, cw
        # the valid (h, w) region lands at the top-left. Train: the crop also clamps the boxes to it. Eval: no
        # crop, so a box at the far edge keeps its exact scaled coordinate (up to 1 px past the floor-ed size).
        sample = _crop_pad(sample, top, left, h, w, S, self.mean, crop=self.train)
        if self.train:
            sample = self.sanitize(sample)
        out = {"image": F.normalize(sample["image"], self.mean, self.std).as_subclass(torch.Tensor),  # (3, S, S)
               "boxes": sample["boxes"].as_subclass(torch.Tensor).float().reshape(-1, 4),             # (n, 4)
               "labels": sample["labels"], "iscrowd": sample["iscrowd"]}
        if "area" in sample:                          # original pixels, for mAP's size buckets (not rescaled)
            out["area"] = sample["area"]
        if "masks" in sample:
            out["masks"] = sample["masks"].as_subclass(torch.Tensor)                                 # (n, S, S)
        orig = sample.get("orig_size", (H, W))
        out["image_id"] = int(sample.get("image_id", -1))
        out["orig_size"] = torch.as_tensor(tuple(orig), dtype=torch.int64)
        out["image_size"] = torch.tensor([h, w], dtype=torch.int64)
        out["scale"] = float(s)
        return out


# -------------------------------------------------------------------------------------------------------- collate

def detection_collate(samples: list[dict]) -> dict:
    """Transformed samples -> the detection batch of the dense contract (vitlab/data/dense.py): images stacked,
    per-image boxes / labels / iscrowd / masks as lists, the rest as tensors."""
    if not samples:
        raise ValueError("detection_collate got an empty list of samples")
    shapes = {tuple(s["image"].shape) for s in samples}
    if len(shapes) > 1:
        raise ValueError(f"detection_collate needs images of one size, got {sorted(shapes)}: build the dataset "
                         "with source.build_transform(train, img_size), which pads every image to img_size")
    batch: dict[str, Any] = {"image": torch.stack([s["image"] for s in samples])}        # (B, 3, S, S)
    keys = ["boxes", "labels", "iscrowd"] + [k for k in ("area", "masks") if all(k in s for s in samples)]
    for key in keys:
        batch[key] = [s[key] for s in samples]
    batch["image_id"] = torch.tensor([int(s.get("image_id", -1)) for s in samples], dtype=torch.int64)   # (B,)
    for key in ("orig_size", "image_size"):                                                             # (B, 2)
        batch[key] = torch.stack([torch.as_tensor(s[key], dtype=torch.int64) for s in samples])
    batch["scale"] = torch.tensor([float(s.get("scale", 1.0)) for s in samples], dtype=torch.float32)   # (B,)
    batch["index"] = torch.tensor([int(s.get("index", -1)) for s in samples], dtype=torch.int64)
    batch["corrupt"] = torch.tensor([int(s.get("corrupt", 0)) for s in samples], dtype=torch.int64)
    return batch
