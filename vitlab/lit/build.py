"""Composition: a resolved Hydra config -> source, model, LightningModule, DataModule, Trainer.

Values shared between groups are wired here, once: the backbone learns its
image size and channels from the data, the task its input width from the
backbone and its classes from the data. Derived numbers (global batch, the
learning rate after the recipe's scaling rule, the precision) are computed
here and printed at start.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.callbacks.progress import ProgressBar
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from vitlab.data import ClassificationSource
from vitlab.layers.attention import set_backend as set_attention_backend
from vitlab.lit.callbacks import AtomicCheckpointIO, DDPAgreement
from vitlab.lit.datamodule import VitlabDataModule
from vitlab.lit.module import VitlabModule
from vitlab.recipes import Recipe, Supervised

log = logging.getLogger("vitlab")


# ----------------------------------------------------------------- model ---

def build_source(cfg: DictConfig, check: bool = True) -> ClassificationSource:
    source = instantiate(cfg.data.source, _convert_="all")
    if check:
        source.check()                      # a missing dataset stops here, before any model is built
    return source


def source_info(source: Any) -> dict:
    """What the model needs to know of its data, saved in every checkpoint (``data_info``) so ``vitlab.load`` rebuilds
    the task alone: classes, channels, normalisation, and for dense data the class names, ignore index, palette."""
    info = {"num_classes": source.num_classes, "in_chans": source.in_chans, "name": getattr(source, "name", "?"),
            "task": getattr(source, "task", "classification"),
            "mean": [float(m) for m in source.mean], "std": [float(s) for s in source.std]}
    names = getattr(source, "class_names", None)
    if names is not None:
        info["class_names"] = [str(n) for n in names]
    if getattr(source, "ignore_index", None) is not None:
        info["ignore_index"] = int(source.ignore_index)
    if getattr(source, "palette", None) is not None:
        info["palette"] = [[int(c) for c in rgb] for rgb in source.palette]
    return info


def _task_kwargs(task_cls: type, backbone: torch.nn.Module, img_size: Any, data_info: dict) -> dict:
    """The values a task's constructor names (beyond in_dim and num_classes), from the backbone and the data."""
    params = inspect.signature(task_cls).parameters
    values = {"patch_size": getattr(backbone, "patch_size", None), "img_size": img_size,
              "pyramid_channels": getattr(backbone, "pyramid_channels", None),
              "pyramid_strides": getattr(backbone, "pyramid_strides", None),
              **{k: data_info.get(k) for k in ("class_names", "mean", "std", "ignore_index", "palette")}}
    return {k: v for k, v in values.items() if k in params and v is not None}


def check_task_fits_data(task_cls: type, data_task: str, data_name: str) -> None:
    """``task=detection data=cifar10`` (or the reverse) stops before any work, naming the fix."""
    kind = getattr(task_cls, "kind", "classification")
    if getattr(task_cls, "data_kind", kind) != data_task:
        raise ValueError(f"task={kind} cannot train on the {data_name} data, a {data_task} dataset: use "
                         f"task={data_task} with this data, or a {kind} dataset ("
                         + {"classification": "data=cifar10, imagefolder, ...", "detection": "data=voc or data=coco",
                            "segmentation": "data=camvid, ade20k or segfolder",
                            "diffusion": "labelled images: data=mnist, cifar10, imagefolder, ..."}.get(kind, "?") + ")")


def _denoiser_needed(cfg: DictConfig) -> str:
    name = str(cfg.backbone.get("_target_", "?")).rsplit(".", 1)[-1]
    return (f"task=diffusion needs a denoiser backbone (conditioned on the timestep and the class), not {name}: use "
            "backbone=dit or dit_tiny (or drop backbone=..., task=diffusion picks dit_tiny)")


