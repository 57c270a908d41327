"""vitlab-bench: throughput benchmarks, each reported as a ratio against a reference measured in the same run.

    vitlab-bench train backbone=vit_tiny data.batch_size=16 output_file=OUT.json     (vitlab/cli/bench_train.py)
    vitlab-bench attention seq_lens=[197,577] output_file=a.json                     (vitlab/cli/bench_attention.py)

    vitlab-bench data data=cifar10 data.root=../shared/data/cifar10-subset workers=[0,1,2] output_file=b.json
    vitlab-bench data data=imagefolder data.root=DIR data.img_size=224

Subcommands live in :data:`SUBCOMMANDS` (name -> function of the remaining arguments, one-line help);
a new benchmark registers there. ``data`` composes ``conf/bench_data.yaml`` with Hydra overrides and
measures, for every worker count in ``workers``, images/s of:

1. ``vitlab per-sample``: decode + vitlab's configured train transforms (``build_transforms(True, ...,
   **data.augment)``) in a DataLoader, on the CPU;
2. ``torchvision reference``: the same data through a plain torchvision pipeline,
   ``v2.Compose([RandomResizedCrop(img_size, antialias=True), RandomHorizontalFlip(), ToImage(),
   ToDtype(float32, scale=True), Normalize(mean, std)])`` (the crop on the decoded PIL image);
   row 1's ratio is vitlab / this;
3. ``in-memory per-sample``: the split decoded once into a uint8 tensor, then the per-sample crop / flip /
   normalise (only the options the batched path implements) in a DataLoader, mixup on ``device``;
4. ``in-memory batched``: the same tensor fetched a batch at a time (:class:`InMemoryImages`), moved to
   ``device``, augmented with :class:`BatchAugment`, mixed; its ratio is against row 3.

Timings start after ``warmup_batches`` and end after ``num_batches`` more, with CUDA synchronised. Each
pipeline and its reference are timed alternately ``repeats`` times with a fresh loader each time; rows
report the median (all runs are in the JSON), so load from other processes hits both sides alike.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vitlab.cli.common import config_dir, fail, validate_command_line

PROG = "vitlab-bench"


# ------------------------------------------------------------------ timing ---

def _cpu_model() -> str:
    from vitlab.env import cpu_model     # one definition, shared with the run's environment.json

    return cpu_model()


def _time_loader(make_loader: Callable[[], Iterable], step: Callable[[Any], int], warmup: int, n: int,
                 sync: Callable[[], None]) -> tuple[float, int]:
    """Run ``warmup`` then ``n`` batches through ``step`` (re-iterating the loader if it runs out).

    Returns (seconds for the ``n`` timed batches, images in them). A fresh loader per measurement, so worker
    start-up falls in the warm-up; iterators are dropped at the end, which shuts their workers down.
    """
    loader = make_loader()
    it = iter(loader)
    done, images, t0 = 0, 0, 0.0
    while done < warmup + n:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        if done == warmup:
            sync()
            t0 = time.perf_counter()
        count = step(batch)
        if done >= warmup:
            images += count
        done += 1
    sync()
    seconds = time.perf_counter() - t0
    del it, loader
    return seconds, images


# ------------------------------------------------------------- bench data ---

def _reference_transform(img_size: int, mean: Sequence[float], std: Sequence[float]):
    import torch
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomResizedCrop(img_size, antialias=True), v2.RandomHorizontalFlip(), v2.ToImage(),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))])


class _StoredPairs:
    """(uint8 (C, H, W), label) items from an :class:`InMemoryImages`, for the per-sample transforms."""

    def __init__(self, mem):
        self.mem = mem

    def __len__(self) -> int:
        return len(self.mem)

    def __getitem__(self, i: int):
        return self.mem.images[i], int(self.mem.labels[i])


def _build_mixup(num_classes: int, options: dict | None):
    """vitlab's build_mixup when present (it checks the options), else timm's Mixup directly."""
    if not options:
        return None
    try:
        from vitlab.data.mixup import build_mixup
    except ImportError:
        import timm.data

        return timm.data.Mixup(num_classes=num_classes, **options)
    return build_mixup(num_classes, **options)


def _compose(config_name: str, overrides: Sequence[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    validate_command_line(config_name, overrides)            # wrong keys / group options: exit 2, named
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def bench_data(cfg: DictConfig) -> dict:
    """Measure the data pipelines configured by ``cfg`` (conf/bench_data.yaml); return the results dict."""
    import numpy as np
    import torch
    import torchvision
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader, Subset

    from vitlab.data import DatasetNotFoundError, DictDataset, build_transforms
    from vitlab.data.batched import (
        SUPPORTED_KEYS,
        BatchAugment,
        InMemoryImages,
        passthrough_collate,
        unsupported_options,
    )

    def say(msg: str) -> None:
        print(f"[bench] {msg}", flush=True)

    workers = [int(w) for w in cfg.workers]
    if not workers or any(w < 0 for w in workers):
        fail(f"workers must be a non-empty list of worker counts >= 0, e.g. workers=[0,1,2]; got {list(cfg.workers)}")
    if cfg.num_batches < 1 or cfg.warmup_batches < 0:
        fail(f"num_batches must be >= 1 and warmup_batches >= 0 (got {cfg.num_batches}, {cfg.warmup_batches})")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else "cpu" if cfg.device == "auto" else cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("device=cuda but torch sees no CUDA device; use device=auto or device=cpu")
    on_cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)                                   # timm's mixup draws from NumPy's generator

    data = cfg.data
    augment = OmegaConf.to_container(data.augment, resolve=True) if data.get("augment") else {}
    img_size, batch_size = int(data.img_size), int(cfg.batch_size or data.batch_size)
    mixup_opts = OmegaConf.to_container(cfg.mixup, resolve=True) if cfg.get("mixup") else None
    try:                                       # a missing dataset or a bad option stops here, before any timing
        source = instantiate(data.source, _convert_="all")
        source.check()
        base = source.dataset(cfg.split)
        vitlab_tf = build_transforms(True, img_size, source.mean, source.std, **augment)
        mixup = _build_mixup(source.num_classes, mixup_opts)
    except (DatasetNotFoundError, FileNotFoundError, ValueError, TypeError) as e:
        fail(str(e))
    if len(base) < batch_size:
        fail(f"the {cfg.split} split of {source.name} has {len(base)} images, fewer than one batch of {batch_size}; "
             "lower batch_size=... or point data.root at more data")
    if mixup is not None and batch_size % 2:
        fail(f"mixup pairs images within a batch, so batch_size must be even (got {batch_size}); or mixup=null")
    batched_opts = {k: v for k, v in augment.items() if k in SUPPORTED_KEYS}
    skipped = unsupported_options(augment)
    say(f"{source.name} {cfg.split}: {len(base)} images, img_size {img_size}, batch {batch_size}, device {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, workers {workers}")
    say(f"augment: {augment}; mixup: {mixup_opts}")
    if skipped:
        say(f"the batched path does not apply the per-sample-only option(s) {', '.join(skipped)}; the in-memory "
            "per-sample pipeline leaves them out too, so rows 3 and 4 do the same work")

    def loader(ds, w: int, **kw) -> Callable[[], DataLoader]:
        g = torch.Generator().manual_seed(cfg.seed)
        return lambda: DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=w,
                                  generator=g, pin_memory=on_cuda, **kw)

    def count(batch: dict) -> int:
        return len(batch["label"])

    def to_device(batch: dict) -> tuple:
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        return images, labels

    def mix(images, labels) -> int:
        if mixup is not None:
            images, labels = mixup(images, labels)
        return len(images)

    rows: list[dict] = []

    def row(name: str, w: int, runs: list[tuple[float, int]], reference: dict | None) -> dict:
        rates = [images / seconds for seconds, images in runs]
        ips = statistics.median(rates)
        ratio = ips / reference["images_per_s"] if reference else 1.0
        r = {"pipeline": name, "workers": w, "images_per_s": round(ips, 1),
             "images_per_s_per_worker": round(ips / max(w, 1), 1), "ratio_vs_reference": round(ratio, 3),
             "reference": reference["pipeline"] if reference else name, "images": runs[0][1],
             "images_per_s_runs": [round(x, 1) for x in rates]}
        rows.append(r)
        vs = f", {ratio:.2f}x {reference['pipeline']}" if reference else ""
        say(f"{name:<24} workers={w}: {ips:>9,.0f} images/s (median of {len(rates)}: "
            f"{', '.join(f'{x:,.0f}' for x in rates)}){vs}")
        return r

    def measure_pair(w: int, ref: tuple, cand: tuple) -> None:
        """Time the reference and the candidate alternately ``repeats`` times (load drift hits both alike)."""
        runs: dict[str, list] = {ref[0]: [], cand[0]: []}
        for _ in range(max(int(cfg.repeats), 1)):
            for name, make, step in (ref, cand):
                runs[name].append(_time_loader(make, step, int(cfg.warmup_batches), int(cfg.num_batches), sync))
        row(cand[0], w, runs[cand[0]], row(ref[0], w, runs[ref[0]], None))

    # 1 + 2: decode + augment on the CPU, vitlab's configured pipeline against the torchvision reference
    vitlab_ds = DictDataset(base, vitlab_tf)
    ref_ds = DictDataset(base, _reference_transform(img_size, source.mean, source.std))
    for w in workers:
        measure_pair(w, ("torchvision reference", loader(ref_ds, w), count),
                     ("vitlab per-sample", loader(vitlab_ds, w), count))

    # 3 + 4: the split in memory; per-sample crop/flip/normalise against the batched path on the device
    held = base
    limit = cfg.get("in_memory_limit")
    if limit and len(base) > int(limit):
        keep = np.sort(np.random.default_rng(cfg.seed).permutation(len(base))[:int(limit)])
        held = Subset(base, keep.tolist())
    t0 = time.perf_counter()
    mem = InMemoryImages.from_dataset(held, img_size, num_workers=max(workers))
    load_s = time.perf_counter() - t0
    say(f"held {len(mem)} images in memory as uint8 {tuple(mem.images.shape)} "
        f"({mem.images.numel() / 2**20:.0f} MiB) in {load_s:.1f} s")
    if len(mem) < batch_size:
        fail(f"in_memory_limit={limit} holds fewer images than one batch of {batch_size}; raise it")
    per_sample_ds = DictDataset(_StoredPairs(mem), build_transforms(True, img_size, source.mean, source.std,
                                                                    **batched_opts))
    aug = BatchAugment(img_size, source.mean, source.std, train=True, **batched_opts).to(device)

    def per_sample_step(batch: dict) -> int:
        return mix(*to_device(batch))

    def batched_step(batch: dict) -> int:
        images, labels = to_device(batch)
        return mix(aug(images), labels)

    for w in workers:
        measure_pair(w, ("in-memory per-sample", loader(per_sample_ds, w), per_sample_step),
                     ("in-memory batched", loader(mem, w, collate_fn=passthrough_collate), batched_step))

    return {
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if on_cuda else f" ({_cpu_model()})"),
        "cpu": _cpu_model(), "cpu_count": _cpu_count(), "intra_op_threads": torch.get_num_threads(),
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "dataset": f"{source.name} ({data.get('root')})", "split": cfg.split, "num_images": len(base),
        "img_size": img_size, "batch_size": batch_size, "num_batches": int(cfg.num_batches),
        "repeats": int(cfg.repeats),
        "warmup_batches": int(cfg.warmup_batches), "augment": augment, "batched_augment": batched_opts,
        "batched_skips": skipped, "mixup": mixup_opts,
        "in_memory": {"images": len(mem), "mib": round(mem.images.numel() / 2**20, 1), "load_s": round(load_s, 2)},
        "reference_transform": "v2.Compose([RandomResizedCrop(img_size, antialias=True), RandomHorizontalFlip(), "
                               "ToImage(), ToDtype(float32, scale=True), Normalize(mean, std)])",
        "rows": rows, "date": datetime.now().isoformat(timespec="seconds"),
    }


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def write_results(path: str | None, results: dict) -> None:
    """Write a benchmark's results as JSON to ``path`` (nothing when it is null), creating its folder."""
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")       # str(): paths, dtypes
    print(f"[bench] results written to {out}", flush=True)


