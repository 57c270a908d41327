"""Data sources, transforms and splits. Never imports models or Lightning."""

from vitlab.data.base import (SPLITS, ClassificationSource, CorruptDataError, DataConfigError, DataInfo,
                              DatasetNotFoundError, DataSource, DictDataset, seeded_split)
from vitlab.data.cifar import CIFAR
from vitlab.data.dense import DenseDataset, DenseSource
from vitlab.data.detection import COCODetection, DetectionSource, VOCDetection, detection_collate
from vitlab.data.digits import Digits
from vitlab.data.filelist import FileDataset, FileList
from vitlab.data.hf import HFDataset, HFImageDataset
from vitlab.data.imagefolder import ImageFolder
from vitlab.data.imagenet import ImageNet
from vitlab.data.mixup import build_mixup
from vitlab.data.mnist import MNIST
from vitlab.data.multilabel import MultiHotDataset, MultiLabelFileList
from vitlab.data.multicrop import MultiCropTransform
from vitlab.data.segmentation import ADE20K, CamVid, SegFolder, SegmentationSource, segmentation_collate
from vitlab.data.transforms import build_transforms

__all__ = ["ClassificationSource", "CorruptDataError", "DataConfigError", "DataInfo", "DataSource", "DatasetNotFoundError",
           "DictDataset", "SPLITS", "seeded_split", "CIFAR", "Digits", "FileDataset", "FileList", "HFDataset",
           "HFImageDataset", "ImageFolder", "ImageNet", "MNIST", "MultiCropTransform", "MultiHotDataset", "MultiLabelFileList", "build_mixup", "build_transforms",
           # detection and segmentation
           "DenseDataset", "DenseSource", "COCODetection", "DetectionSource", "VOCDetection", "detection_collate",
           "ADE20K", "CamVid", "SegFolder", "SegmentationSource", "segmentation_collate"]
