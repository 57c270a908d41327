"""vitlab-bench train: training throughput of any vitlab config against the equivalent timm model, in one run.

    vitlab-bench train backbone=vit_tiny data.batch_size=16 output_file=OUT.json          # CPU, a few minutes
    vitlab-bench train backbone=vit_base data.img_size=224 data.batch_size=256 trainer.precision=bf16-mixed \\
        model.compile=true 'bench.variants=["model.activation_checkpointing=true"]' output_file=b16.json

The command line is ``vitlab-train``'s (conf/bench_train.yaml composes conf/train.yaml), plus ``bench.*``
and ``output_file``. What one run measures:

- **vitlab**: the configured model, optimizer, scheduler, precision and Trainer, trained by Lightning exactly as
  ``vitlab-train`` would (loggers, checkpoints, validation and the progress bar off). ``bench.loader=synthetic``
  feeds one random batch already on the device (the model step alone); ``real`` uses the configured data
  pipeline and splits each step into data (fetch + transfer + mixup) and compute.
- **timm**: timm's ``VisionTransformer`` built with the same architecture (:func:`create_timm_equivalent`:
  same parameter count, same function), timm's fused attention, timm's AdamW (``create_optimizer_v2``), the
  same precision, loss, label smoothing and gradient clipping, in a plain PyTorch loop on the same synthetic
  batch. ``ratio_vs_timm`` = vitlab images/s / timm images/s.
- **variants**: extra vitlab rows, each the base command plus some overrides (``bench.variants``), e.g.
  activation checkpointing or compile; each has its own ratio to timm.

Per row: images/s from the median of ``bench.steps`` timed steps after ``bench.warmup`` (each step timed
between device synchronisations), peak memory, model FLOPs per image (``torch.utils.flop_counter``, forward +
backward, attention counted as its matmuls), achieved TFLOP/s, and MFU: achieved FLOP/s over the device's
bf16 matmul rate, measured in the same run with a large square matmul.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed steps; on the CPU the parameters and
optimizer state plus the peak of the CPU allocator during one extra step, read from the profiler's memory
events (not measured for compiled CPU models, whose inductor kernels allocate outside them).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from vitlab.cli.bench.common import PROG, compose, cpu_count, cpu_model, write_results
from vitlab.cli.common import fail

log = logging.getLogger("vitlab")

PRECISIONS = ("32", "32-true", "bf16-mixed", "16-mixed", "bf16-true")


def say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


# ------------------------------------------------------------- the device ---

def _device(cfg: DictConfig):
    import torch

    acc = str(cfg.trainer.accelerator)
    if acc in ("gpu", "cuda") and not torch.cuda.is_available():
        fail("trainer.accelerator=gpu but torch sees no CUDA device; use trainer.accelerator=cpu or auto")
    on_cuda = acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available())
    return torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")


def _sync(device) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def matmul_tflops(device, dtype_name: str, size: int, repeats: int = 5) -> float:
    """The rate of a square (size x size) @ (size x size) matmul in ``dtype_name``: the device's practical peak."""
    import torch

    dtype = getattr(torch, dtype_name)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    sync = _sync(device)
    for _ in range(2):
        a @ b
    sync()
    # enough back-to-back matmuls per timing that launch overhead vanishes (>= ~50 ms each)
    t0 = time.perf_counter()
    a @ b
    sync()
    inner = max(1, min(200, int(0.05 / max(time.perf_counter() - t0, 1e-6))))
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync()
        times.append((time.perf_counter() - t0) / inner)
    return 2 * size ** 3 / statistics.median(times) / 1e12


# ------------------------------------------------------------------ memory ---