def format_table(rows: Sequence[dict]) -> str:
    """The rows as plain aligned text."""
    head = f"{'pipeline':<24}{'workers':>8}{'images/s':>12}{'per worker':>12}{'ratio':>8}  vs"
    lines = [head, "-" * (len(head) + 22)]
    for r in rows:
        vs = "" if r["reference"] == r["pipeline"] else r["reference"]
        lines.append(f"{r['pipeline']:<24}{r['workers']:>8}{r['images_per_s']:>12,.0f}"
                     f"{r['images_per_s_per_worker']:>12,.0f}{r['ratio_vs_reference']:>8.2f}  {vs}")
    return "\n".join(lines)


def data_main(argv: Sequence[str]) -> None:
    cfg = _compose("bench_data", argv)
    results = bench_data(cfg)
    results["command"] = " ".join([PROG, "data", *argv])
    print(f"\n{results['dataset']}, {results['split']}, img_size {results['img_size']}, batch {results['batch_size']}, "
          f"device {results['device']}, torch {results['torch']}\n{format_table(results['rows'])}", flush=True)
    write_results(cfg.output_file, results)


# ------------------------------------------------------------------ entry ---

def train_main(argv: Sequence[str]) -> None:
    from vitlab.cli.bench_train import train_main as run

    run(argv)


