"""Composition: a resolved Hydra config -> source, model, LightningModule, DataModule, Trainer.

Values shared between groups are wired here, once: the backbone learns its
image size and channels from the data, the task its input width from the
backbone and its classes from the data. Derived numbers (global batch, the
learning rate after the recipe's scaling rule, the precision) are computed
here and printed at start.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.callbacks.progress import ProgressBar
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vitlab.data import ClassificationSource
from vitlab.layers.attention import set_backend as set_attention_backend
from vitlab.lit.callbacks import AtomicCheckpointIO, DDPAgreement
from vitlab.lit.datamodule import VitlabDataModule
from vitlab.lit.module import VitlabModule
from vitlab.recipes import Recipe

log = logging.getLogger("vitlab")


# ----------------------------------------------------------------- model ---

def build_source(cfg: DictConfig, check: bool = True) -> ClassificationSource:
    source = instantiate(cfg.data.source, _convert_="all")
    if check:
        source.check()                      # a missing dataset stops here, before any model is built
    return source


def build_recipe(cfg: DictConfig, num_classes: int, in_chans: int) -> Recipe:
    backbone = instantiate(cfg.backbone, img_size=cfg.data.img_size, in_chans=in_chans, _convert_="all")
    task = instantiate(cfg.task, in_dim=backbone.embed_dim, num_classes=num_classes, _convert_="all")
    recipe = instantiate(cfg.recipe, backbone=backbone, task=task, _convert_="all")
    if cfg.get("weights"):
        from vitlab.backbones.convert import load_timm_weights

        load_timm_weights(backbone, cfg.weights, head=getattr(task, "head", None))
    return recipe


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

def build_datamodule(cfg: DictConfig, source: ClassificationSource) -> VitlabDataModule:
    d = cfg.data
    mixup = OmegaConf.to_container(d.mixup, resolve=True) if d.get("mixup") else None
    return VitlabDataModule(source, img_size=d.img_size, batch_size=d.batch_size, num_workers=d.num_workers,
                            augment=OmegaConf.to_container(d.augment, resolve=True), seed=cfg.seed,
                            eval_batch_size=d.get("eval_batch_size"), mixup=mixup,
                            repeated_aug=d.get("repeated_aug", 0), batched_augment=d.get("batched_augment", False),
                            max_corrupt_fraction=d.get("max_corrupt_fraction", 0.01))


def build_module(cfg: DictConfig, recipe: Recipe, derived: Derived, source: ClassificationSource) -> VitlabModule:
    optimizer_factory = instantiate(cfg.optim, lr=derived.lr, _convert_="all")
    scheduler_factory = instantiate(cfg.sched, _convert_="all") if cfg.get("sched") else None
    return VitlabModule(recipe, optimizer_factory, scheduler_factory,
                        config=OmegaConf.to_container(cfg, resolve=True),
                        data_info={"num_classes": source.num_classes, "in_chans": source.in_chans},
                        loss_check_interval=cfg.get("loss_check_interval"))


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
                  **overrides: Any) -> pl.Trainer:
    loggers = _loggers(cfg, wandb_run_id)
    callbacks = [DDPAgreement()]
    for name, ccfg in (cfg.get("callbacks") or {}).items():
        if ccfg is not None:
            cb = instantiate(ccfg, _convert_="all")
            if isinstance(cb, ProgressBar) and not cfg.trainer.get("enable_progress_bar", True):
                continue                   # trainer.enable_progress_bar=false turns the bar off
            if isinstance(cb, LearningRateMonitor) and not loggers:
                continue                   # logger=[]: nothing to log the lr to
            callbacks.append(cb)
    if cfg.get("checkpoint_every_n_steps"):
        # mid-epoch last.ckpt: the train loader's position is in it, so a resume continues the epoch
        from pytorch_lightning.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=str(Path(cfg.paths.output_dir) / "checkpoints"), save_top_k=0,
                                         save_last=True, every_n_train_steps=int(cfg.checkpoint_every_n_steps),
                                         enable_version_counter=False))
    kwargs = dict(precision=derived.precision, callbacks=callbacks, logger=loggers or False,
                  plugins=[AtomicCheckpointIO()], use_distributed_sampler=False, default_root_dir=cfg.paths.output_dir)
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
    recipe = build_recipe(cfg, source.num_classes, source.in_chans)
    for what in apply_model_options(recipe, cfg.get("model")):
        log.info("model: %s", what)
    derived = derive(cfg, recipe)
    module = build_module(cfg, recipe, derived, source)
    wandb_id = None
    if cfg.get("ckpt_path"):
        if not Path(cfg.ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path} does not exist; point it at a run's "
                                    "checkpoints/last.ckpt to resume")
        wandb_id = _checkpoint_meta(cfg.ckpt_path).get("wandb_run_id")
    trainer = build_trainer(cfg, derived, wandb_id)
    for lg in trainer.loggers:
        if lg.__class__.__name__ == "WandbLogger" and trainer.is_global_zero:
            module.wandb_run_id = lg.version
    datamodule = build_datamodule(cfg, source)
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
    module = VitlabModule(build_recipe(cfg, info["num_classes"], info["in_chans"]), config=meta["config"],
                          data_info=info)
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    return module