@contextlib.contextmanager
def cpu_peak_bytes():
    """Peak bytes the CPU allocator holds above the start of the block, from the profiler's memory events.
    Yields a dict whose "peak" is filled in on exit."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    out: dict[str, int] = {}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield out
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                     and e.device_type() == DeviceType.CPU), key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    out["peak"] = peak


def state_bytes(model, optimizer=None) -> int:
    """Bytes of the parameters (and gradients, when present) and the optimizer state."""
    import torch

    seen: set[int] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if torch.is_tensor(t) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for p in model.parameters():
        add(p)
        add(p.grad)
    if optimizer is not None:
        for st in optimizer.state.values():
            for v in st.values():
                add(v)
    return total


# ------------------------------------------------------------------- FLOPs ---

def count_flops(model: Callable, images, labels, loss_fn: Callable) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs per image of ``loss_fn(model(images), labels)``.

    Counted with torch.utils.flop_counter on the eager model with attention on the ``math`` backend, so the
    attention products count as the matmuls they are (a fused kernel's backward would add its recomputation):
    the usual "model FLOPs" of MFU.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from vitlab.layers.attention import use_backend

    counter = FlopCounterMode(display=False)
    with use_backend("math"), counter:
        loss = loss_fn(model(images), labels)
        fwd = counter.get_total_flops()
        loss.backward()
    total = counter.get_total_flops()
    n = images.shape[0]
    return fwd / n, total / n


def _attention_ops(model, images) -> list[str]:
    """The attention ops and kernels (profiler names) one forward of ``model`` runs, e.g.
    aten::_scaled_dot_product_flash_attention and its CUDA kernel: what the timed steps ran."""
    import torch

    from vitlab.cli.bench.attention import attention_ops_ran

    with torch.no_grad():
        return attention_ops_ran(lambda: model(images))


def _autocast(device, precision: str):
    import torch

    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# ----------------------------------------------------------------- timing ---

class StepTimes:
    """Per-step (data, compute) seconds after the warm-up; the device is synchronised at every boundary."""

    def __init__(self, warmup: int, sync: Callable[[], None]):
        self.warmup, self.sync = warmup, sync
        self.data: list[float] = []
        self.compute: list[float] = []
        self._step = 0
        self._last_end: Optional[float] = None
        self._start = 0.0

    def start(self) -> None:
        self.sync()
        self._start = time.perf_counter()
        if self._step >= self.warmup and self._last_end is not None:
            self.data.append(self._start - self._last_end)

    def end(self) -> None:
        self.sync()
        now = time.perf_counter()
        if self._step >= self.warmup:
            self.compute.append(now - self._start)
            if len(self.data) < len(self.compute):       # the first timed step: nothing before it to measure
                self.data.append(0.0)
        self._last_end = now
        self._step += 1

    def summary(self, batch_size: int) -> dict:
        steps = [d + c for d, c in zip(self.data, self.compute)]
        med = statistics.median(steps)
        return {"images_per_s": batch_size / med, "step_ms": 1e3 * med,
                "compute_ms": 1e3 * statistics.median(self.compute), "data_ms": 1e3 * statistics.median(self.data),
                "data_fraction": sum(self.data) / max(sum(steps), 1e-12),
                "compute_images_per_s": batch_size / statistics.median(self.compute),
                "step_ms_all": [round(1e3 * s, 3) for s in steps]}


def _lightning_timer(times: StepTimes, measure_memory_at: Optional[int], device):
    """A Lightning callback feeding ``times``; it resets CUDA's peak-memory count when timing starts, and on the
    CPU measures memory in the one step ``measure_memory_at``."""
    import pytorch_lightning as pl
    import torch

    class _Timer(pl.Callback):
        def __init__(self):
            self.memory: dict[str, Any] = {}
            self._mem_ctx = None
            self._mem_out = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if times._step == times.warmup and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            if measure_memory_at is not None and times._step == measure_memory_at:
                self.memory["static_bytes"] = state_bytes(pl_module, trainer.optimizers[0])
                self._mem_ctx = cpu_peak_bytes()
                self._mem_out = self._mem_ctx.__enter__()
                return
            times.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self._mem_ctx is not None:
                self._mem_ctx.__exit__(None, None, None)
                self.memory["peak_bytes"] = self.memory["static_bytes"] + self._mem_out["peak"]
                self._mem_ctx = None
                return
            times.end()

    return _Timer()


class SyntheticBatches:
    """``length`` copies of one random batch already on the device (the model step alone, no data cost); wrapped
    in ``DataLoader(batch_size=None)`` so Lightning sees an ordinary loader of known length."""

    def __init__(self, batch: dict, length: int):
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if i >= self.length:
            raise IndexError(i)
        return self.batch

    def loader(self):
        from torch.utils.data import DataLoader

        return DataLoader(self, batch_size=None, shuffle=False, num_workers=0)


def synthetic_batch(batch_size: int, in_chans: int, img_size, num_classes: int, device, seed: int = 0) -> dict:
    import torch

    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(batch_size, in_chans, h, w, generator=g).to(device),
            "label": torch.randint(0, num_classes, (batch_size,), generator=g).to(device),
            "index": torch.arange(batch_size).to(device)}


# ------------------------------------------------------------ vitlab rows ---

def _bench_cfg(cfg: DictConfig, total_steps: int) -> DictConfig:
    """The run config as vitlab-train would use it, minus everything that is not the training step."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.logger = None
        cfg.callbacks = None
        cfg.checkpoint_every_n_steps = None
        cfg.ckpt_path = None
        t = cfg.trainer
        t.max_steps = total_steps
        t.max_epochs = total_steps            # ends by max_steps; -1 would hide the loader length from the schedule
        t.limit_train_batches = None
        t.limit_val_batches = 0
        t.num_sanity_val_steps = 0
        t.enable_progress_bar = False
        t.enable_checkpointing = False
        t.enable_model_summary = False
    return cfg