def check_backbone_fits_task(backbone: torch.nn.Module, task_cls: type, cfg: DictConfig) -> None:
    """A denoiser (DiT) trains only with task=diffusion, and task=diffusion only with a denoiser."""
    denoiser = getattr(backbone, "kind", None) == "denoiser"
    diffusion = getattr(task_cls, "kind", None) == "diffusion"
    name = str(cfg.backbone.get("_target_", "?")).rsplit(".", 1)[-1]
    if diffusion and not denoiser:
        raise ValueError(_denoiser_needed(cfg))
    if denoiser and not diffusion:
        raise ValueError(f"backbone={name} is a diffusion denoiser: train it with task=diffusion, or use an image "
                         "encoder (backbone=vit_tiny, vit_small, ...) for this task")


def build_recipe(cfg: DictConfig, num_classes: int, in_chans: int, data_info: Optional[dict] = None) -> Recipe:
    """backbone (+ the options the recipe and the task need, e.g. SimMIM's mask token, UPerNet's feature taps)
    -> task -> recipe, then ``weights``."""
    data_info = {"num_classes": num_classes, "in_chans": in_chans, **(data_info or {})}
    recipe_cls = get_class(cfg.recipe._target_)
    task_cls = get_class(cfg.task._target_)
    check_task_fits_data(task_cls, data_info.get("task", "classification"), data_info.get("name", "?"))
    recipe_args = OmegaConf.to_container(cfg.recipe, resolve=True)
    task_args = OmegaConf.to_container(cfg.task, resolve=True)
    extra = recipe_cls.backbone_options(**{k: v for k, v in recipe_args.items() if not k.startswith("_")}) \
        if hasattr(recipe_cls, "backbone_options") else {}
    if hasattr(task_cls, "backbone_options"):
        extra.update(task_cls.backbone_options(**{k: v for k, v in task_args.items() if not k.startswith("_")}))
    geometry = {"img_size": cfg.data.img_size, "in_chans": in_chans}
    if hasattr(task_cls, "denoiser_options"):       # diffusion: the latent geometry, the classes, the output channels
        geometry = task_cls.denoiser_options(cfg.data.img_size, in_chans, num_classes,
                                             **{k: v for k, v in task_args.items() if not k.startswith("_")})
    try:
        backbone = instantiate(cfg.backbone, _convert_="all", **geometry, **extra)
    except InstantiationException as e:        # an image encoder handed a denoiser's arguments (num_classes, ...)
        if getattr(task_cls, "kind", None) == "diffusion" and "unexpected keyword" in str(e.__cause__ or e):
            raise ValueError(_denoiser_needed(cfg)) from e
        raise
    check_backbone_fits_task(backbone, task_cls, cfg)
    task_kwargs = _task_kwargs(task_cls, backbone, cfg.data.img_size, data_info)
    if task_args.get("classifier") and "classifier_factory" in inspect.signature(task_cls).parameters:
        # loaded lazily, on the first sample evaluation: building the task (or loading a checkpoint) never needs it
        task_kwargs["classifier_factory"] = functools.partial(load_judge, task_args["classifier"], num_classes)
    task = instantiate(cfg.task, in_dim=backbone.embed_dim, num_classes=num_classes, _convert_="all", **task_kwargs)
    kwargs = {}
    if "teacher_factory" in inspect.signature(recipe_cls).parameters and recipe_args.get("teacher"):
        # loaded lazily by the recipe, on its first training step: evaluating a distilled student never needs it
        kwargs["teacher_factory"] = functools.partial(load_teacher, recipe_args["teacher"],
                                                      recipe_args.get("teacher_model"), num_classes, in_chans)
    recipe = instantiate(cfg.recipe, backbone=backbone, task=task, _convert_="all", **kwargs)
    # the other recipes (distillation, MAE, SimMIM, DINO) read labels or images only: pretrain on images, then
    # fine-tune the backbone for the dense task
    if getattr(task, "kind", "classification") != "classification" and type(recipe) is not Supervised:
        raise ValueError(f"recipe={type(recipe).__name__.lower()} does not train a {task.kind} task; use "
                         f"recipe=supervised (pretrain with recipe=mae/dino on classification images, then fine-tune "
                         "with task=" + task.kind + " weights=PATH)")
    if cfg.get("weights"):
        load_weights(recipe, cfg.weights)
    return recipe


