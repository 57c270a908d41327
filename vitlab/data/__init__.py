"""Data sources, transforms and splits. Never imports models or Lightning."""

from vitlab.data.base import (ClassificationSource, DatasetNotFoundError, DictDataset, SPLITS, seeded_split)
from vitlab.data.cifar import CIFAR
from vitlab.data.digits import Digits
from vitlab.data.imagefolder import ImageFolder
from vitlab.data.transforms import build_transforms

__all__ = ["ClassificationSource", "DatasetNotFoundError", "DictDataset", "SPLITS", "seeded_split", "CIFAR",
           "Digits", "ImageFolder", "build_transforms"]
