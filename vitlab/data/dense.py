"""What every dense-prediction data source provides (detection, semantic segmentation), and the shared pieces.

A dense source hands out, per split, a dataset of *raw samples*: dicts of torchvision ``tv_tensors`` that
torchvision's v2 transforms move together (a flip flips the image, its boxes and its mask)::

    detection:     {"image": tv_tensors.Image uint8 (3, H, W),
                    "boxes": tv_tensors.BoundingBoxes (n, 4) float, XYXY, absolute pixels, canvas (H, W),
                    "labels": int64 (n,) in [0, num_classes)        (no background index: heads shift as needed),
                    "iscrowd": uint8 (n,)  (crowd / 'difficult': no loss, not a miss), "area": float32 (n,) object area
                    in original pixels (COCO's annotation area, else the box's: mAP's size buckets),
                    "masks": tv_tensors.Mask uint8 (n, H, W)        (optional: instance masks, COCO polygons / RLE),
                    "image_id": int, "orig_size": (H, W)}
    segmentation:  {"image": tv_tensors.Image uint8 (3, H, W),
                    "mask": tv_tensors.Mask int64 (H, W)             (class per pixel; ignore_index where unlabelled),
                    "orig_size": (H, W)}

``source.build_transform(train, img_size, **augment)`` returns the v2 pipeline for a split (box-aware resize,
flip, large-scale jitter, normalisation); :class:`DenseDataset` applies it and skips unreadable images as
:class:`vitlab.data.base.DictDataset` does; ``source.collate`` batches the results into the batch dict the
tasks read (see the sources' modules). Nothing here imports models or Lightning.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

from torch.utils.data import Dataset

from vitlab.data.base import DECODE_ERRORS, CorruptDataError, DataSource, describe_item

log = logging.getLogger("vitlab")


class DenseSource(DataSource):
    """Base for detection and segmentation sources. Subclasses set the attributes and implement ``_load`` (the raw
    samples of a split), ``build_transform`` and ``collate``.

    ``task`` names the task family the data is for; the builder refuses a task of another family with the fix.
    ``ignore_index`` (segmentation): the mask value that marks unlabelled pixels (not scored, no loss).
    ``palette`` (optional): a colour per class, (num_classes, 3) uint8 values, for drawn predictions.
    """

    task: str = "?"                                   # "detection" | "segmentation"
    ignore_index: Optional[int] = None
    palette: Optional[Sequence[Sequence[int]]] = None
    label_kind = "dense"                              # boxes / masks: augmented jointly with their images

    def build_transform(self, train: bool, img_size: int, **augment: Any) -> Callable[[dict], dict]:
        raise NotImplementedError

    def wrap(self, dataset: Dataset, transform: Optional[Callable[[dict], dict]]) -> Dataset:
        return DenseDataset(dataset, transform)

    def collate(self, samples: list[dict]) -> dict:
        raise NotImplementedError


class DenseDataset(Dataset):
    """Raw samples -> ``transform(sample)`` plus ``"index"`` (the item returned) and ``"corrupt"`` (how many
    unreadable items were skipped to produce it). An item whose image cannot be read is skipped with a warning
    naming the file, as :class:`vitlab.data.base.DictDataset` does."""

    def __init__(self, base: Dataset, transform: Optional[Callable[[dict], dict]] = None, max_skips: int = 100):
        self.base, self.transform, self.max_skips = base, transform, max_skips
        self.warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        n = len(self.base)
        for skipped in range(min(self.max_skips, n)):
            j = (i + skipped) % n
            try:
                sample = self.base[j]
            except DECODE_ERRORS as e:
                if j not in self.warned:                     # once per file and worker process
                    self.warned.add(j)
                    log.warning("skipping unreadable image %s: %s: %s", describe_item(self.base, j),
                                type(e).__name__, e)
                continue
            sample = dict(sample)
            if self.transform is not None:
                sample = self.transform(sample)
            sample["index"], sample["corrupt"] = j, skipped
            return sample
        raise CorruptDataError(
            f"{min(self.max_skips, n)} consecutive items from {describe_item(self.base, i)} on could not be read "
            "(see the warnings above for the files). Check the dataset files (e.g. re-extract or re-download them).")
