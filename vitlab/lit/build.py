"""Composition: a resolved Hydra config -> source, model, LightningModule, DataModule, Trainer.

Values shared between groups are wired here, once, through the declared contracts: the backbone gets its
geometry from the task and the data (``Task.backbone_options``) and its extra tokens from the recipe
(``Recipe.backbone_options``); the task is built from the data and the backbone (``Task.from_data``); the recipe
from its config, the backbone and the task (``Recipe.from_config``). Nothing here branches on a task's, recipe's
or backbone's name: what differs between them is read from their declared attributes (``Task.data_kind``,
``backbone_kind``, ``find_unused_parameters``, ``ema_default``, ``pretrainable``; ``Recipe.task_agnostic``;
``Backbone.kind``). Derived numbers (global batch, the learning rate after the recipe's scaling rule, the
precision) are computed here and printed at start.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from hydra.utils import get_class, get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.callbacks.progress import ProgressBar

from vitlab.backbones.base import KIND_TEXT, kind_of
from vitlab.checkpoints import is_vitlab_checkpoint, read_checkpoint, read_meta, upgrade_config
from vitlab.data import DataSource
from vitlab.data.base import DataConfigError, DataInfo
from vitlab.layers.attention import set_backend as set_attention_backend
from vitlab.lit.callbacks import AtomicCheckpointIO, DDPAgreement
from vitlab.lit.datamodule import VitlabDataModule
from vitlab.lit.module import VitlabModule
from vitlab.recipes import Recipe
from vitlab.tasks.base import BuildContext, LoadedModel, Task, task_options

log = logging.getLogger("vitlab")

__all__ = ["Derived", "Run", "apply_model_options", "build_datamodule", "build_module", "build_recipe", "build_run",
           "build_source", "build_trainer", "check_backbone_fits_task", "check_recipe_fits_task",
           "check_task_fits_data", "data_info", "derive", "is_vitlab_checkpoint", "load_checkpoint", "load_model",
           "load_weights", "resolve_precision"]


# ------------------------------------------------------------------ data ---

def build_source(cfg: DictConfig, check: bool = True) -> DataSource:
    """The data source of ``cfg.data`` (instantiating it reads no file); ``check``: its files are there (a missing
    dataset stops here, before any model is built)."""
    source = instantiate(cfg.data.source, _convert_="all")
    if check:
        source.check()
    return source


def data_info(cfg: DictConfig, source: DataSource) -> DataInfo:
    """What the model needs to know of its data (stored in every checkpoint)."""
    return DataInfo.from_source(source, int(cfg.data.img_size))


# ----------------------------------------------------------------- model ---

def _target_name(node: DictConfig) -> str:
    return str(node.get("_target_", "?")).rsplit(".", 1)[-1]


def _an(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def check_task_fits_data(task_cls: type[Task], data_task: str, data_name: str) -> None:
    """``task=detection data=cifar10`` (or the reverse) stops before any work, naming the fix."""
    if task_cls.data_kind != data_task:
        raise ValueError(f"task={task_cls.kind} cannot train on the {data_name} data, {_an(data_task)} dataset: use "
                         f"task={data_task} with this data, or {_an(task_cls.data_kind)} dataset "
                         f"({task_cls.data_hint})")


def check_backbone_fits_task(cfg: DictConfig, task_cls: type[Task]) -> None:
    """A denoiser (DiT) trains only with task=diffusion, and task=diffusion only with a denoiser: the backbone's
    declared kind, read before it is built."""
    kind = kind_of(get_object(cfg.backbone._target_))
    if kind != task_cls.backbone_kind:
        raise ValueError(f"task={task_cls.kind} needs {_an(task_cls.backbone_kind)} backbone, not "
                         f"backbone={_target_name(cfg.backbone)}, which is {KIND_TEXT.get(kind, kind)}: "
                         f"{task_cls.backbone_hint}")


def check_recipe_fits_task(recipe_cls: type[Recipe], task_cls: type[Task]) -> None:
    """Pretraining and distillation read images and class labels only: a task with other targets (boxes, masks,
    several labels, samples) trains with recipe=supervised."""
    if not recipe_cls.task_agnostic and not task_cls.pretrainable:
        raise ValueError(f"recipe={recipe_cls.__name__.lower()} does not train a {task_cls.kind} task; use "
                         "recipe=supervised (pretrain with recipe=mae/dino on classification images, then fine-tune "
                         f"with task={task_cls.kind} weights=PATH)")


def build_recipe(cfg: DictConfig, data: DataInfo) -> Recipe:
    """backbone (its geometry from the task and the data, its extra tokens from the recipe) -> task (from the data
    and the backbone) -> recipe, then ``weights``. The checks run before anything is built."""
    if data.img_size is None:
        data = data.replace(img_size=int(cfg.data.img_size))
    recipe_cls, task_cls = get_class(cfg.recipe._target_), get_class(cfg.task._target_)
    check_task_fits_data(task_cls, data.task, data.name)
    check_backbone_fits_task(cfg, task_cls)
    check_recipe_fits_task(recipe_cls, task_cls)
    recipe_opts = task_options(OmegaConf.to_container(cfg.recipe, resolve=True))
    task_opts = task_options(OmegaConf.to_container(cfg.task, resolve=True))
    backbone = instantiate(cfg.backbone, _convert_="all", **task_cls.backbone_options(task_opts, data),
                           **recipe_cls.backbone_options(recipe_opts))
    context = BuildContext(load_model=load_model)
    try:
        task = task_cls.from_data(task_opts, data, backbone, context)
    except TypeError as e:            # an option the task does not take (+task.foo=1), as Hydra reported it
        raise ValueError(f"task={task_cls.kind} ({cfg.task._target_}): {e}") from e
    try:
        recipe = recipe_cls.from_config(recipe_opts, backbone, task, context)
    except TypeError as e:
        raise ValueError(f"recipe {cfg.recipe._target_}: {e}") from e
    if cfg.get("weights"):
        load_weights(recipe, cfg.weights)
    return recipe


def load_weights(recipe: Recipe, source: str) -> None:
    """``weights=...``: initialise the backbone from a vitlab checkpoint (any recipe's: the backbone it evaluates,
    e.g. MAE's encoder or DINO's teacher, EMA weights when the run kept them), or from weights in another library's
    format (timm ViT / DeiT for a ViT: a file, an URL, or timm:NAME). The backbone adapts the state to itself
    (position embeddings resampled to this run's grid); the task head starts fresh for a vitlab checkpoint
    (fine-tuning), and takes a timm classifier when it fits."""
    if is_vitlab_checkpoint(source):
        pretrained = load_model(source).recipe.eval_backbone()
        recipe.backbone.load_pretrained(pretrained.state_dict(), source)
        return
    recipe.backbone.load_external_weights(source, recipe.pretrained_heads())


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
        backbone.set_grad_checkpointing(True)          # the contract; a backbone without it says so
        done.append(f"activation checkpointing in each of {backbone.num_layers} blocks")
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

def build_datamodule(cfg: DictConfig, source: DataSource, recipe: Optional[Recipe] = None) -> VitlabDataModule:
    """The data module of ``cfg.data``. A recipe's own training transform (DINO's multi-crop), else its task's
    (diffusion's resize + centre crop), replaces ``data.augment`` for the training split."""
    d = cfg.data
    mixup = OmegaConf.to_container(d.mixup, resolve=True) if d.get("mixup") else None
    augment = OmegaConf.to_container(d.augment, resolve=True)
    train_transform, owner = None, ""
    if recipe is not None:
        train_transform = recipe.train_transform(d.img_size, source.mean, source.std, source.in_chans)
        owner = f"the {type(recipe).__name__} recipe"
        if train_transform is None:
            train_transform = recipe.task.train_transform(d.img_size, source.mean, source.std, augment=augment)
            owner = f"the {recipe.task.kind} task"
    if train_transform is not None:
        log.info("data: %s's own training transform replaces data.augment", owner)
        if mixup and (mixup.get("mixup_alpha") or mixup.get("cutmix_alpha")):
            raise DataConfigError(f"{owner} brings its own training transform (its views or images are what it "
                                  "learns): mixup / cutmix cannot apply; set data.mixup.mixup_alpha=0 and "
                                  "data.mixup.cutmix_alpha=0")
    return VitlabDataModule(source, img_size=d.img_size, batch_size=d.batch_size, num_workers=d.num_workers,
                            augment=augment, seed=cfg.seed, eval_batch_size=d.get("eval_batch_size"), mixup=mixup,
                            repeated_aug=d.get("repeated_aug", 0), batched_augment=d.get("batched_augment", False),
                            max_corrupt_fraction=d.get("max_corrupt_fraction", 0.01), train_transform=train_transform)


def build_module(cfg: DictConfig, recipe: Recipe, derived: Derived, data: DataInfo) -> VitlabModule:
    optimizer_factory = instantiate(cfg.optim, lr=derived.lr, _convert_="all")
    scheduler_factory = instantiate(cfg.sched, _convert_="all") if cfg.get("sched") else None
    fault = cfg.get("fault") or {}                 # configs saved before the fault: block have none
    return VitlabModule(recipe, optimizer_factory, scheduler_factory,
                        config=OmegaConf.to_container(cfg, resolve=True), data_info=data.to_dict(),
                        loss_check_interval=cfg.get("loss_check_interval"), ema=_ema_options(cfg),
                        nonfinite=fault.get("nonfinite", "stop"),
                        max_skipped_steps=fault.get("max_skipped_steps", 20))


def _ema_options(cfg: DictConfig) -> Optional[dict]:
    """The ``ema:`` block; ``enabled: auto`` / ``warmup: auto`` follow the task's ``ema_default`` (on, with timm's
    warm-up, for task=diffusion, which samples with EMA weights as DiT does; off for the others)."""
    ema = cfg.get("ema")
    if not ema:
        return None
    ema = OmegaConf.to_container(ema, resolve=True)
    task_default = bool(get_class(cfg.task._target_).ema_default)
    if ema.get("enabled") == "auto":
        ema["enabled"] = task_default
    if ema.get("warmup") == "auto":
        ema["warmup"] = task_default
    if not ema.get("enabled"):
        return None
    if "fsdp" in str(cfg.trainer.get("strategy", "")).lower():
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
                  monitor: Optional[tuple[Optional[str], str]] = None, find_unused_parameters: bool = False,
                  **overrides: Any) -> pl.Trainer:
    """``monitor``: (metric, mode) of the built recipe, for a callback whose config says ``monitor: auto`` (the
    checkpoint callback reads ``${recipe.monitor}``, which is ``auto`` when the task decides: val/top1, val/map,
    val/miou); without it, the task class's declared monitor.

    ``find_unused_parameters`` (the task's declaration): ``trainer.strategy=ddp`` runs with it. A dense head reads
    only some of the backbone's outputs (UPerNet the pre-norm taps, not the final norm; a ViTDet backbone's
    ``fc_norm`` feeds only the pooled vector), and torchvision's detectors may skip heads on some steps, so some
    parameters get no gradient, which plain DDP cannot reduce."""
    loggers = _loggers(cfg, wandb_run_id)
    callbacks = [DDPAgreement()]
    for name, ccfg in (cfg.get("callbacks") or {}).items():
        if ccfg is not None:
            extra = {}
            if ccfg.get("monitor") == "auto":
                if monitor is None:                     # no recipe at hand: the task's declared metric
                    task_cls = get_class(cfg.task._target_)
                    monitor = (task_cls.monitor, task_cls.monitor_mode)
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
    # fault tolerance (vitlab/lit/fault/): a preemption signal -> last.ckpt at the next step, then a requeue.
    # After the configured callbacks: the run's history already holds the step when that checkpoint is written.
    from vitlab.lit.fault import fault_callbacks

    callbacks.extend(fault_callbacks(cfg))          # + the epoch's training sums in every checkpoint
    kwargs = dict(precision=derived.precision, callbacks=callbacks, logger=loggers or False,
                  plugins=[AtomicCheckpointIO()], use_distributed_sampler=False, default_root_dir=cfg.paths.output_dir)
    if find_unused_parameters and cfg.trainer.get("strategy") == "ddp":
        from pytorch_lightning.strategies import DDPStrategy

        kwargs["strategy"] = DDPStrategy(find_unused_parameters=True)
        log.info("ddp: find_unused_parameters=True (the task reads only some of the backbone's outputs)")
    kwargs.update(overrides)
    return instantiate(cfg.trainer, _convert_="all", **kwargs)


