"""scikit-learn's handwritten digits: 1,797 real 8x8 images, 10 classes, bundled (no download).

The embedded default dataset of vitlab. It has no official split, so train,
val and test come from one seeded split.
"""

from __future__ import annotations

import numpy as np
import torch

from vitlab.data.base import ArrayDataset, ClassificationSource, seeded_split


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    # out of place: from_numpy shares memory and .float() on float32 is a no-op, so div_ would rescale the
    # stored array again on every access
    return torch.from_numpy(img).float().div(16.0).unsqueeze(0)          # (1, 8, 8) in [0, 1]


class Digits(ClassificationSource):
    name = "digits"
    num_classes = 10
    in_chans = 1
    mean = (0.3053,)       # statistics of all 1,797 images after scaling to [0, 1]
    std = (0.3760,)
    class_names = [str(i) for i in range(10)]

    def __init__(self, val_fraction: float = 0.1, test_fraction: float = 0.2, split_seed: int = 0):
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed

    def _arrays(self):
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images.astype(np.float32), d.target.astype(np.int64)

    def _load(self, split: str) -> ArrayDataset:
        images, labels = self._arrays()
        test, val, train = seeded_split(len(labels), [self.test_fraction, self.val_fraction], self.split_seed)
        idx = {"train": train, "val": val, "test": test}[split]
        return ArrayDataset(images[idx], labels[idx], _to_tensor)
