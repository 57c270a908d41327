"""Tasks: a head, its loss, its metrics and how a step is computed from the backbone and the batch, behind one
contract (:mod:`vitlab.tasks.base`). The targets of conf/task/*.yaml."""

from vitlab.tasks.base import BuildContext, LoadedModel, Task
from vitlab.tasks.classification import ClassificationHead, ClassificationTask, soft_target_cross_entropy
from vitlab.tasks.detection import CanvasTransform, DetectionTask
from vitlab.tasks.detr import DETRHead, HungarianMatcher, SetCriterion
from vitlab.tasks.diffusion import (DiffusionTask, GaussianDiffusion, LatentAutoencoder, RectifiedFlow, SampleJudge,
                                    autoencoder_geometry, beta_schedule, ddim_sample, ddpm_sample, euler_sample,
                                    guided, load_autoencoder, load_judge, sample)
from vitlab.tasks.multilabel import MultiLabelTask
from vitlab.tasks.pyramid import FeatureNeck, SimpleFeaturePyramid, TapPyramid, pyramid_strides
from vitlab.tasks.seg_heads import ATMHead, FCNHead, LinearSegHead, UPerHead
from vitlab.tasks.segmentation import SegmentationTask

__all__ = ["BuildContext", "LoadedModel", "Task",
           # classification
           "ClassificationHead", "ClassificationTask", "MultiLabelTask", "soft_target_cross_entropy",
           # detection
           "DetectionTask", "CanvasTransform", "DETRHead", "HungarianMatcher", "SetCriterion",
           # segmentation
           "SegmentationTask", "LinearSegHead", "UPerHead", "FCNHead", "ATMHead",
           # diffusion
           "DiffusionTask", "LatentAutoencoder", "SampleJudge", "autoencoder_geometry", "load_autoencoder",
           "load_judge", "GaussianDiffusion", "RectifiedFlow", "beta_schedule", "ddim_sample", "ddpm_sample",
           "euler_sample", "guided", "sample",
           # multi-scale features
           "FeatureNeck", "SimpleFeaturePyramid", "TapPyramid", "pyramid_strides"]
