"""``vitlab-bench data``: composes ``conf/bench_data.yaml`` with Hydra overrides and
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

import statistics
import time
from collections.abc import Callable, Sequence
from datetime import datetime

from omegaconf import DictConfig, OmegaConf

from vitlab.cli.bench.common import PROG, compose, cpu_count, cpu_model, time_loader, write_results
from vitlab.cli.common import fail


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
                runs[name].append(time_loader(make, step, int(cfg.warmup_batches), int(cfg.num_batches), sync))
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
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if on_cuda else f" ({cpu_model()})"),
        "cpu": cpu_model(), "cpu_count": cpu_count(), "intra_op_threads": torch.get_num_threads(),
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


def format_table(rows: Sequence[dict]) -> str:
    """The rows as plain aligned text."""
    head = f"{'pipeline':<24}{'workers':>8}{'images/s':>12}{'per worker':>12}{'ratio':>8}  vs"
    lines = [head, "-" * (len(head) + 22)]
    for r in rows:
        vs = "" if r["reference"] == r["pipeline"] else r["reference"]
        lines.append(f"{r['pipeline']:<24}{r['workers']:>8}{r['images_per_s']:>12,.0f}"
                     f"{r['images_per_s_per_worker']:>12,.0f}{r['ratio_vs_reference']:>8.2f}  {vs}")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    cfg = compose("bench_data", argv)
    results = bench_data(cfg)
    results["command"] = " ".join([PROG, "data", *argv])
    print(f"\n{results['dataset']}, {results['split']}, img_size {results['img_size']}, batch {results['batch_size']}, "
          f"device {results['device']}, torch {results['torch']}\n{format_table(results['rows'])}", flush=True)
    write_results(cfg.output_file, results)
