"""Task heads with their losses and metrics: the targets of conf/task/*.yaml."""

from vitlab.heads.classification import ClassificationHead, ClassificationTask, soft_target_cross_entropy
from vitlab.heads.detection import CanvasTransform, DetectionTask
from vitlab.heads.detr import DETRHead, HungarianMatcher, SetCriterion
from vitlab.heads.pyramid import FeatureNeck, SimpleFeaturePyramid, TapPyramid, pyramid_strides
from vitlab.heads.seg_heads import ATMHead, FCNHead, LinearSegHead, UPerHead
from vitlab.heads.segmentation import SegmentationTask

__all__ = ["ClassificationHead", "ClassificationTask", "soft_target_cross_entropy",
           "FeatureNeck", "SimpleFeaturePyramid", "TapPyramid", "pyramid_strides"]
__all__ += ["DETRHead", "HungarianMatcher", "SetCriterion"]
__all__ += ["SegmentationTask", "LinearSegHead", "UPerHead", "FCNHead", "ATMHead"]
__all__ += ["DetectionTask", "CanvasTransform"]
