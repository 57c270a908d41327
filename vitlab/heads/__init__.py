"""Task heads with their losses and metrics: the targets of conf/task/*.yaml."""

from vitlab.heads.autoencoder import LatentAutoencoder, autoencoder_geometry, load_autoencoder
from vitlab.heads.classification import ClassificationHead, ClassificationTask, soft_target_cross_entropy
from vitlab.heads.dense import DenseTask
from vitlab.heads.detection import CanvasTransform, DetectionTask
from vitlab.heads.diffusion import DiffusionTask
from vitlab.heads.diffusion_objectives import GaussianDiffusion, RectifiedFlow, beta_schedule
from vitlab.heads.diffusion_samplers import ddim_sample, ddpm_sample, euler_sample, guided, sample
from vitlab.heads.detr import DETRHead, HungarianMatcher, SetCriterion
from vitlab.heads.pyramid import FeatureNeck, SimpleFeaturePyramid, TapPyramid, pyramid_strides
from vitlab.heads.seg_heads import ATMHead, FCNHead, LinearSegHead, UPerHead
from vitlab.heads.segmentation import SegmentationTask

__all__ = ["ClassificationHead", "ClassificationTask", "soft_target_cross_entropy", "DenseTask",
           # detection
           "DetectionTask", "CanvasTransform", "DETRHead", "HungarianMatcher", "SetCriterion",
           # segmentation
           "SegmentationTask", "LinearSegHead", "UPerHead", "FCNHead", "ATMHead",
           # diffusion
           "DiffusionTask", "LatentAutoencoder", "autoencoder_geometry", "load_autoencoder", "GaussianDiffusion", "RectifiedFlow", "beta_schedule", "ddim_sample", "ddpm_sample",
           "euler_sample", "guided", "sample",
           # multi-scale features
           "FeatureNeck", "SimpleFeaturePyramid", "TapPyramid", "pyramid_strides"]