@dataclass
class Run:
    cfg: DictConfig
    source: DataSource
    module: VitlabModule
    datamodule: VitlabDataModule
    trainer: pl.Trainer
    derived: Derived


def preflight(cfg: DictConfig) -> None:
    """Files the config names but the run reads only later (a distillation teacher, a judging classifier,
    Inception's weights, a checkpoint to resume): checked before any work, by the recipe and the task themselves."""
    get_class(cfg.recipe._target_).preflight(task_options(OmegaConf.to_container(cfg.recipe, resolve=True)))
    get_class(cfg.task._target_).preflight(task_options(OmegaConf.to_container(cfg.task, resolve=True)))
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path} does not exist; point it at a run's "
                                "checkpoints/last.ckpt to resume")


def build_run(cfg: DictConfig) -> Run:
    """Everything a training run needs, validated before any work is done: the task against the data's kind
    (before the data's files are read), then the data, the files the config names, the model."""
    set_attention_backend(cfg.attention_backend, source=f"attention_backend={cfg.attention_backend}")
    source = build_source(cfg, check=False)
    check_task_fits_data(get_class(cfg.task._target_), source.task, source.name)
    source.check()                                  # a missing dataset stops here, before any model is built
    preflight(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data = data_info(cfg, source)
    recipe = build_recipe(cfg, data)
    derived = derive(cfg, recipe)
    module = build_module(cfg, recipe, derived, data)        # before compile: the EMA copies the eager recipe
    for what in apply_model_options(recipe, cfg.get("model")):
        log.info("model: %s", what)
    wandb_id = None
    if cfg.get("ckpt_path"):
        wandb_id = read_meta(cfg.ckpt_path).get("wandb_run_id")
    trainer = build_trainer(cfg, derived, wandb_id, monitor=(recipe.monitor, recipe.monitor_mode),
                            find_unused_parameters=recipe.task.find_unused_parameters)
    for lg in trainer.loggers:
        if lg.__class__.__name__ == "WandbLogger" and trainer.is_global_zero:
            module.wandb_run_id = lg.version
    datamodule = build_datamodule(cfg, source, recipe)
    datamodule.validate(trainer.world_size)          # e.g. too few shards for ranks x workers: stop now
    return Run(cfg, source, module, datamodule, trainer, derived)


# ------------------------------------------------------------ checkpoints ---

def load_checkpoint(path: str, map_location: str = "cpu") -> VitlabModule:
    """Rebuild the model from a checkpoint alone (its resolved config, upgraded where targets moved) and load its
    weights. :class:`vitlab.checkpoints.NotACheckpointError` when the file is not a vitlab checkpoint."""
    ckpt = read_checkpoint(path, map_location=map_location)
    meta = ckpt["vitlab"]
    config = upgrade_config(meta["config"])
    cfg = OmegaConf.merge(OmegaConf.create(config), {"weights": None})
    data = DataInfo.from_dict(meta["data_info"], img_size=cfg.data.img_size)
    module = VitlabModule(build_recipe(cfg, data), config=config, data_info=data.to_dict(), ema=_ema_options(cfg))
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    return module


def load_model(path: str) -> LoadedModel:
    """A vitlab checkpoint's evaluated model (its EMA weights when the run kept them), frozen, and its data: what
    :class:`vitlab.tasks.base.BuildContext` hands a task or a recipe (a judging classifier, a teacher)."""
    module = load_checkpoint(path)
    recipe = module.eval_recipe().requires_grad_(False)
    return LoadedModel(recipe=recipe, data=DataInfo.from_dict(module.data_info), path=str(path))