def is_vitlab_checkpoint(path: str) -> bool:
    """A file written by vitlab-train (it holds the resolved config under "vitlab")."""
    p = Path(str(path))
    if not p.is_file() or p.suffix == ".safetensors":
        return False
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False, mmap=True)
    except Exception:
        return False
    return isinstance(ckpt, dict) and isinstance(ckpt.get("vitlab"), dict)


def load_weights(recipe: Recipe, source: str) -> None:
    """``weights=...``: initialise the backbone from a vitlab checkpoint (any recipe's: the backbone it evaluates,
    e.g. MAE's encoder or DINO's teacher, EMA weights when the run kept them), or from timm ViT / DeiT weights
    (a file, an URL, or timm:NAME). Position embeddings are resampled to this run's grid; the task head starts
    fresh for a vitlab checkpoint (fine-tuning), and is loaded from timm weights when it fits."""
    if is_vitlab_checkpoint(source):
        pretrained = load_checkpoint(source).eval_recipe().eval_backbone()
        load_backbone_state(recipe.backbone, pretrained.state_dict(), source)
        return
    from vitlab.backbones.convert import load_timm_weights

    load_timm_weights(recipe.backbone, source, head=getattr(recipe.task, "head", None),
                      dist_head=getattr(recipe, "dist_head", None))


def _fit_pos_embed(pe: torch.Tensor, backbone: torch.nn.Module, own: torch.Tensor, source: str) -> torch.Tensor:
    """A checkpoint's position table (1, P + h*w, D) -> this backbone's: the patch rows resampled to its grid, the
    prefix rows (class / distillation token) kept where both have them, dropped where only the checkpoint has them
    (ViTDet fine-tunes MAE weights without the class token), and left at their init where only this one has."""
    from vitlab.layers.pos_embed import resample_abs_pos_embed

    own_prefix = int(getattr(backbone, "num_pos_prefix", 1))
    candidates = [own_prefix] + [p for p in (0, 1, 2) if p != own_prefix]
    src_prefix = next((p for p in candidates if pe.shape[1] > p and math.isqrt(pe.shape[1] - p) ** 2
                       == pe.shape[1] - p), None)
    if src_prefix is None:
        raise ValueError(f"cannot resample the position embeddings of {source}: {pe.shape[1]} rows are not a square "
                         "grid plus class / distillation rows")
    side = math.isqrt(pe.shape[1] - src_prefix)
    patches = pe[:, src_prefix:]
    if (side, side) != tuple(backbone.grid):
        patches = resample_abs_pos_embed(patches, backbone.grid, (side, side), 0)
        log.info("weights: position embeddings resampled from %dx%d to %dx%d", side, side, *backbone.grid)
    keep = min(src_prefix, own_prefix)
    prefix = torch.cat([pe[:, :keep], own[:, keep:own_prefix].to(pe.dtype)], dim=1)
    if src_prefix != own_prefix:
        log.info("weights: %d prefix position row(s) in %s, %d in this backbone (%s)", src_prefix, source,
                 own_prefix, "extra rows dropped" if src_prefix > own_prefix else "missing rows keep their init")
    return torch.cat([prefix, patches], dim=1)


