"""Weighted k-nearest-neighbour classification of frozen features (DINO's kNN evaluation).

The protocol of Wu et al. 2018 ("Unsupervised Feature Learning via Non-Parametric Instance Discrimination") as
used by DINO (Caron et al. 2021, ``eval_knn.py``): features are L2-normalised, each test feature retrieves its
``k`` most cosine-similar train features, and every neighbour votes for its class with weight
``exp(similarity / T)``. The class scores are those summed weights (here normalised to sum to one).
Pure torch: it runs on whatever device the features are on.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("vitlab")


def _check(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, num_classes: int) -> None:
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got train {tuple(train_feats.shape)} and "
                         f"test {tuple(test_feats.shape)}")
    if len(train_feats) == 0:
        raise ValueError("kNN needs at least one train feature; the train split is empty")
    if train_labels.shape != (len(train_feats),):
        raise ValueError(f"train_labels must be ({len(train_feats)},), got {tuple(train_labels.shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if len(train_labels) and (int(train_labels.min()) < 0 or int(train_labels.max()) >= num_classes):
        raise ValueError(f"train labels must lie in [0, {num_classes}), got [{int(train_labels.min())}, "
                         f"{int(train_labels.max())}]; is num_classes right?")


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, num_classes: int,
                 k: int = 20, temperature: float = 0.07, chunk_size: int = 1024) -> torch.Tensor:
    """Class probabilities (N_test, C) from the weighted vote of each test feature's ``k`` nearest train features.

    Args:
        train_feats: (N_train, D) features of the labelled reference set (need not be normalised).
        train_labels: (N_train,) long class indices in [0, num_classes).
        test_feats: (N_test, D) features to classify.
        k: neighbours per test feature (DINO: 20); clipped to N_train.
        temperature: T in the vote weight exp(cos_sim / T) (DINO: 0.07).
        chunk_size: test features per similarity matmul; memory is chunk_size x N_train floats.

    The argmax is the prediction. ``k=1`` is plain nearest-neighbour; a large ``temperature`` approaches an
    unweighted majority vote.
    """
    _check(train_feats, train_labels, test_feats, num_classes)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    k = min(k, len(train_feats))
    train = F.normalize(train_feats.float(), dim=1)                             # (N_train, D)
    test = F.normalize(test_feats.float(), dim=1).to(train.device)              # (N_test, D)
    labels = train_labels.to(train.device).long()
    out = []
    for start in range(0, len(test), chunk_size):
        sim = test[start:start + chunk_size] @ train.T                          # (b, N_train) cosine similarity
        top_sim, top_idx = sim.topk(k, dim=1)                                   # (b, k)
        # exp(sim / T), shifted by the row max for float32 safety; the shift cancels in the normalisation below
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()              # (b, k)
        scores = torch.zeros(len(top_sim), num_classes, device=train.device)    # (b, C)
        scores.scatter_add_(1, labels[top_idx], weights)                        # sum of the weights per class
        out.append(scores / scores.sum(dim=1, keepdim=True))
    if not out:
        return torch.zeros(0, num_classes, device=train.device)
    return torch.cat(out)


@torch.no_grad()
def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, k: int = 20, temperature: float = 0.07,
                 chunk_size: int = 1024) -> dict[str, float]:
    """Top-1 (and top-5 when there are at least 5 classes) accuracy of :func:`knn_classify` on ``test_labels``.

    Returns ``{"knn_top1": float, "knn_top5": float}`` (no ``knn_top5`` with fewer than 5 classes).
    """
    if test_labels.shape != (len(test_feats),):
        raise ValueError(f"test_labels must be ({len(test_feats)},), got {tuple(test_labels.shape)}")
    if len(test_feats) == 0:
        raise ValueError("kNN accuracy needs at least one test feature; the evaluation split is empty")
    if k > len(train_feats):
        log.info("kNN: k=%d is more than the %d train features; using k=%d", k, len(train_feats), len(train_feats))
    probs = knn_classify(train_feats, train_labels, test_feats, num_classes, k, temperature, chunk_size)
    target = test_labels.to(probs.device).long()
    # argmax: a tie between classes goes to the lower class index, a deterministic answer
    out = {"knn_top1": (probs.argmax(dim=1) == target).float().mean().item()}
    if num_classes >= 5:
        top5 = probs.topk(5, dim=1).indices                                     # (N_test, 5)
        out["knn_top5"] = (top5 == target[:, None]).any(dim=1).float().mean().item()
    return out
