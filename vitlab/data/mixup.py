"""Batch-level Mixup / CutMix with soft targets: timm's ``Mixup``, with its options and inputs checked.

Mixup (Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization") blends
each image with another, ``lam * x_i + (1 - lam) * x_j``; CutMix (Yun et al.
2019, "CutMix: Regularization Strategy to Train Strong Classifiers with
Localizable Features") pastes a box of ``x_j`` into ``x_i``. The targets mix
the same way, so a batch of hard labels (B,) becomes soft targets
(B, num_classes) that sum to 1, with label smoothing built in. The partner of
image i is image B-1-i (timm flips the batch), which is why the batch size must
be even. DeiT uses mixup 0.8, cutmix 1.0, switch 0.5, smoothing 0.1.

It runs on the training device after the batch transfer, on any dtype.
Randomness comes from NumPy's global generator (as in timm): seed it per
process (Lightning's ``seed_everything``).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import timm.data
import torch

MixMode = Literal["batch", "pair", "elem"]
MIX_MODES = ("batch", "pair", "elem")
OPTIONS = ("mixup_alpha", "cutmix_alpha", "cutmix_minmax", "prob", "switch_prob", "mode", "label_smoothing")


class MixupCutmix(timm.data.Mixup):
    """timm's :class:`timm.data.Mixup` whose ``__call__`` names the problem when a batch does not fit.

    ``(images (B, C, H, W) float, labels (B,) long) -> (mixed images, soft targets (B, num_classes) float32)``;
    multi-label data's integer multi-hot labels (B, num_classes) are blended as they are (:meth:`mix_multi_hot`).
    The images are mixed in place, as in timm: the returned tensor is the one passed in.
    ``mode``: one ``lam`` (and box) for the whole ``batch``, one per ``pair`` (i, B-1-i) or per ``elem``.
    With CutMix, ``lam`` is corrected to the box's area once clipped at the image border (``correct_lam``).
    """

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.ndim != 4:
            raise ValueError(f"mixup / cutmix takes a batch of images (B, C, H, W), got shape {tuple(images.shape)}")
        if labels.ndim == 2 and not labels.dtype.is_floating_point and labels.shape == (images.shape[0],
                                                                                        self.num_classes):
            return self.mix_multi_hot(images, labels)      # multi-label data: integer 0/1 rows (B, C)
        if labels.ndim != 1 or labels.shape[0] != images.shape[0] or labels.dtype.is_floating_point:
            raise ValueError(f"mixup / cutmix takes integer class labels of shape (B,) = ({images.shape[0]},), got "
                             f"{labels.dtype} {tuple(labels.shape)}; it makes the soft targets itself")
        if images.shape[0] % 2:
            raise ValueError(f"mixup / cutmix pairs image i with image B-1-i, so the batch size must be even, got "
                             f"{images.shape[0]}; set data.batch_size to an even number and drop the last partial "
                             f"training batch (drop_last=True), or turn mixup off (data.mixup.mixup_alpha=0 and "
                             f"data.mixup.cutmix_alpha=0)")
        images, target = super().__call__(images, labels)
        if images.dtype not in (torch.float32, torch.float64) and self.mode != "batch":
            # per-pair / per-element lam comes back in the images' dtype: renormalise the bf16 / fp16 rounding
            target = target / target.sum(dim=-1, keepdim=True)
        return images, target


    def mix_multi_hot(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Multi-label targets (B, C) of 0/1 (several classes per image): the images are mixed as for class labels
        (the same lam, boxes and pairing i <-> B-1-i) and the targets blended with the same lam,
        ``lam * y_i + (1 - lam) * y_(B-1-i)``, without label smoothing (each class is its own binary target)."""
        if images.shape[0] % 2:
            raise ValueError(f"mixup / cutmix pairs image i with image B-1-i, so the batch size must be even, got "
                             f"{images.shape[0]}")
        if self.mode == "elem":
            lam = self._mix_elem(images)
        elif self.mode == "pair":
            lam = self._mix_pair(images)
        else:
            lam = self._mix_batch(images)
        y = targets.float()
        lam_t = torch.as_tensor(lam, dtype=torch.float32, device=y.device).reshape(-1, 1) \
            if not isinstance(lam, float) else lam
        return images, y * lam_t + y.flip(0) * (1.0 - lam_t)


def build_mixup(num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                cutmix_minmax: Optional[Sequence[float]] = None, prob: float = 1.0, switch_prob: float = 0.5,
                mode: MixMode = "batch", label_smoothing: float = 0.1, **unknown: Any) -> Optional[MixupCutmix]:
    """The batch mixer for ``data.mixup``, or None when both alphas are 0 and there is no ``cutmix_minmax``.

    ``mixup_alpha`` / ``cutmix_alpha``: Beta(alpha, alpha) parameters (> 0 turns each on).
    ``cutmix_minmax``: [min, max] box side as a fraction of the image, instead of ``cutmix_alpha``.
    ``prob``: probability that a batch (or pair / element) is mixed at all.
    ``switch_prob``: with both on, the probability of CutMix rather than Mixup.
    ``label_smoothing``: built into the soft targets (off = eps / C, on = 1 - eps + eps / C). With None
    returned, smoothing of hard labels is the task's own ``label_smoothing``.
    """
    if unknown:
        raise ValueError(f"unknown mixup option{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(repr(k) for k in unknown)}; valid: {', '.join(OPTIONS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"mixup needs num_classes >= 2, got {num_classes!r}")
    for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"data.mixup.{name} is a Beta(alpha, alpha) parameter >= 0 (0 = off), got {value!r}")
    for name, value in (("prob", prob), ("switch_prob", switch_prob)):
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"data.mixup.{name} is a probability in [0, 1], got {value!r}")
    if mode not in MIX_MODES:
        raise ValueError(f"unknown data.mixup.mode {mode!r}; choose {', '.join(MIX_MODES)}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"data.mixup.label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if cutmix_minmax is not None:
        if not (isinstance(cutmix_minmax, (list, tuple)) and len(cutmix_minmax) == 2
                and 0.0 < cutmix_minmax[0] < cutmix_minmax[1] <= 1.0):
            raise ValueError(f"data.mixup.cutmix_minmax must be null or [min, max] with 0 < min < max <= 1 "
                             f"(box side as a fraction of the image), got {cutmix_minmax!r}")
        cutmix_minmax = [float(v) for v in cutmix_minmax]
    if mixup_alpha == 0 and cutmix_alpha == 0 and cutmix_minmax is None:
        return None
    return MixupCutmix(mixup_alpha=float(mixup_alpha), cutmix_alpha=float(cutmix_alpha), cutmix_minmax=cutmix_minmax,
                       prob=float(prob), switch_prob=float(switch_prob), mode=mode, correct_lam=True,
                       label_smoothing=float(label_smoothing), num_classes=num_classes)
