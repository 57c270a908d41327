"""Evaluation protocols torchmetrics lacks: kNN and linear probes on frozen features. Pure torch.

Classification accuracy uses torchmetrics directly (see vitlab/tasks/classification.py). The command line
(``vitlab-eval protocol=knn|linear``) and the online kNN monitor (vitlab/lit/probes.py) build on these.
"""

from vitlab.metrics.features import extract_features
from vitlab.metrics.generative import GenerativeMetrics
from vitlab.metrics.knn import knn_accuracy, knn_classify
from vitlab.metrics.linear_probe import DEFAULT_LRS, LinearHeads, linear_probe

__all__ = ["DEFAULT_LRS", "GenerativeMetrics", "LinearHeads", "extract_features", "knn_accuracy", "knn_classify",
           "linear_probe"]