def load_backbone_state(backbone: torch.nn.Module, state: dict, source: str) -> None:
    """Load a backbone state dict into ``backbone``, resampling position embeddings to its grid. Tokens one side
    has and the other lacks (a class token dropped for detection, a mask token from MAE/SimMIM pretraining, a
    distillation token) are reported."""
    own = backbone.state_dict()
    state = dict(state)
    pe = state.get("pos_embed")
    if pe is not None and "pos_embed" in own and pe.shape != own["pos_embed"].shape \
            and pe.shape[-1] == own["pos_embed"].shape[-1]:        # another width is refused below
        state["pos_embed"] = _fit_pos_embed(pe, backbone, own["pos_embed"], source)
    optional = ("mask_token", "dist_token", "cls_token", "fc_norm.weight", "fc_norm.bias", "norm.weight", "norm.bias")
    shape_bad = [k for k in own if k in state and state[k].shape != own[k].shape]
    if shape_bad:
        raise ValueError(f"the weights in {source} do not fit this backbone: {', '.join(shape_bad[:5])} differ in "
                         "shape (a different width, depth or patch size?); use the backbone the checkpoint was "
                         "trained with")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if [k for k in missing if k not in optional] or [k for k in unexpected if k not in optional]:
        raise ValueError(f"the weights in {source} do not fit this backbone: missing {missing[:6]}, unexpected "
                         f"{unexpected[:6]}; use the backbone configuration the checkpoint was trained with")
    backbone.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    log.info("weights: backbone initialised from %s%s", source,
             f" (kept fresh: {', '.join(missing)}; not used: {', '.join(unexpected)})" if missing or unexpected else "")


def load_teacher(path: str, teacher_model: Optional[str], num_classes: int, in_chans: int) -> torch.nn.Module:
    """The distillation teacher (images -> logits), frozen: a vitlab checkpoint of any classifier (its EMA weights
    when it kept them), or a timm model ``teacher_model`` whose weights are in the file ``path``."""
    if not Path(str(path)).is_file():
        raise FileNotFoundError(f"recipe.teacher={path} does not exist; give a vitlab checkpoint (a run's "
                                "checkpoints/best.ckpt) or a timm weights file with recipe.teacher_model=NAME")
    if is_vitlab_checkpoint(path):
        module = load_checkpoint(path)
        got = module.data_info.get("num_classes")
        if got != num_classes:
            raise ValueError(f"the teacher {path} predicts {got} classes but this dataset has {num_classes}; "
                             "distil from a teacher trained on the same classes")
        teacher = module.eval_recipe()
        if teacher.pretraining:
            raise ValueError(f"the teacher {path} is a {type(teacher).__name__} pretraining checkpoint without a "
                             "trained classifier; fine-tune it first (recipe=supervised weights=PATH)")
        log.info("distillation teacher: %s from %s", type(teacher.backbone).__name__, path)
        return teacher
    from vitlab.recipes.distill import load_timm_teacher

    if not teacher_model:
        raise ValueError(f"recipe.teacher={path} is not a vitlab checkpoint; name its timm architecture with "
                         "recipe.teacher_model=NAME (e.g. resnet50)")
    return load_timm_teacher(path, teacher_model, num_classes, in_chans)


class SampleJudge:
    """A trained vitlab classifier as the judge of generated samples: images in [0, 1] (B, C, H, W) -> logits, or
    -> its pooled features (FID / KID in its feature space). Samples are resized to the classifier's input size,
    given its channel count (grey <-> RGB) and normalised with its data's statistics."""

    def __init__(self, recipe: torch.nn.Module, img_size: int, mean: list, std: list):
        self.recipe = recipe.eval().requires_grad_(False)
        self.img_size = int(img_size)
        self.mean, self.std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        self.recipe.to(images.device)
        x = images.float()
        c = self.mean.shape[1]
        if x.shape[1] != c:                  # grey samples for an RGB classifier, or the reverse
            x = x.expand(-1, c, -1, -1) if x.shape[1] == 1 else x.mean(dim=1, keepdim=True)
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = torch.nn.functional.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear",
                                                antialias=True, align_corners=False)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.recipe(self._prepare(images))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.recipe.features(self._prepare(images))


