"""The Task contract: one interface for every task, classification included. The composition root
(``vitlab/lit/build.py``), the Lightning module and the recipes read these members and call these methods; they
never branch on a task's name or probe its signature. A new task subclasses :class:`Task` (CONTRIBUTING.md lists
the files to touch and the tests to write).

A task owns its head(s), loss and metrics. It is handed the *backbone* (a :class:`vitlab.backbones.base.Backbone`:
``images -> feature dict``, or a denoiser for diffusion) and the batch, and computes everything past it::

    training_step(backbone, batch)   -> {"loss": scalar, <scalars>: logged under train/, "preds", "target": for
                                         train_metrics() when the task keeps training metrics}
    evaluation_step(backbone, batch) -> {<scalars>: logged under val/ (or test/), "preds", "target": passed to
                                         metrics().update(preds, target)}
    compute_metrics(metrics)         -> {"top1": scalar, ...}: logged as val/<name>, test/<name> at the epoch's end
    predict(backbone, images)        -> the task's predictions (logits, detections per image, masks, samples)
    visualize(backbone, batch)       -> {name: [rows of pictures (n, C, H, W)]}, saved as PNG grids in visuals/

Declared attributes
-------------------
``kind``                    the task's name (``task=<kind>``), written in checkpoints and messages.
``data_kind``               the data family it trains on: the source's ``task`` must equal it (a detection task
                            needs detection data; diffusion trains on classification data).
``backbone_kind``           the :class:`~vitlab.backbones.base.Backbone` kind it reads (``encoder`` or ``denoiser``).
``backbone_hint``           what to pick when the backbone is of the other kind (the end of the builder's message).
``data_hint``               data of this task's ``data_kind`` to name when the data does not fit.
``monitor`` / ``monitor_mode``  the validation metric that picks best.ckpt when ``recipe.monitor=auto`` (an
                            instance may change it, e.g. diffusion with a judging classifier).
``lr_base_batch``           the batch ``optim.lr`` is quoted for under ``recipe.lr_base_batch=auto`` (256 images for
                            classification, DeiT's rule; 16 for detection / segmentation, mmdet / mmseg's).
``find_unused_parameters``  DDP must look for parameters that get no gradient in a step (a head that reads only
                            some backbone outputs, detectors that skip heads on some steps).
``ema_default``             ``ema.enabled=auto`` turns a weight EMA on (diffusion samples with EMA weights).
``pretrainable``            self-supervised recipes and distillation may train with it (they freeze the task and
                            read images and labels only; dense targets do not fit them).
``curve_metrics``           the epoch metrics (without ``val/``) drawn in the run's curves.png, headline first.
``progress_metrics``        the validation metrics shown on the progress bar (empty: the task's monitor only).
``draws_samples``           a generative task: :meth:`sample_rows` draws pictures of samples during training
                            (the ``diffusion_samples`` callback) and for ``vitlab-sample``.

Build
-----
``backbone_options(options, data)``  classmethod: the keyword arguments the backbone factory gets from this task:
                            its geometry (``img_size``, ``in_chans`` by default; a denoiser's latent geometry,
                            classes and output channels) and what the head reads (``out_indices`` for taps).
``from_data(options, data, backbone, context)``  classmethod: the task, from its config ``options`` (the
                            ``task:`` block without ``_target_``), the :class:`~vitlab.data.base.DataInfo` (classes,
                            channels, normalisation, image size, names, palette) and the built backbone (width,
                            patch, pyramid); ``context`` loads other vitlab checkpoints (a judging classifier).
``preflight(options)``     classmethod: files the options name but the task reads later, checked before any work.
``train_transform(img_size, mean, std, augment)``  a training transform that replaces ``data.augment`` (diffusion's),
                            or None.
``metrics()`` / ``train_metrics()``  fresh metric objects for an evaluation split / the training split (None: the
                            task keeps no training metric).
``on_evaluation_start()``   called before each validation / test epoch (reset per-epoch state).
``pretrained_heads()``      heads that take a pretrained classifier from external weights (``weights=timm...``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Optional, Sequence

import torch
from torch import nn

from vitlab.checkpoints import NotACheckpointError  # noqa: F401 (what BuildContext.load_model raises)
from vitlab.data.base import DataInfo

Backbone = Callable[..., Any]        # images -> feature dict (an encoder), or (x, t, y) -> prediction (a denoiser)


@dataclass
class LoadedModel:
    """A vitlab checkpoint's evaluated model, as :attr:`BuildContext.load_model` returns it: ``recipe`` (images ->
    predictions, with ``.backbone``, ``.task``, ``.features(images)``, ``.pretraining``; its EMA weights when the
    run kept them, frozen, in eval mode) and ``data``, the :class:`DataInfo` it was trained on."""

    recipe: nn.Module
    data: DataInfo
    path: str


@dataclass
class BuildContext:
    """What a task (or a recipe) may need from the composition root beyond the data and the backbone.

    ``load_model(path)``: a vitlab checkpoint -> :class:`LoadedModel` (the model it evaluates and its data). The
    composition root (``vitlab/lit/build.py``) supplies it: loading a checkpoint rebuilds a whole run's model,
    which only it can do. Tasks call it lazily (building or loading a checkpoint never needs the file)."""

    load_model: Optional[Callable[[str], LoadedModel]] = None

    def require_loader(self, what: str) -> Callable[[str], LoadedModel]:
        if self.load_model is None:
            raise ValueError(f"{what} needs a vitlab checkpoint loaded; build the task through vitlab.lit.build "
                             "(which supplies the loader)")
        return self.load_model


class Task(nn.Module):
    """Base class of every task (see the module docstring for the contract)."""

    kind: ClassVar[str] = "?"
    data_kind: ClassVar[str] = "?"
    backbone_kind: ClassVar[Literal["encoder", "denoiser"]] = "encoder"
    backbone_hint: ClassVar[str] = "use an image encoder (backbone=vit_tiny, vit_small, ..., or timm_pyramid)"
    data_hint: ClassVar[str] = "?"
    monitor: str = "val/loss"
    monitor_mode: Literal["max", "min"] = "min"
    lr_base_batch: ClassVar[int] = 256
    find_unused_parameters: ClassVar[bool] = False
    ema_default: ClassVar[bool] = False
    pretrainable: ClassVar[bool] = False
    draws_samples: ClassVar[bool] = False
    curve_metrics: ClassVar[tuple[str, ...]] = ()
    progress_metrics: ClassVar[tuple[str, ...]] = ()

    def __init__(self, mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                 class_names: Optional[Sequence[str]] = None):
        super().__init__()
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.class_names = list(class_names) if class_names is not None else None

    # ------------------------------------------------------------- build ---
    @classmethod
    def backbone_options(cls, options: dict, data: DataInfo) -> dict:
        """The backbone factory's arguments from this task and the data (default: the data's geometry)."""
        return {"img_size": data.img_size, "in_chans": data.in_chans}

    @classmethod
    def from_data(cls, options: dict, data: DataInfo, backbone: Any, context: Optional[BuildContext] = None
                  ) -> "Task":
        raise NotImplementedError

    @classmethod
    def preflight(cls, options: dict) -> None:
        """Check, before any work, the files this task's options name but reads only later (e.g. a judging
        classifier read at the first validation); raise ``FileNotFoundError`` / ``ValueError`` naming the fix."""

    def train_transform(self, img_size: int, mean: Sequence[float], std: Sequence[float],
                        augment: Optional[dict] = None) -> Optional[Callable]:
        return None

    # ------------------------------------------------------------- steps ---
    def training_step(self, backbone: Backbone, batch: dict) -> dict[str, Any]:
        raise NotImplementedError

    def evaluation_step(self, backbone: Backbone, batch: dict) -> dict[str, Any]:
        raise NotImplementedError

    def predict(self, backbone: Backbone, images: torch.Tensor) -> Any:
        raise NotImplementedError

    def visualize(self, backbone: Backbone, batch: dict) -> dict[str, list[torch.Tensor]]:
        return {}

    def sample_rows(self, backbone: Backbone, per_class: int = 8, max_classes: int = 10, seed: int = 0,
                    device: Optional[torch.device] = None, **options: Any) -> list[torch.Tensor]:
        """A generative task (``draws_samples``): ``per_class`` samples for each of the first ``max_classes``
        classes, a row of images in [0, 1] (n, C, H, W) per class, from fixed seeds (seed, seed + 1, ...)."""
        raise NotImplementedError(f"task={self.kind} draws no samples")

    # ----------------------------------------------------------- metrics ---
    def metrics(self, validate_args: bool = True) -> Any:
        """Fresh metric object(s) for one evaluation split: ``update(preds, target)`` per batch."""
        raise NotImplementedError

    def train_metrics(self) -> Any:
        """Fresh metrics for the training split, updated per step from training_step's preds / target (None: no
        training metric). Logged as train/<name> once per epoch."""
        return None

    def compute_metrics(self, metrics: Any) -> dict[str, Any]:
        """The epoch's values of ``metrics`` (a dict of 0-d tensors or numbers, keyed without the split)."""
        return dict(metrics.compute())

    def on_evaluation_start(self) -> None:
        """Before each validation / test epoch."""

    # ----------------------------------------------------------- weights ---
    def pretrained_heads(self) -> dict[str, nn.Module]:
        """Heads that may take a pretrained classifier from external weights (timm's ``head.*`` -> ``head``)."""
        return {}

    # ------------------------------------------------------------- utils ---
    def to_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, C, H, W) -> uint8 RGB pictures (B, 3, H, W) for drawing on."""
        x = images.detach().float().cpu()
        x = x * torch.tensor(self.std).view(1, -1, 1, 1) + torch.tensor(self.mean).view(1, -1, 1, 1)
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]


def task_options(options: dict) -> dict:
    """A ``task:`` config block (a plain dict) without Hydra's keys (``_target_``, ...)."""
    return {k: v for k, v in options.items() if not str(k).startswith("_")}
