"""Task heads with their losses and metrics: the targets of conf/task/*.yaml."""

from vitlab.heads.classification import ClassificationHead, ClassificationTask, soft_target_cross_entropy

__all__ = ["ClassificationHead", "ClassificationTask", "soft_target_cross_entropy"]