def run_vitlab(cfg: DictConfig, label: str, overrides: Sequence[str]) -> dict:
    """Train ``bench.warmup + bench.steps`` steps with Lightning as vitlab-train would; return the row."""
    import pytorch_lightning as pl
    import torch

    from vitlab.data import DatasetNotFoundError
    from vitlab.data.base import DataInfo
    from vitlab.layers.attention import kernel_record, reset_kernel_record, set_backend
    from vitlab.lit.build import (
        apply_model_options,
        build_datamodule,
        build_module,
        build_recipe,
        build_source,
        build_trainer,
        derive,
    )

    b = cfg.bench
    device = _device(cfg)
    measure_cpu_memory = bool(b.memory) and device.type == "cpu" and not cfg.model.get("compile")
    total = int(b.warmup) + int(b.steps) + int(measure_cpu_memory)
    run_cfg = _bench_cfg(cfg, total)
    set_backend(run_cfg.attention_backend, source=f"attention_backend={run_cfg.attention_backend}")
    try:
        source = build_source(run_cfg)
        num_classes, in_chans, data_note = source.num_classes, source.in_chans, source.name
    except (DatasetNotFoundError, FileNotFoundError) as e:
        if b.loader == "real":
            fail(f"bench.loader=real needs the dataset: {e}")
        source = None
        num_classes, in_chans, data_note = int(b.num_classes), 3, f"none ({type(e).__name__}): synthetic"
    pl.seed_everything(int(cfg.seed), verbose=False)
    data = DataInfo.from_source(source, int(run_cfg.data.img_size)) if source is not None else \
        DataInfo(num_classes=num_classes, in_chans=in_chans, name="synthetic", img_size=int(run_cfg.data.img_size))
    recipe = build_recipe(run_cfg, data)
    derived = derive(run_cfg, recipe)
    if derived.devices * derived.nodes != 1:
        fail(f"{PROG} train measures one device; got {derived.devices} device(s) x {derived.nodes} node(s). "
             "Set trainer.devices=1 (multi-device scaling is images/s x devices at best)")
    if str(derived.precision) not in PRECISIONS:
        fail(f"trainer.precision={derived.precision} is not benchmarked; use one of {', '.join(PRECISIONS)}")
    batch_size = int(run_cfg.data.batch_size)
    img_size = run_cfg.data.img_size

    # FLOPs on the eager model, before compile / checkpointing change how (not what) it computes
    probe = synthetic_batch(2, in_chans, img_size, num_classes, "cpu", seed=1)
    recipe.train()
    fwd_flops, train_flops = count_flops(recipe, probe["image"], probe["label"], recipe.task.loss)
    recipe.zero_grad(set_to_none=True)
    params = sum(p.numel() for p in recipe.parameters())
    done = apply_model_options(recipe, run_cfg.get("model"))

    module = build_module(run_cfg, recipe, derived, data)
    sync = _sync(device)
    times = StepTimes(int(b.warmup), sync)
    timer = _lightning_timer(times, int(b.warmup) + int(b.steps) if measure_cpu_memory else None, device)
    trainer = build_trainer(run_cfg, derived, monitor=(recipe.monitor, recipe.monitor_mode), callbacks=[timer],
                            logger=False)
    reset_kernel_record()
    if b.loader == "real":
        datamodule = build_datamodule(run_cfg, source)
        datamodule.validate(1)
        trainer.fit(module, datamodule=datamodule)
    else:
        batch = synthetic_batch(batch_size, in_chans, img_size, num_classes, device, int(cfg.seed))
        trainer.fit(module, train_dataloaders=SyntheticBatches(batch, total).loader())
    if len(times.compute) < int(b.steps):
        fail(f"only {len(times.compute)} of {b.steps} timed steps ran (the data ran out?); lower bench.steps")
    if device.type == "cuda":                        # the timed steps' peak (the counter was reset at the first)
        timer.memory["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    # the attention ops one forward of the trained (possibly compiled) model runs on the device, under the
    # precision's autocast: the kernels the timed steps used
    probe_images = synthetic_batch(2, in_chans, img_size, num_classes, device, seed=1)["image"]
    if str(derived.precision) == "bf16-true":
        probe_images = probe_images.to(next(module.recipe.parameters()).dtype)
    with _autocast(device, str(derived.precision)):
        attention_ops = _attention_ops(module.recipe, probe_images)
    row = {"name": label, "framework": "vitlab", "overrides": list(overrides), **times.summary(batch_size),
           "batch_size": batch_size, "precision": str(derived.precision), "params": params,
           "attention_backend": str(run_cfg.attention_backend), "model_options": done,
           # calls per kernel during training (compiled code is not recorded); the ops one eager forward ran
           "attention_kernels": kernel_record(), "attention_ops": attention_ops,
           "compile": bool(run_cfg.model.get("compile")),
           "activation_checkpointing": bool(run_cfg.model.get("activation_checkpointing")),
           "gflops_per_image_fwd": fwd_flops / 1e9, "gflops_per_image_train": train_flops / 1e9,
           "peak_memory_mib": timer.memory["peak_bytes"] / 2 ** 20 if "peak_bytes" in timer.memory else None,
           "loader": str(b.loader), "data": data_note, "num_classes": num_classes, "in_chans": in_chans}
    del trainer, module, recipe
    _free(device)
    return row


def _free(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------- timm row ---

def run_timm(cfg: DictConfig, num_classes: int, in_chans: int) -> dict:
    """timm's equivalent ViT trained in a plain PyTorch loop under the same settings as the vitlab row."""
    import timm
    import timm.layers
    import torch
    import torch.nn.functional as F
    from timm.optim import create_optimizer_v2
    from timm.utils import dispatch_clip_grad

    from vitlab.backbones.convert import create_timm_equivalent, timm_model_name
    from vitlab.data.base import DataInfo
    from vitlab.lit.build import build_recipe, resolve_precision

    b = cfg.bench
    device = _device(cfg)
    sync = _sync(device)
    precision = str(resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator))
    batch_size = int(cfg.data.batch_size)
    # the vitlab backbone this run builds, to read its architecture from
    backbone = build_recipe(cfg, DataInfo(num_classes=num_classes, in_chans=in_chans)).backbone
    timm.layers.set_fused_attn(True)
    model, differences = create_timm_equivalent(backbone, num_classes,
                                                drop_path_rate=float(cfg.backbone.get("drop_path_rate") or 0.0))
    registered = timm_model_name(backbone, num_classes)      # e.g. vit_base_patch16_224, when timm has the config
    del backbone
    smoothing = float(cfg.task.get("label_smoothing") or 0.0)

    def loss_fn(logits, labels):
        return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)

    probe = synthetic_batch(2, in_chans, cfg.data.img_size, num_classes, "cpu", seed=1)
    model.train()
    # counted like vitlab's: attention as its explicit matmuls (timm's non-fused path), not a fused kernel's
    fused = [m for m in model.modules() if hasattr(m, "fused_attn")]
    for m in fused:
        m.fused_attn = False
    fwd_flops, train_flops = count_flops(model, probe["image"], probe["label"], loss_fn)
    for m in fused:
        m.fused_attn = True
    model.zero_grad(set_to_none=True)
    params = sum(p.numel() for p in model.parameters())
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    model = model.to(device)
    if b.reference_compile:
        model.compile()
    opt = create_optimizer_v2(model, opt=str(cfg.optim.get("name", "adamw")), lr=float(cfg.optim.lr),
                              weight_decay=float(cfg.optim.get("weight_decay", 0.0)))
    scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None
    clip = cfg.trainer.get("gradient_clip_val")
    batch = synthetic_batch(batch_size, in_chans, cfg.data.img_size, num_classes, device, int(cfg.seed))
    images = batch["image"].to(torch.bfloat16) if precision == "bf16-true" else batch["image"]
    labels = batch["label"]
    times = StepTimes(int(b.warmup), sync)
    memory: dict[str, Any] = {}

    def step() -> None:
        with _autocast(device, precision):
            loss = loss_fn(model(images), labels)
        if scaler is not None:
            scaler.scale(loss).backward()
            if clip:
                scaler.unscale_(opt)
                dispatch_clip_grad(model.parameters(), float(clip))
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            if clip:
                dispatch_clip_grad(model.parameters(), float(clip))
            opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(int(b.warmup) + int(b.steps)):
        if i == int(b.warmup) and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times.start()
        step()
        times.end()
    if device.type == "cuda":
        memory["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    with _autocast(device, precision):
        attention_ops = _attention_ops(model, images[:2])
    if device.type == "cpu" and b.memory and not b.reference_compile:
        static = state_bytes(model, opt)
        with cpu_peak_bytes() as out:
            step()
        memory["peak_bytes"] = static + out["peak"]
    row = {"name": "timm", "framework": "timm", "overrides": [], **times.summary(batch_size),
           "batch_size": batch_size, "precision": precision, "params": params,
           "attention_backend": "timm fused (F.scaled_dot_product_attention)", "model_options": [],
           "attention_kernels": {}, "attention_ops": attention_ops,
           "compile": bool(b.reference_compile), "activation_checkpointing": False,
           "gflops_per_image_fwd": fwd_flops / 1e9, "gflops_per_image_train": train_flops / 1e9,
           "peak_memory_mib": memory["peak_bytes"] / 2 ** 20 if "peak_bytes" in memory else None,
           "loader": "synthetic", "data": "synthetic",
           "timm_model": f"{registered} (the same configuration)" if registered else _timm_name(model),
           "differences": differences, "timm": timm.__version__}
    _free(device)
    return row


def _timm_name(model) -> str:
    """A readable name for the reference, e.g. 'VisionTransformer(embed_dim=768, depth=12, patch=16, img=224)'."""
    pe = model.patch_embed
    return (f"timm VisionTransformer(embed_dim={model.embed_dim}, depth={len(model.blocks)}, "
            f"heads={model.blocks[0].attn.num_heads}, patch={pe.patch_size[0]}, img={pe.img_size[0]})")


# ------------------------------------------------------------------ driver ---

def _finish_row(row: dict, peak_tflops: dict[str, float], reference: Optional[dict]) -> dict:
    achieved = row["gflops_per_image_train"] * 1e9 * row["images_per_s"] / 1e12
    row["achieved_tflops"] = achieved
    row["mfu"] = achieved / peak_tflops["bfloat16"]
    run_dtype = "float32" if row["precision"] in ("32", "32-true") else "bfloat16" \
        if "bf16" in row["precision"] else "float16"
    row["mfu_vs_run_dtype"] = achieved / peak_tflops[run_dtype] if run_dtype in peak_tflops else None
    if reference is not None:
        row["ratio_vs_timm"] = row["images_per_s"] / reference["images_per_s"]
        row["compute_ratio_vs_timm"] = row["compute_images_per_s"] / reference["compute_images_per_s"]
    return row


def bench_train(cfg: DictConfig, argv: Sequence[str]) -> dict:
    import torch

    b = cfg.bench
    if int(b.steps) < 1 or int(b.warmup) < 1:
        fail(f"bench.steps and bench.warmup must be >= 1 (got {b.steps}, {b.warmup}); the first steps compile "
             "and allocate, so at least one is never timed")
    if b.loader not in ("synthetic", "real"):
        fail(f"bench.loader must be synthetic or real, got {b.loader!r}")
    if b.reference not in ("timm", None):
        fail(f"bench.reference must be timm or null, got {b.reference!r}")
    device = _device(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    size = int(b.matmul_size) if b.matmul_size != "auto" else (8192 if device.type == "cuda" else 1024)
    dtypes = ["bfloat16", "float32"] + (["float16"] if device.type == "cuda" else [])
    peak = {d: matmul_tflops(device, d, size) for d in dtypes}
    say(f"device {device} ({_device_name(device)}), torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"matmul {size}x{size}: " + ", ".join(f"{d} {v:.2f} TFLOP/s" for d, v in peak.items()))

    repeats = max(1, int(b.repeats))
    say(f"vitlab: {' '.join(argv) or '(defaults)'}")
    base_runs, ref_runs = [], []
    for rep in range(repeats):              # alternate, so load from other processes hits both sides alike
        base_runs.append(run_vitlab(cfg, "vitlab", []))
        if b.reference == "timm":
            if rep == 0:
                say("timm: the equivalent VisionTransformer, plain PyTorch loop")
            ref_runs.append(run_timm(cfg, base_runs[0]["num_classes"], base_runs[0]["in_chans"]))
    base = _merge(base_runs)
    reference = _merge(ref_runs) if ref_runs else None
    if reference is not None:
        say(f"timm reference: {reference['timm_model']}"
            + (f"; differences: {'; '.join(reference['differences'])}" if reference["differences"] else ""))
    if reference is not None and reference["params"] != base["params"] and not reference["differences"]:
        say(f"warning: parameter counts differ (vitlab {base['params']:,}, timm {reference['params']:,})")
    rows: list[dict] = [base]
    for variant in b.variants or []:
        extra = str(variant).split()
        say(f"vitlab variant: {' '.join(extra)}")
        vcfg = compose("bench_train", [*argv, *extra])
        rows.append(_merge([run_vitlab(vcfg, "vitlab " + " ".join(extra), extra) for _ in range(repeats)]))
    for r in rows:
        _finish_row(r, peak, reference)
    if reference is not None:
        rows.append(_finish_row(reference, peak, None))
    return {
        "vitlab": _headline(base), "timm": _headline(reference) if reference else None,
        "ratio_vs_timm": base.get("ratio_vs_timm"), "compute_ratio_vs_timm": base.get("compute_ratio_vs_timm"),
        "mfu": base["mfu"], "rows": rows, "peak_tflops": peak, "matmul_size": size,
        "device": f"{device} ({_device_name(device)})", "cpu": cpu_model(), "cpu_count": cpu_count(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "batch_size": base["batch_size"], "img_size": OmegaConf.to_container(cfg.data.img_size)
        if OmegaConf.is_config(cfg.data.img_size) else cfg.data.img_size,
        "precision": base["precision"], "steps": int(b.steps), "warmup": int(b.warmup), "loader": str(b.loader),
        "date": datetime.now().isoformat(timespec="seconds"),
    }


def _merge(runs: list[dict]) -> dict:
    """One row from repeated runs of the same configuration: the median over all their timed steps."""
    row = dict(runs[0])
    if len(runs) == 1:
        return row
    steps = [s for r in runs for s in r["step_ms_all"]]
    for key in ("step_ms", "compute_ms", "data_ms"):
        row[key] = statistics.median(r[key] for r in runs)
    row["step_ms"] = statistics.median(steps)
    row["step_ms_all"] = steps
    row["images_per_s"] = row["batch_size"] / (row["step_ms"] / 1e3)
    row["compute_images_per_s"] = row["batch_size"] / (row["compute_ms"] / 1e3)
    row["data_fraction"] = statistics.median(r["data_fraction"] for r in runs)
    row["images_per_s_runs"] = [r["images_per_s"] for r in runs]
    mems = [r["peak_memory_mib"] for r in runs if r.get("peak_memory_mib") is not None]
    row["peak_memory_mib"] = max(mems) if mems else None
    return row


def _headline(row: dict) -> dict:
    keys = ("images_per_s", "compute_images_per_s", "step_ms", "data_ms", "compute_ms", "peak_memory_mib",
            "mfu", "achieved_tflops", "gflops_per_image_train", "params")
    return {k: row.get(k) for k in keys}


def format_table(rows: Sequence[dict]) -> str:
    head = (f"{'run':<44}{'images/s':>10}{'step ms':>9}{'data ms':>9}{'peak MiB':>10}{'GFLOP/img':>10}"
            f"{'TFLOP/s':>9}{'MFU':>7}{'vs timm':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        mem = f"{r['peak_memory_mib']:>10,.0f}" if r.get("peak_memory_mib") is not None else f"{'n/a':>10}"
        ratio = f"{r['ratio_vs_timm']:>8.2f}x" if r.get("ratio_vs_timm") is not None else f"{'':>9}"
        name = r["name"] if len(r["name"]) <= 43 else r["name"][:40] + "..."
        lines.append(f"{name:<44}{r['images_per_s']:>10,.1f}{r['step_ms']:>9.1f}{r['data_ms']:>9.1f}{mem}"
                     f"{r['gflops_per_image_train']:>10.2f}{r['achieved_tflops']:>9.3f}{100 * r['mfu']:>6.1f}%{ratio}")
    return "\n".join(lines)


def _quiet_lightning() -> None:
    """The bench builds several Trainers: keep Lightning's start-up notes and tips out of the table's way."""
    import warnings

    import pytorch_lightning  # noqa: F401  (importing it sets its loggers to INFO: import first, then quieten)

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*`validation_step` but have no `val_dataloader`.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def train_main(argv: Sequence[str]) -> None:
    cfg = compose("bench_train", argv)
    _quiet_lightning()
    results = bench_train(cfg, argv)
    results["command"] = " ".join([PROG, "train", *argv])
    peak = results["peak_tflops"]
    print(f"\n{results['device']}, torch {results['torch']}, batch {results['batch_size']}, img {results['img_size']}, "
          f"{results['precision']}, {results['loader']} data, median of {results['steps']} steps after "
          f"{results['warmup']}; MFU vs the measured bf16 matmul rate ({peak['bfloat16']:.2f} TFLOP/s)\n"
          f"{format_table(results['rows'])}", flush=True)
    if results["ratio_vs_timm"] is not None:
        print(f"[bench] vitlab / timm = {results['ratio_vs_timm']:.3f}x images/s", flush=True)
    write_results(cfg.output_file, results)


main = train_main          # the subcommand's entry (vitlab.cli.bench.SUBCOMMANDS)
