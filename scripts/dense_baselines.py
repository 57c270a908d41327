"""Trivial baselines for the dense tasks: what a model scores without looking at the image.

    python scripts/dense_baselines.py task=detection data=voc data.root=../shared/data/bccd/BCCD
    python scripts/dense_baselines.py task=segmentation data=camvid data.root=../shared/data/camvid

Detection, "prior boxes": k-means of the training boxes of each class (normalised centre and size), placed in every
validation image with the class's frequency as the score. It knows where objects of each class usually are and how
large they are, nothing else.

Segmentation: "majority class" (every pixel gets the most frequent training class) and "position prior" (every
pixel gets the class most frequent at that relative position over the training masks, on a 64 x 64 grid).

Both are scored by the task's own metrics (the same torchmetrics code as training: val/map, val/miou, ...) on the
split's evaluation transform, and printed + written as JSON (``--out FILE``, default: stdout only). Any
``vitlab-train`` override works (the data group and its root are what matter).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vitlab.lit.build import build_datamodule, build_recipe, build_source, data_info  # noqa: E402


def compose_cfg(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


def prior_boxes(source, split: str = "train", max_per_class: int = 30,
                seed: int = 0) -> list[tuple[int, np.ndarray, float]]:
    """(class, normalised cxcywh cluster centres (k, 4), score) per class, from the training annotations."""
    from sklearn.cluster import KMeans

    boxes: dict[int, list[np.ndarray]] = {}
    n_images = 0
    ds = source.dataset(split)
    for i in range(len(ds)):
        s = ds[i]
        h, w = s["image"].shape[-2:]
        n_images += 1
        b = torch.as_tensor(s["boxes"], dtype=torch.float32).reshape(-1, 4).numpy()
        crowd = np.asarray(s.get("iscrowd", np.zeros(len(b))), dtype=bool).reshape(-1)
        for (x1, y1, x2, y2), c, cr in zip(b, np.asarray(s["labels"]).reshape(-1), crowd):
            if not cr:
                boxes.setdefault(int(c), []).append(np.array([(x1 + x2) / 2 / w, (y1 + y2) / 2 / h,
                                                              (x2 - x1) / w, (y2 - y1) / h]))
    total = sum(len(v) for v in boxes.values())
    out = []
    for c, v in sorted(boxes.items()):
        v = np.stack(v)
        k = int(min(max_per_class, len(v), max(1, round(len(v) / n_images))))   # about the objects per image
        centres = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(v).cluster_centers_
        out.append((c, centres, len(v) / total))
    return out


def detection_baseline(cfg: DictConfig, split: str) -> dict[str, float]:
    source = build_source(cfg)
    task = build_recipe(cfg, data_info(cfg, source)).task
    priors = prior_boxes(source)
    metric = task.metrics()
    dm = build_datamodule(cfg, source)
    for batch in dm.eval_loader(split, num_workers=0):
        preds, target = [], []
        for j in range(len(batch["boxes"])):
            h, w = (float(x) for x in batch["orig_size"][j])
            bx, sc, lb = [], [], []
            for c, centres, freq in priors:
                cx, cy, bw, bh = (torch.tensor(centres[:, i], dtype=torch.float32) for i in range(4))
                bx.append(torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], 1))
                sc.append(torch.full((len(centres),), freq))
                lb.append(torch.full((len(centres),), c, dtype=torch.long))
            preds.append({"boxes": torch.cat(bx), "scores": torch.cat(sc), "labels": torch.cat(lb)})
            scale = float(batch["scale"][j])
            target.append({"boxes": batch["boxes"][j] / scale, "labels": batch["labels"][j],
                           "iscrowd": batch["iscrowd"][j].long(), "area": batch["area"][j].float()})
        metric.update(preds, target)
    return {f"prior_boxes/{k}": float(v) for k, v in task.compute_metrics(metric).items()}


def class_prior(source, grid: int = 64) -> torch.Tensor:
    """Counts (K, grid, grid) of each class at each relative position over the training masks."""
    K = source.num_classes
    counts = torch.zeros(K, grid, grid)
    ds = source.dataset("train")
    for i in range(len(ds)):
        m = torch.as_tensor(ds[i]["mask"]).long()[None, None].float()
        m = F.interpolate(m, size=(grid, grid), mode="nearest")[0, 0].long()
        valid = m < K
        counts += F.one_hot(m.clamp(max=K - 1), K).permute(2, 0, 1).float() * valid
    return counts


def segmentation_baseline(cfg: DictConfig, split: str) -> dict[str, float]:
    source = build_source(cfg)
    task = build_recipe(cfg, data_info(cfg, source)).task
    counts = class_prior(source)
    majority = int(counts.sum((1, 2)).argmax())
    position = counts.argmax(0)                                             # (grid, grid)
    metrics = {"majority_class": task.metrics(), "position_prior": task.metrics()}
    ignore = source.ignore_index if source.ignore_index is not None else -1
    dm = build_datamodule(cfg, source)
    for batch in dm.eval_loader(split, num_workers=0):
        for j in range(batch["mask"].shape[0]):
            mh, mw = (int(x) for x in batch["mask_size"][j])
            target = batch["mask"][j, :mh, :mw]
            keep = target != ignore
            pos = F.interpolate(position[None, None].float(), size=(mh, mw), mode="nearest")[0, 0].long()
            metrics["majority_class"].update(torch.full_like(target, majority)[keep], target[keep])
            metrics["position_prior"].update(pos[keep], target[keep])
    out = {}
    for name, metric in metrics.items():
        out.update({f"{name}/{k}": float(v) for k, v in task.compute_metrics(metric).items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="val")
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    ap.add_argument("overrides", nargs="+", help="vitlab-train overrides: task=... data=... data.root=...")
    args = ap.parse_args()
    cfg = compose_cfg(args.overrides + ["data.num_workers=0"])
    kind = str(cfg.task._target_).rsplit(".", 1)[-1]
    if kind == "DetectionTask":
        res = detection_baseline(cfg, args.split)
    elif kind == "SegmentationTask":
        res = segmentation_baseline(cfg, args.split)
    else:
        raise SystemExit("give task=detection or task=segmentation")
    for k, v in sorted(res.items()):
        print(f"{k:<40}{v:>10.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
