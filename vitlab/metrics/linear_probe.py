"""Linear-probe evaluation: a linear classifier trained on frozen, pre-extracted features.

The protocol, as in MAE (He et al. 2022, ``main_linprobe.py``) and DINOv2 (Oquab et al. 2023, ``linear.py``):

- features are standardised with the *train* statistics, the deterministic equivalent of MAE's
  ``BatchNorm1d(affine=False)`` in front of the linear layer;
- a grid of learning rates is trained at once, one linear head per lr in one batched module (DINOv2's grid);
  SGD with momentum 0.9 and a cosine schedule, zero-initialised heads, cross-entropy;
- the lr is *chosen on a held-out part of the train features* (``holdout_fraction``, seeded), never on the
  test labels; then one head with the chosen lr is **retrained on all train features** (standardised with
  the statistics of all of them) and that head is reported on the test features.

Everything is seeded (the holdout split and the batch order), so a run is reproducible. Pure torch: pass
``device="cuda"`` for large feature sets; 5k x 192 features take a few seconds on one CPU core.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("vitlab")

# Standardised features: lr 1e-3 .. 3 covers under- to over-shooting for SGD on a linear softmax classifier.
DEFAULT_LRS: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)


class LinearHeads(nn.Module):
    """``num_heads`` independent linear classifiers over the same input: (B, D) -> logits (B, L, C).

    One parameter pair per head, so each head can sit in its own optimizer param group (its own lr); the forward
    pass concatenates them into one (D, L*C) matmul. Zero-initialised: the problem is convex, and zeros make the
    start independent of any RNG.
    """

    def __init__(self, num_heads: int, dim: int, num_classes: int):
        super().__init__()
        self.weight = nn.ParameterList([nn.Parameter(torch.zeros(dim, num_classes)) for _ in range(num_heads)])
        self.bias = nn.ParameterList([nn.Parameter(torch.zeros(num_classes)) for _ in range(num_heads)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.cat(list(self.weight), dim=1)                           # (D, L*C)
        b = torch.cat(list(self.bias))                                    # (L*C,)
        return torch.addmm(b, x, w).view(len(x), len(self.weight), -1)    # (B, L, C)


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """(x - mean) / sqrt(var + 1e-6) with the statistics of ``train``: BatchNorm1d(affine=False) at its limit."""
    mean = train.mean(dim=0)
    std = (train.var(dim=0, unbiased=False) + 1e-6).sqrt()
    return [(x - mean) / std for x in (train, *others)]


def _train_heads(x: torch.Tensor, y: torch.Tensor, num_classes: int, lrs: Sequence[float], epochs: int,
                 batch_size: int, weight_decay: float, generator: torch.Generator) -> LinearHeads:
    """Train one head per lr on (x, y) with SGD (momentum 0.9) and a per-step cosine schedule to zero."""
    heads = LinearHeads(len(lrs), x.shape[1], num_classes).to(x.device)
    groups = [{"params": [w, b], "lr": float(lr)} for w, b, lr in zip(heads.weight, heads.bias, lrs, strict=True)]
    opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator).to(x.device)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            logits = heads(x[idx])                                        # (b, L, C)
            target = y[idx, None].expand(-1, len(lrs))                    # (b, L)
            # the sum over heads of each head's mean loss: every head gets exactly its own gradient
            loss = F.cross_entropy(logits.transpose(1, 2), target, reduction="sum") / len(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return heads


@torch.no_grad()
def _top1_and_loss(heads: LinearHeads, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head: top-1 accuracy (L,) and mean cross-entropy (L,) on (x, y)."""
    logits = heads(x)                                                     # (N, L, C)
    target = y[:, None].expand(-1, logits.shape[1])                       # (N, L)
    top1 = (logits.argmax(dim=2) == target).float().mean(dim=0)
    loss = F.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(dim=0)
    return top1, loss


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, epochs: int = 100, batch_size: int = 256,
                 lrs: Sequence[float] = DEFAULT_LRS, weight_decay: float = 0.0, holdout_fraction: float = 0.1,
                 seed: int = 0, device: torch.device | str = "cpu") -> dict[str, float]:
    """Train a linear classifier on frozen features; choose its lr on held-out train features; test it.

    Args:
        train_feats, train_labels: (N, D) features and (N,) labels the classifier learns from.
        test_feats, test_labels: (M, D) and (M,): only used for the final report, never for a choice.
        num_classes: C.
        epochs: passes over the train features (for the grid and for the final retraining).
        batch_size: features per SGD step.
        lrs: the learning-rate grid (one head each, trained together).
        weight_decay: SGD weight decay (MAE's linear probe uses 0).
        holdout_fraction: the share of the train features held out to choose the lr (0 only with one lr).
        seed: seeds the holdout split and the batch order.
        device: where to train ("cuda" for large sets).

    Returns:
        ``linear_top1`` / ``linear_top5`` (C >= 5 only) on the test features, ``linear_lr`` (the chosen lr) and
        ``linear_holdout_top1`` (the chosen head's accuracy on the held-out train features; nan without a holdout).
    """
    lrs = [float(lr) for lr in lrs]
    if not lrs or any(lr <= 0 for lr in lrs):
        raise ValueError(f"lrs must be a non-empty list of positive learning rates, got {lrs}")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    if holdout_fraction == 0.0 and len(lrs) > 1:
        raise ValueError(f"{len(lrs)} learning rates to choose from but holdout_fraction=0: the lr is chosen on "
                         "held-out train features, so set holdout_fraction > 0 (e.g. 0.1) or give a single lr")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got epochs={epochs}, batch_size={batch_size}")
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got train {tuple(train_feats.shape)} and "
                         f"test {tuple(test_feats.shape)}")
    if train_labels.shape != (len(train_feats),) or test_labels.shape != (len(test_feats),):
        raise ValueError("labels must be (N,) and match their features: got train "
                         f"{tuple(train_labels.shape)} for {len(train_feats)}, test {tuple(test_labels.shape)} "
                         f"for {len(test_feats)}")
    if len(test_feats) == 0:
        raise ValueError("the linear probe needs at least one test feature; the evaluation split is empty")
    lo, hi = int(train_labels.min()), int(train_labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"train labels must lie in [0, {num_classes}), got [{lo}, {hi}]; is num_classes right?")

    device = torch.device(device)
    x_all = train_feats.float().to(device)
    y_all = train_labels.long().to(device)
    x_test = test_feats.float().to(device)
    y_test = test_labels.long().to(device)
    generator = torch.Generator().manual_seed(seed)

    # 1. the lr grid, trained on part of the train features and compared on the rest (seeded split)
    holdout_top1 = float("nan")
    best = 0
    if holdout_fraction > 0:
        n_hold = max(1, round(holdout_fraction * len(x_all)))
        if n_hold >= len(x_all):
            raise ValueError(f"only {len(x_all)} train features: too few to hold out {holdout_fraction:.0%} and "
                             "still train; lower holdout_fraction or give more train features")
        perm = torch.randperm(len(x_all), generator=generator).to(device)
        hold, fit = perm[:n_hold], perm[n_hold:]
        x_fit, x_hold = _standardise(x_all[fit], x_all[hold])
        heads = _train_heads(x_fit, y_all[fit], num_classes, lrs, epochs, batch_size, weight_decay, generator)
        top1, loss = _top1_and_loss(heads, x_hold, y_all[hold])
        top1_l, loss_l = top1.tolist(), loss.tolist()
        # the best held-out top-1; ties (common on easy data) go to the lower held-out loss
        best = max(range(len(lrs)), key=lambda i: (top1_l[i], -loss_l[i]))
        holdout_top1 = top1_l[best]
        log.info("linear probe: held-out top-1 per lr: %s -> lr %g",
                 ", ".join(f"{lr:g}: {a:.4f}" for lr, a in zip(lrs, top1_l, strict=True)), lrs[best])
        if len(lrs) > 2 and lrs[best] in (min(lrs), max(lrs)):
            log.warning("linear probe: the chosen lr %g is at the edge of the grid %s; a wider grid may do better "
                        "(extend lrs)", lrs[best], [f"{lr:g}" for lr in lrs])

    # 2. the chosen lr, retrained on all train features, reported on the test features
    lr = lrs[best]
    x_train, x_eval = _standardise(x_all, x_test)
    head = _train_heads(x_train, y_all, num_classes, [lr], epochs, batch_size, weight_decay, generator)
    with torch.no_grad():
        logits = head(x_eval)[:, 0]                                       # (M, C)
    out = {"linear_top1": (logits.argmax(dim=1) == y_test).float().mean().item()}
    if num_classes >= 5:
        out["linear_top5"] = (logits.topk(5, dim=1).indices == y_test[:, None]).any(dim=1).float().mean().item()
    out.update(linear_lr=lr, linear_holdout_top1=holdout_top1)
    return out