def load_judge(path: str, num_classes: int) -> SampleJudge:
    """``task.classifier=PATH``: the vitlab classifier checkpoint (its EMA weights when it kept them) that scores
    generated samples; it must predict the same classes as the diffusion data."""
    if not is_vitlab_checkpoint(path):
        raise FileNotFoundError(f"task.classifier={path} is not a vitlab checkpoint; train a classifier on the same "
                                "data first (e.g. vitlab-train experiment=vit_mnist) and give its "
                                "checkpoints/best.ckpt")
    module = load_checkpoint(path)
    info = module.data_info
    kind = getattr(module.eval_recipe().task, "kind", "classification")       # the model's task, not the data's
    if kind != "classification" or info.get("task", "classification") != "classification" \
            or module.eval_recipe().pretraining:
        raise ValueError(f"task.classifier={path} is not a trained classifier (a {kind} / pretraining checkpoint); "
                         "give a classification checkpoint trained on the same data")
    if info.get("num_classes") != num_classes:
        raise ValueError(f"the classifier {path} predicts {info.get('num_classes')} classes but this data has "
                         f"{num_classes}; judge samples with a classifier trained on the same classes")
    img_size = OmegaConf.create(module.config).data.img_size
    log.info("sample judge: %s (%d classes, %s px)", path, num_classes, img_size)
    return SampleJudge(module.eval_recipe(), img_size, info["mean"], info["std"])


def apply_model_options(recipe: Recipe, options: Optional[DictConfig]) -> list[str]:
    """The run-time knobs of ``cfg.model`` (they change speed and memory, never the maths): activation
    checkpointing per block, then ``torch.compile`` of the backbone. Returns what was done, for the log.

    ``nn.Module.compile`` compiles in place, so parameter names (and checkpoints) stay those of the eager model.
    """
    done: list[str] = []
    if not options:
        return done
    backbone = recipe.backbone
    if options.get("activation_checkpointing"):
        setter = getattr(backbone, "set_grad_checkpointing", None)
        if setter is None:
            raise ValueError(f"model.activation_checkpointing=true, but the backbone {type(backbone).__name__} "
                             "does not support it (no set_grad_checkpointing); set it to false")
        setter(True)
        done.append(f"activation checkpointing in each of {len(getattr(backbone, 'blocks', []))} blocks")
    if options.get("compile"):
        mode = options.get("compile_mode") or None
        backbone.compile(mode=mode, dynamic=options.get("compile_dynamic"), fullgraph=False)
        done.append(f"torch.compile(backbone, mode={mode or 'default'})")
    return done


# -------------------------------------------------------- derived numbers ---

