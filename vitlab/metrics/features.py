"""Feature extraction for the frozen-representation protocols (kNN, linear probe).

``extract_features`` runs an image -> feature function over a loader of dict batches once, without gradients,
and returns the features and labels on the CPU, ready for :func:`vitlab.metrics.knn_accuracy` or
:func:`vitlab.metrics.linear_probe`. Pure torch (no Lightning, no Hydra).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm


def _num_images(loader: Iterable) -> int | None:
    """The number of images the loader yields, when it can tell (for the progress bar's total)."""
    try:
        return len(loader.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return None


@torch.no_grad()
def extract_features(fn: Callable[[torch.Tensor], torch.Tensor], loader: Iterable[dict],
                     device: torch.device | str, max_samples: int | None = None,
                     autocast_dtype: torch.dtype | None = None,
                     desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``fn`` over every batch of ``loader``; return ``(features (N, D) float32, labels (N,) long)`` on the CPU.

    Args:
        fn: images (B, C, H, W) on ``device`` -> features (B, D), e.g. ``lambda x: recipe.features(x, "pooled")``.
        loader: yields dict batches with ``"image"`` (B, C, H, W) and ``"label"`` (B,).
        device: where ``fn`` runs (the model must already be there).
        max_samples: stop after this many images (the last batch is cut); None = the whole loader.
        autocast_dtype: e.g. ``torch.bfloat16`` to run ``fn`` under autocast on ``device``; None = full precision.
        desc: the progress bar's label (a tqdm bar with images/s; hidden when stderr is not a terminal).
    """
    device = torch.device(device)
    if max_samples is not None and max_samples <= 0:
        raise ValueError(f"max_samples must be positive or None, got {max_samples}")
    total = _num_images(loader)
    if max_samples is not None:
        total = max_samples if total is None else min(total, max_samples)
    amp = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    seen = 0
    # disable=None: tqdm hides itself when the output is not a terminal (log files, CI)
    with tqdm(total=total, desc=desc, unit="img", unit_scale=True, disable=None, leave=False) as bar:
        for batch in loader:
            images = batch["image"]
            target = torch.as_tensor(batch["label"])
            if max_samples is not None and seen + len(images) > max_samples:
                keep = max_samples - seen
                images, target = images[:keep], target[:keep]
            with amp:
                f = fn(images.to(device, non_blocking=True))                    # (B, D)
            if f.ndim != 2 or len(f) != len(images):
                raise ValueError(f"the feature function must return (B, D) for B={len(images)} images, "
                                 f"got shape {tuple(f.shape)}")
            # to the CPU per batch: a large train split's features need not fit in device memory
            feats.append(f.float().cpu())
            labels.append(target.long().cpu())
            seen += len(images)
            bar.update(len(images))
            if max_samples is not None and seen >= max_samples:
                break
    if not feats:
        raise ValueError("the loader yielded no images: check the split and data.root")
    return torch.cat(feats), torch.cat(labels)
