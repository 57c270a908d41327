"""vitlab-sample: draw samples from a diffusion checkpoint, save a grid, score them with a classifier.

    vitlab-sample ckpt=outputs/.../checkpoints/last.ckpt                         # a grid, a row per class
    vitlab-sample ckpt=PATH sampler=ddim steps=100 guidance=2.0 per_class=10
    vitlab-sample ckpt=PATH eval_per_class=100 classifier=runs/mnist_vit/checkpoints/best.ckpt save_npz=true

The model is rebuilt from the checkpoint alone; sampling uses its EMA weights when the run kept them. With
``eval_per_class`` > 0, that many samples per class are generated and classified: the accuracy per class (and over
all) is printed and written to ``sample_eval.json``. ``save_npz`` writes them as uint8 (N, H, W, 3) ``arr_0`` for
FID tools (the ADM evaluation suite DiT reports with).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from vitlab.cli.common import config_dir, fail, validate_command_line

log = logging.getLogger("vitlab")


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        fail("device=cuda but no CUDA device is visible; use device=cpu")
    if name not in ("cpu", "cuda"):
        fail(f"unknown device={name!r}; choose auto, cpu or cuda")
    return torch.device(name)


def sample_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    import numpy as np
    import torch
    from tqdm import tqdm

    from vitlab.layers.attention import set_backend as set_attention_backend
    from vitlab.checkpoints import NotACheckpointError
    from vitlab.lit.build import load_checkpoint, load_model
    from vitlab.tasks.diffusion import load_judge
    from vitlab.io import atomic_write_text, atomic_write_with
    from vitlab.lit.callbacks import save_sample_grid

    set_attention_backend(cfg.attention_backend)
    if not Path(cfg.ckpt).is_file():
        fail(f"checkpoint not found: {cfg.ckpt}. Give ckpt=PATH to a task=diffusion run's checkpoints/last.ckpt")
    try:
        module = load_checkpoint(cfg.ckpt)
    except NotACheckpointError as e:
        fail(str(e))
    recipe = module.eval_recipe()
    task = recipe.task
    if not task.draws_samples:
        fail(f"{cfg.ckpt} is a {task.kind} checkpoint; vitlab-sample draws from generative tasks (task=diffusion "
             "runs; evaluate others with vitlab-eval)")
    if task.num_classes == 0:
        fail("this checkpoint is unconditional (no classes); vitlab-sample draws class rows")
    for key, value, low in (("per_class", cfg.per_class, 1), ("max_classes", cfg.max_classes, 1),
                            ("eval_per_class", cfg.eval_per_class, 0), ("batch_size", cfg.batch_size, 1)):
        if int(value) < low:
            fail(f"{key} must be an integer >= {low}, got {value}")
    device = _device(cfg.device)
    recipe.to(device).eval()
    options = {k: cfg[k] for k in ("sampler", "steps", "guidance") if cfg[k] is not None}
    try:
        task.resolve_sampler(task.objective_name, options.get("sampler", task.sampler))
    except ValueError as e:
        fail(str(e).replace("task.", ""))
    run_dir = Path(cfg.ckpt).resolve().parent.parent
    out = Path(cfg.out) if cfg.out else run_dir / "samples"
    sampler = options.get("sampler", task.sampler)
    steps = int(options.get("steps", task.sample_steps))
    guidance = float(options.get("guidance", task.guidance))
    tag = f"{sampler}{steps}_g{guidance:g}_seed{cfg.seed}"
    result: dict[str, Any] = {"ckpt": str(cfg.ckpt), "sampler": sampler, "steps": steps, "guidance": guidance,
                              "seed": int(cfg.seed), "ema": module.ema is not None and module.ema_evaluate}

    t0 = time.perf_counter()
    grid = out / f"grid_{tag}.png"
    save_sample_grid(task, recipe.backbone, grid, per_class=int(cfg.per_class), max_classes=int(cfg.max_classes),
                     seed=int(cfg.seed), device=device, **options)
    print(f"[vitlab] sample grid written to {grid} ({time.perf_counter() - t0:.1f} s)")
    result["grid"] = str(grid)

    n_per = int(cfg.eval_per_class)
    if n_per == 0:
        return result
    classifier = cfg.classifier or task.classifier_path
    if not classifier and not cfg.save_npz:
        fail("eval_per_class > 0 needs a classifier to score the samples: classifier=PATH (a vitlab classifier "
             "checkpoint trained on the same data), or save_npz=true to only keep them")
    judge = None
    if classifier:
        try:
            judge = load_judge(classifier, task.num_classes, load_model)
        except (ValueError, FileNotFoundError) as e:
            fail(str(e).replace("task.classifier", "classifier"))
    labels = torch.arange(task.num_classes).repeat_interleave(n_per)             # (C * n,) balanced
    seeds = torch.arange(len(labels)) + int(cfg.seed) + 1_000_000                 # apart from the grid's noise
    correct = torch.zeros(task.num_classes, dtype=torch.long)
    kept = []
    t0 = time.perf_counter()
    for i in tqdm(range(0, len(labels), int(cfg.batch_size)), desc="sampling", unit="batch"):
        y = labels[i:i + int(cfg.batch_size)]
        images = task.generate(recipe.backbone, y.to(device), seeds=seeds[i:i + len(y)].tolist(), **options)
        if judge is not None:
            pred = judge(images).argmax(dim=1).cpu()
            correct += torch.bincount(y[pred == y], minlength=task.num_classes)
        if cfg.save_npz:
            kept.append((images.cpu() * 255).round().to(torch.uint8))
    seconds = time.perf_counter() - t0
    result.update({"samples": len(labels), "seconds": round(seconds, 1),
                   "samples_per_s": round(len(labels) / seconds, 2)})
    if judge is not None:
        names = task.class_names or [str(c) for c in range(task.num_classes)]
        per_class = (correct.float() / n_per).tolist()
        result["classifier"] = str(classifier)
        result["sample_acc"] = float(correct.sum()) / len(labels)
        result["sample_acc_per_class"] = {str(n): round(a, 4) for n, a in zip(names, per_class)}
        print(f"\n{'class':<16}{'accuracy':>10}\n" + "-" * 26)
        for n, a in zip(names, per_class):
            print(f"{str(n):<16}{a:>10.3f}")
        print(f"{'all':<16}{result['sample_acc']:>10.3f}  ({len(labels)} samples, chance {1 / task.num_classes:.3f})")
    if cfg.save_npz:
        arr = torch.cat(kept)
        arr = arr.expand(-1, 3, -1, -1) if arr.shape[1] == 1 else arr
        npz = out / f"samples_{tag}.npz"
        atomic_write_with(npz, lambda f: np.savez(f, arr_0=arr.permute(0, 2, 3, 1).numpy(), labels=labels.numpy()))
        result["npz"] = str(npz)
        print(f"[vitlab] {len(arr)} samples written to {npz}")
    path = out / f"sample_eval_{tag}.json"
    atomic_write_text(path, json.dumps(result, indent=2))
    print(f"[vitlab] results written to {path}")
    return result


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="sample")
def _hydra_main(cfg: DictConfig) -> None:
    sample_checkpoint(cfg)


def main() -> None:
    validate_command_line("sample", sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