def attention_main(argv: Sequence[str]) -> None:
    from vitlab.cli.bench_attention import attention_main as run

    run(argv)


SUBCOMMANDS: dict[str, tuple[Callable[[Sequence[str]], None], str]] = {
    "train": (train_main, "training images/s, memory, FLOPs and MFU of a config vs the equivalent timm model"),
    "attention": (attention_main, "attention kernels (fwd + bwd) on ViT shapes, each backend vs the math path"),
    "data": (data_main, "data loading + augmentation throughput: vitlab's pipelines vs references"),
}


def usage() -> str:
    width = max(len(n) for n in SUBCOMMANDS)
    lines = [f"usage: {PROG} <subcommand> [hydra overrides]", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", f"e.g. {PROG} train backbone=vit_tiny data.batch_size=16 output_file=train.json",
              f"     {PROG} attention seq_lens=[197,577] output_file=attention.json",
              f"     {PROG} data data=cifar10 data.root=DIR workers=[0,1,2] output_file=bench.json"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the profiler (memory, kernel names) would print a kineto error line per use on machines without a GPU
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    if argv and argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if not argv or argv[0] not in SUBCOMMANDS:
        problem = f"unknown subcommand {argv[0]!r}" if argv else "no subcommand given"
        print(f"{PROG}: error: {problem}; choose one of {', '.join(SUBCOMMANDS)}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    SUBCOMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    main()