def _num_devices(devices: Any, accelerator: str) -> int:
    """How many devices Lightning will use for ``devices`` (int, list of ids, "0,1", "2", "auto", -1)."""
    if OmegaConf.is_config(devices):
        devices = OmegaConf.to_container(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.strip().isdigit():
        return int(devices)
    if isinstance(devices, str) and "," in devices:          # Lightning reads "0,1" as the device ids [0, 1]
        return len([d for d in devices.split(",") if d.strip()])
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1


def resolve_precision(precision: Any, accelerator: str) -> Any:
    """'auto' -> bf16-mixed on a CUDA GPU that supports it, else 32."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    if on_gpu and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


@dataclass
class Derived:
    per_device_batch: int
    devices: int
    nodes: int
    accumulation: int
    global_batch: int
    base_lr: float
    lr: float
    precision: Any
    lr_text: str

    def describe(self) -> str:
        return (f"global batch = {self.global_batch} (per device {self.per_device_batch} x devices {self.devices} "
                f"x nodes {self.nodes} x accumulation {self.accumulation}); {self.lr_text}; "
                f"precision = {self.precision}")


def derive(cfg: DictConfig, recipe: Recipe) -> Derived:
    t = cfg.trainer
    devices = _num_devices(t.devices, t.accelerator)
    nodes, accum = int(t.num_nodes), int(t.accumulate_grad_batches)
    global_batch = int(cfg.data.batch_size) * devices * nodes * accum
    base_lr = float(cfg.optim.lr)
    return Derived(int(cfg.data.batch_size), devices, nodes, accum, global_batch, base_lr,
                   recipe.scaled_lr(base_lr, global_batch), resolve_precision(t.precision, t.accelerator),
                   recipe.describe_lr(base_lr, global_batch))


# ------------------------------------------------------------- lightning ---

def build_datamodule(cfg: DictConfig, source: ClassificationSource, recipe: Optional[Recipe] = None
                     ) -> VitlabDataModule:
    d = cfg.data
    mixup = OmegaConf.to_container(d.mixup, resolve=True) if d.get("mixup") else None
    train_transform = recipe.train_transform(d.img_size, source.mean, source.std, source.in_chans) \
        if recipe is not None else None
    mixing = bool(mixup and (mixup.get("mixup_alpha") or mixup.get("cutmix_alpha")))
    task_transform = getattr(getattr(recipe, "task", None), "train_transform", None)
    if train_transform is None and task_transform is not None:
        # diffusion: DiT's resize + centre crop + the data's flip, whatever data.augment says otherwise
        train_transform = task_transform(d.img_size, source.mean, source.std,
                                         augment=OmegaConf.to_container(d.augment, resolve=True))
        log.info("data: the %s task's own training transform replaces data.augment (flip: data.augment.hflip)",
                 recipe.task.kind)
        if mixing:
            from vitlab.data.base import DataConfigError

            raise DataConfigError(f"task={recipe.task.kind} learns the images themselves; mixup / cutmix would make "
                                  "it learn blends: set data.mixup.mixup_alpha=0 and data.mixup.cutmix_alpha=0")
    elif train_transform is not None:
        log.info("data: the %s recipe's own training transform replaces data.augment", type(recipe).__name__)
        if mixing:
            from vitlab.data.base import DataConfigError

            raise DataConfigError(f"recipe {type(recipe).__name__} brings its own multi-view transform; mixup / "
                                  "cutmix cannot mix lists of views: set data.mixup.mixup_alpha=0 and "
                                  "data.mixup.cutmix_alpha=0")
    return VitlabDataModule(source, img_size=d.img_size, batch_size=d.batch_size, num_workers=d.num_workers,
                            augment=OmegaConf.to_container(d.augment, resolve=True), seed=cfg.seed,
                            eval_batch_size=d.get("eval_batch_size"), mixup=mixup,
                            repeated_aug=d.get("repeated_aug", 0), batched_augment=d.get("batched_augment", False),
                            max_corrupt_fraction=d.get("max_corrupt_fraction", 0.01), train_transform=train_transform)


def build_module(cfg: DictConfig, recipe: Recipe, derived: Derived, source: ClassificationSource) -> VitlabModule:
    optimizer_factory = instantiate(cfg.optim, lr=derived.lr, _convert_="all")
    scheduler_factory = instantiate(cfg.sched, _convert_="all") if cfg.get("sched") else None
    fault = cfg.get("fault") or {}                 # configs saved before the fault: block have none
    return VitlabModule(recipe, optimizer_factory, scheduler_factory,
                        config=OmegaConf.to_container(cfg, resolve=True),
                        data_info=source_info(source),
                        loss_check_interval=cfg.get("loss_check_interval"), ema=_ema_options(cfg),
                        nonfinite=fault.get("nonfinite", "stop"),
                        max_skipped_steps=fault.get("max_skipped_steps", 20))


def _ema_options(cfg: DictConfig) -> Optional[dict]:
    """The ``ema:`` block; ``enabled: auto`` / ``warmup: auto`` follow the task (on, with timm's warm-up, for
    task=diffusion, which samples with EMA weights as DiT does; off for the others)."""
    ema = cfg.get("ema")
    if not ema:
        return None
    ema = OmegaConf.to_container(ema, resolve=True)
    task_default = bool(getattr(get_class(cfg.task._target_), "ema_default", False))
    if ema.get("enabled") == "auto":
        ema["enabled"] = task_default
    if ema.get("warmup") == "auto":
        ema["warmup"] = task_default
    if not ema.get("enabled"):
        return None
    if cfg.trainer.get("strategy") == "fsdp" or "fsdp" in str(cfg.trainer.get("strategy", "")).lower():
        raise ValueError("ema.enabled=true is not supported with trainer=fsdp yet (the EMA copy is not sharded); "
                         "use trainer=ddp, or turn the EMA off")
    return ema


def _loggers(cfg: DictConfig, wandb_run_id: Optional[str]) -> list:
    out = []
    for name, lcfg in (cfg.get("logger") or {}).items():
        if lcfg is None:
            continue
        extra = {}
        if "Wandb" in str(lcfg.get("_target_", "")):
            # Never prompt: without an API key (or a login) wandb runs offline and syncs later.
            os.environ.setdefault("WANDB_SILENT", "true")
            if lcfg.get("offline") in (None, "auto"):
                extra["offline"] = not (os.environ.get("WANDB_API_KEY") or _wandb_logged_in())
            if extra.get("offline") or lcfg.get("offline") is True:
                os.environ["WANDB_MODE"] = "offline"
            if wandb_run_id:
                extra.update(id=wandb_run_id, resume="allow")
        out.append(instantiate(lcfg, _convert_="all", **extra))
    return out


def _wandb_logged_in() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def build_trainer(cfg: DictConfig, derived: Derived, wandb_run_id: Optional[str] = None,
                  monitor: Optional[tuple[Optional[str], str]] = None, dense: bool = False,
                  **overrides: Any) -> pl.Trainer:
    """``monitor``: (metric, mode) of the built recipe, for a callback whose config says ``monitor: auto`` (the
    checkpoint callback reads ``${recipe.monitor}``, which is ``auto`` when the task decides: val/top1, val/map,
    val/miou).

    ``dense`` (a detection or segmentation task): ``trainer.strategy=ddp`` runs with ``find_unused_parameters``.
    A dense head reads only some of the backbone's outputs (UPerNet the pre-norm taps, not the final norm; a ViTDet
    backbone's ``fc_norm`` feeds only the pooled vector), and torchvision's detectors may skip heads on some
    steps, so some parameters get no gradient, which plain DDP cannot reduce."""
    loggers = _loggers(cfg, wandb_run_id)
    callbacks = [DDPAgreement()]
    for name, ccfg in (cfg.get("callbacks") or {}).items():
        if ccfg is not None:
            extra = {}
            if ccfg.get("monitor") == "auto":
                if monitor is None:                     # no recipe at hand: the task's metric
                    task_cls = get_class(cfg.task._target_)
                    monitor = (getattr(task_cls, "monitor", "val/top1"), getattr(task_cls, "monitor_mode", "max"))
                extra = {"monitor": monitor[0], "mode": monitor[1]}
            cb = instantiate(ccfg, _convert_="all", **extra)
            if isinstance(cb, ProgressBar) and not cfg.trainer.get("enable_progress_bar", True):
                continue                   # trainer.enable_progress_bar=false turns the bar off
            if isinstance(cb, LearningRateMonitor) and not loggers:
                continue                   # logger=[]: nothing to log the lr to
            callbacks.append(cb)
    if cfg.get("checkpoint_every_n_steps"):
        # mid-epoch last.ckpt: the train loader's position is in it, so a resume continues the epoch
        from pytorch_lightning.callbacks import ModelCheckpoint     # the stock one: writes only every N steps

        callbacks.append(ModelCheckpoint(dirpath=str(Path(cfg.paths.output_dir) / "checkpoints"), save_top_k=0,
                                         save_last=True, every_n_train_steps=int(cfg.checkpoint_every_n_steps),
                                         enable_version_counter=False))
    # -- fault tolerance (vitlab/lit/fault.py): a preemption signal -> last.ckpt at the next step, then a requeue.
    # After the configured callbacks: the run's history already holds the step when that checkpoint is written.
    from vitlab.lit.fault import fault_callbacks

    callbacks.extend(fault_callbacks(cfg))          # + the epoch's training sums in every checkpoint
    # -- end fault tolerance
    kwargs = dict(precision=derived.precision, callbacks=callbacks, logger=loggers or False,
                  plugins=[AtomicCheckpointIO()], use_distributed_sampler=False, default_root_dir=cfg.paths.output_dir)
    if dense and cfg.trainer.get("strategy") == "ddp":
        from pytorch_lightning.strategies import DDPStrategy

        kwargs["strategy"] = DDPStrategy(find_unused_parameters=True)
        log.info("ddp: find_unused_parameters=True (a dense task reads only some of the backbone's outputs)")
    kwargs.update(overrides)
    return instantiate(cfg.trainer, _convert_="all", **kwargs)


def _checkpoint_meta(path: str) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt.get("vitlab", {})


@dataclass
class Run:
    cfg: DictConfig
    source: ClassificationSource
    module: VitlabModule
    datamodule: VitlabDataModule
    trainer: pl.Trainer
    derived: Derived


def build_run(cfg: DictConfig) -> Run:
    """Everything a training run needs, validated before any work is done."""
    set_attention_backend(cfg.attention_backend, source=f"attention_backend={cfg.attention_backend}")
    source = build_source(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    teacher = cfg.recipe.get("teacher")
    if teacher and not Path(str(teacher)).is_file():      # read on the first step: check it before any work
        raise FileNotFoundError(f"recipe.teacher={teacher} does not exist; give a vitlab checkpoint (a run's "
                                "checkpoints/best.ckpt) or a timm weights file with recipe.teacher_model=NAME")
    judge = cfg.task.get("classifier")
    if judge and not is_vitlab_checkpoint(str(judge)):     # read at the first validation: check it before any work
        raise FileNotFoundError(f"task.classifier={judge} is not a vitlab checkpoint (missing or another format); "
                                "train a classifier on the same data first (e.g. vitlab-train experiment=vit_mnist) "
                                "and give its checkpoints/best.ckpt, or set task.classifier=null")
    if cfg.task.get("fid"):                                 # FID / KID with Inception features: weights present?
        from vitlab.metrics.generative import check_fid_setup

        check_fid_setup(OmegaConf.to_container(cfg.task.fid, resolve=True))
    recipe = build_recipe(cfg, source.num_classes, source.in_chans, source_info(source))
    derived = derive(cfg, recipe)
    module = build_module(cfg, recipe, derived, source)        # before compile: the EMA copies the eager recipe
    for what in apply_model_options(recipe, cfg.get("model")):
        log.info("model: %s", what)
    wandb_id = None
    if cfg.get("ckpt_path"):
        if not Path(cfg.ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path} does not exist; point it at a run's "
                                    "checkpoints/last.ckpt to resume")
        wandb_id = _checkpoint_meta(cfg.ckpt_path).get("wandb_run_id")
    trainer = build_trainer(cfg, derived, wandb_id, monitor=(recipe.monitor, recipe.monitor_mode),
                            dense=getattr(recipe.task, "kind", "classification") in ("detection", "segmentation"))
    for lg in trainer.loggers:
        if lg.__class__.__name__ == "WandbLogger" and trainer.is_global_zero:
            module.wandb_run_id = lg.version
    datamodule = build_datamodule(cfg, source, recipe)
    datamodule.validate(trainer.world_size)          # e.g. too few shards for ranks x workers: stop now
    return Run(cfg, source, module, datamodule, trainer, derived)


# ------------------------------------------------------------ checkpoints ---

def load_checkpoint(path: str, map_location: str = "cpu") -> VitlabModule:
    """Rebuild the model from a checkpoint alone (its resolved config) and load its weights."""
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    meta = ckpt.get("vitlab")
    if not meta or not meta.get("config"):
        raise ValueError(f"{path} is not a vitlab checkpoint (it holds no resolved config)")
    cfg = OmegaConf.merge(OmegaConf.create(meta["config"]), {"weights": None})
    info = meta["data_info"]
    module = VitlabModule(build_recipe(cfg, info["num_classes"], info["in_chans"], info), config=meta["config"],
                          data_info=info, ema=_ema_options(cfg))
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    return module
