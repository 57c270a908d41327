"""The diffusion task: a class-conditional denoiser (DiT) trained and sampled on labelled images.

Peebles & Xie, "Scalable Diffusion Models with Transformers" (DiT, ICCV 2023), with the options of its successors:

- objectives (:mod:`vitlab.tasks.diffusion.objectives`): DDPM epsilon-prediction (Ho et al. 2020) with linear or
  cosine schedules and improved DDPM's learned variance (Nichol & Dhariwal 2021), as DiT trains; or rectified flow
  (Liu et al. 2023) with SD3's logit-normal timesteps (Esser et al. 2024, "Scaling Rectified Flow Transformers");
- classifier-free guidance (Ho & Salimans 2022): labels are dropped to the null label during training with
  ``label_dropout``; samplers (:mod:`vitlab.tasks.diffusion.samplers`: DDIM, DDPM, Euler) mix the conditional and
  unconditional predictions with ``guidance``;
- pixel space for small images, or the latent space of a frozen autoencoder the user supplies (Rombach et al. 2022;
  :mod:`vitlab.tasks.diffusion.autoencoder`);
- evaluation (:mod:`vitlab.metrics.generative`): the validation loss at fixed noise, and for generated samples the
  accuracy per class under a vitlab classifier trained on the real data, FID / KID when configured.

The task implements the Task contract (:mod:`vitlab.tasks.base`): it is handed the denoiser (the backbone,
``model(x, t, y) -> prediction``) and the batch. The data reaches it normalised with the dataset's mean and std;
the task maps it to [-1, 1] (``to_model_space``), where the objectives work, and samples back to [0, 1].
Sampling for pictures and metrics uses the weights the Lightning module evaluates: the EMA copy, which
``ema.enabled: auto`` turns on for this task (DiT samples with EMA weights).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Callable, Literal, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from vitlab.data.base import DataInfo
from vitlab.tasks.base import Backbone, BuildContext, Task
from vitlab.tasks.diffusion.objectives import GaussianDiffusion, RectifiedFlow, Schedule
from vitlab.tasks.diffusion.samplers import Sampler, sample

log = logging.getLogger(__name__)

Objective = Literal["ddpm", "flow"]
SAMPLERS = ("ddim", "ddpm", "euler")


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _Frozen:
    """Holds a frozen helper model (the judging classifier) outside the module tree: never in a state dict or a
    checkpoint, never trained, shared (not copied) by the EMA copy of the task."""

    def __init__(self, factory: Callable[[], Any]):
        self.factory, self.value = factory, None

    def get(self) -> Any:
        if self.value is None:
            self.value = self.factory()
        return self.value

    def __deepcopy__(self, memo: dict) -> "_Frozen":
        return self


class DiffusionTask(Task):
    kind = "diffusion"
    data_kind = "classification"     # trains on labelled images (class-conditional)
    data_hint = "labelled images: data=mnist, cifar10, imagefolder, ..."
    backbone_kind = "denoiser"       # DiT: (x, t, y) -> prediction
    backbone_hint = "use backbone=dit or dit_tiny (or drop backbone=..., task=diffusion picks dit_tiny)"
    monitor = "val/loss"             # with a judging classifier: val/sample_acc (see __init__)
    monitor_mode = "min"
    curve_metrics = ("sample_acc",)
    lr_base_batch = 256              # DiT: lr 1e-4 at batch 256
    ema_default = True               # ema.enabled=auto: sampling uses EMA weights, as DiT
    draws_samples = True             # sample grids during training (callbacks.diffusion_samples) and vitlab-sample

    def __init__(self, num_classes: int, in_dim: int = 0, img_size: int | Sequence[int] = 32,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                 class_names: Optional[Sequence[str]] = None, objective: Objective = "ddpm",
                 schedule: Schedule = "linear", num_timesteps: int = 1000, learn_sigma: bool | str = "auto",
                 t_sampling: Literal["logit_normal", "uniform"] = "logit_normal", logit_mean: float = 0.0,
                 logit_std: float = 1.0, time_shift: float = 1.0, label_dropout: float = 0.1,
                 sampler: Sampler | Literal["auto"] = "auto", sample_steps: int = 50, guidance: float = 4.0,
                 ddim_eta: float = 0.0, clip_x0: bool = True, autoencoder: Optional[dict] = None,
                 classifier: Optional[str] = None, eval_samples: int = 100, fid: Optional[dict] = None,
                 eval_seed: int = 0, classifier_factory: Optional[Callable[[], Any]] = None):
        super().__init__(mean, std, class_names)
        if objective not in ("ddpm", "flow"):
            raise ValueError(f"task.objective must be ddpm (epsilon-prediction, DiT) or flow (rectified flow, SD3), "
                             f"got {objective!r}")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"task.label_dropout is a probability in [0, 1), got {label_dropout}; 0 trains without "
                             "the null label (then sample with task.guidance=1)")
        self.num_classes = int(num_classes)
        self.in_chans = len(self.mean)
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.objective_name = objective
        self.learn_sigma = self.resolve_learn_sigma(objective, learn_sigma)
        if objective == "ddpm":
            self.objective: nn.Module = GaussianDiffusion(schedule, num_timesteps, learn_sigma=self.learn_sigma)
        else:
            self.objective = RectifiedFlow(t_sampling, logit_mean, logit_std, time_shift)
        self.sampler = self.resolve_sampler(objective, sampler)
        self.sample_steps, self.guidance, self.ddim_eta, self.clip_x0 = int(sample_steps), float(guidance), \
            float(ddim_eta), bool(clip_x0)
        self.label_dropout = float(label_dropout)
        if self.guidance != 1.0 and self.label_dropout == 0.0:
            log.warning("task.guidance=%s but task.label_dropout=0: the null label is never trained, so guided "
                        "samples mix in an untrained prediction; set task.guidance=1 or train with label dropout",
                        self.guidance)
        self.null_label = self.num_classes if self.num_classes > 0 else None
        # mean/std as buffers: the mapping to [-1, 1] runs on the batch's device without a copy per step
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, -1, 1, 1), persistent=False)
        self.autoencoder_cfg = dict(autoencoder) if autoencoder else None
        self._autoencoder: Optional[_Frozen] = None
        if self.autoencoder_cfg:
            from vitlab.tasks.diffusion.autoencoder import load_autoencoder

            cfg = self.autoencoder_cfg
            self._autoencoder = _Frozen(lambda: load_autoencoder(**cfg))
        self.classifier_path = classifier
        self._classifier = _Frozen(classifier_factory) if classifier_factory is not None else None
        if classifier and classifier_factory is None:
            raise ValueError("task.classifier is set but no classifier factory was given (build the task through "
                             "vitlab.lit.build, which loads the checkpoint)")
        if self._classifier is not None:          # the samples' accuracy picks best.ckpt
            self.monitor, self.monitor_mode = "val/sample_acc", "max"
        self.eval_samples, self.eval_seed = int(eval_samples), int(eval_seed)
        self.fid = dict(fid) if fid else None
        if self.fid and self.fid.get("features") == "classifier" and self._classifier is None:
            raise ValueError("task.fid.features=classifier computes FID / KID in a vitlab classifier's feature space: "
                             "set task.classifier=PATH (a classifier checkpoint trained on the same data), or use "
                             "task.fid.features=inception")
        self._eval_batches = 0                    # validation batches seen this epoch: seeds the fixed eval noise
        self._eval_generated = 0                  # samples generated for the metrics this epoch (this rank)

    # ------------------------------------------------------------ options ---
    @staticmethod
    def resolve_learn_sigma(objective: Objective, learn_sigma: bool | str) -> bool:
        if learn_sigma == "auto":
            return objective == "ddpm"            # DiT learns the variance; a flow has none to learn
        if learn_sigma and objective == "flow":
            raise ValueError("task.learn_sigma=true is for objective=ddpm (improved DDPM's learned variance); a "
                             "rectified flow predicts a velocity only: set task.learn_sigma=false or auto")
        return bool(learn_sigma)

    @staticmethod
    def resolve_sampler(objective: Objective, sampler: str) -> str:
        if sampler == "auto":
            return "ddim" if objective == "ddpm" else "euler"
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown task.sampler={sampler!r}; choose auto, {', '.join(SAMPLERS)}")
        if (sampler == "euler") != (objective == "flow"):
            fix = "sampler=euler" if objective == "flow" else "sampler=ddim or ddpm"
            raise ValueError(f"task.sampler={sampler} does not fit task.objective={objective}: use task.{fix} "
                             "(or sampler=auto)")
        return sampler

    @classmethod
    def backbone_options(cls, options: dict, data: DataInfo) -> dict:
        """The denoiser's geometry for the builder: the data's (pixel space) or the autoencoder's latent, the classes
        it is conditioned on, and its output channels (doubled for a learned variance)."""
        return cls.denoiser_options(data.img_size, data.in_chans, data.num_classes, **options)

    @classmethod
    def from_data(cls, options: dict, data: DataInfo, backbone: Any, context: Optional[BuildContext] = None
                  ) -> "DiffusionTask":
        """Classes, image size, normalisation and names from the data; with ``classifier=PATH`` the judge of the
        samples is loaded through ``context`` on the first sample evaluation (building the task, or loading a
        checkpoint, never needs its file)."""
        factory = None
        if options.get("classifier"):
            from vitlab.tasks.diffusion.judge import load_judge

            loader = (context or BuildContext()).require_loader("task.classifier")
            factory = functools.partial(load_judge, str(options["classifier"]), int(data.num_classes), loader)
        return cls(num_classes=int(data.num_classes), in_dim=int(backbone.embed_dim), img_size=int(data.img_size),
                   mean=data.mean, std=data.std, class_names=data.class_names, classifier_factory=factory,
                   **options)

    @classmethod
    def preflight(cls, options: dict) -> None:
        """The judge is read at the first validation and Inception's weights at the first FID: check them now."""
        from vitlab.checkpoints import is_vitlab_checkpoint

        judge = options.get("classifier")
        if judge and not is_vitlab_checkpoint(str(judge)):
            raise FileNotFoundError(f"task.classifier={judge} is not a vitlab checkpoint (missing or another format); "
                                    "train a classifier on the same data first (e.g. vitlab-train "
                                    "experiment=vit_mnist) and give its checkpoints/best.ckpt, or set "
                                    "task.classifier=null")
        if options.get("fid"):
            from vitlab.metrics.generative import check_fid_setup

            check_fid_setup(dict(options["fid"]))

    @classmethod
    def denoiser_options(cls, img_size: int, in_chans: int, num_classes: int, **task_cfg: Any) -> dict:
        """The denoiser's geometry: see :meth:`backbone_options`."""
        size, chans = int(img_size), int(in_chans)
        ae = task_cfg.get("autoencoder")
        if ae:
            from vitlab.tasks.diffusion.autoencoder import autoencoder_geometry

            chans, down = autoencoder_geometry(**ae)
            if size % down:
                raise ValueError(f"data.img_size={size} is not a multiple of the autoencoder's downsampling {down}")
            size //= down
        learn_sigma = cls.resolve_learn_sigma(task_cfg.get("objective", "ddpm"), task_cfg.get("learn_sigma", "auto"))
        return {"img_size": size, "in_chans": chans, "num_classes": int(num_classes), "learn_sigma": learn_sigma}

    def train_transform(self, img_size: int, mean: Sequence[float], std: Sequence[float],
                        augment: Optional[dict] = None) -> Callable:
        """DiT's training transform: resize the short side, centre crop, a horizontal flip with the data's own
        probability (``data.augment.hflip``: 0.5 for CIFAR, 0 for digits), normalise. No shifted crops, colour
        changes or erasing: a generative model would learn them as part of the data."""
        from vitlab.data.transforms import build_transforms

        augment = augment or {}
        return build_transforms(True, img_size, mean, std, policy="crop_flip", crop_padding=0,
                                hflip=float(augment.get("hflip", 0.0)),
                                interpolation=augment.get("interpolation", "bilinear"))

    # --------------------------------------------------------------- spaces ---
    def autoencoder(self, device: torch.device) -> Any:
        ae = self._autoencoder.get()
        return ae.to(device)

    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, C, H, W) -> [-1, 1] pixels, or the autoencoder's scaled latents."""
        x = (images * self._std + self._mean) * 2.0 - 1.0                     # (B, C, H, W) in [-1, 1]
        if self._autoencoder is not None:
            with torch.no_grad():
                x = self.autoencoder(x.device).encode(x)                     # (B, c, H/f, W/f)
        return x

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space samples -> images in [0, 1] (B, C, H, W)."""
        if self._autoencoder is not None:
            x = self.autoencoder(x.device).decode(x)
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def model_shape(self, backbone: Any) -> tuple[int, int, int]:
        """(C, H, W) of what the denoiser sees (pixels or latents)."""
        h, w = backbone.img_size
        return int(backbone.in_chans), int(h), int(w)

    # ---------------------------------------------------------------- steps ---
    def _labels(self, batch: dict) -> Optional[torch.Tensor]:
        if self.num_classes == 0:
            return None
        y = batch["label"]
        if y.ndim != 1:
            raise ValueError("the diffusion task needs hard class labels; mixup / cutmix make soft ones: set "
                             "data.mixup.mixup_alpha=0 and data.mixup.cutmix_alpha=0")
        return y

    def _loss(self, backbone: Backbone, x: torch.Tensor, y: Optional[torch.Tensor],
              generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        B = x.shape[0]
        if generator is None:
            t = self.objective.sample_timesteps(B, x.device)
            noise = torch.randn_like(x)
        else:                                     # fixed noise for evaluation: drawn on the CPU, then moved
            t = self.objective.sample_timesteps(B, torch.device("cpu"), generator=generator).to(x.device)
            noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        terms = self.objective.training_losses(backbone, x, t, noise, y)
        return {k: v.mean() for k, v in terms.items()}

    def training_step(self, backbone: Backbone, batch: dict) -> dict[str, torch.Tensor]:
        x = self.to_model_space(batch["image"])
        y = self._labels(batch)
        if y is not None and self.label_dropout > 0:
            drop = torch.rand(y.shape, device=y.device) < self.label_dropout           # (B,) bool, no host sync
            y = torch.where(drop, torch.full_like(y, self.null_label), y)
        return self._loss(backbone, x, y)

    def evaluation_step(self, backbone: Backbone, batch: dict) -> dict[str, Any]:
        """The loss at noise and timesteps fixed per batch position (comparable across epochs), and, until
        ``eval_samples`` are reached, generated samples for the metrics: balanced labels, fixed noise per sample
        index (the same images every epoch, distinct across ranks)."""
        x = self.to_model_space(batch["image"])
        y = self._labels(batch)
        gen = torch.Generator().manual_seed(self.eval_seed * 1_000_003 + self._eval_batches)
        self._eval_batches += 1
        out: dict[str, Any] = self._loss(backbone, x, y, generator=gen)
        rank, world = _rank_world()
        budget = math.ceil(self.eval_samples / world)
        k = min(batch["image"].shape[0], budget - self._eval_generated)
        if k > 0 and self.num_classes > 0 and (self._classifier is not None or self.fid):   # else nobody reads them
            index = rank + world * (self._eval_generated + torch.arange(k))          # global sample numbers
            labels = index % self.num_classes
            samples = self.generate(backbone, labels.to(x.device), seeds=index.tolist())
            real = (batch["image"][:k] * self._std + self._mean).clamp(0, 1)
            self._eval_generated += k
            out["preds"] = {"samples": samples, "real": real}
            out["target"] = labels.to(x.device)
        return out

    def metrics(self, validate_args: bool = True):
        from vitlab.metrics.generative import GenerativeMetrics

        classify = features = None
        if self._classifier is not None:
            def classify(images: torch.Tensor) -> torch.Tensor:
                return self._classifier.get()(images)

            def features(images: torch.Tensor) -> torch.Tensor:
                return self._classifier.get().features(images)
        return GenerativeMetrics(self.num_classes, self.class_names, classifier=classify, fid=self.fid,
                                 classifier_features=features)

    def on_evaluation_start(self) -> None:
        """A new validation / test epoch: the fixed evaluation noise and the sample budget start over."""
        self._eval_batches = self._eval_generated = 0

    def compute_metrics(self, metric) -> dict[str, torch.Tensor]:
        self._eval_batches = self._eval_generated = 0
        if self.num_classes == 0 or (self._classifier is None and not self.fid):
            metric.reset()
            return {}
        return metric.compute()

    # ------------------------------------------------------------- sampling ---
    @torch.no_grad()
    def generate(self, backbone: Backbone, labels: torch.Tensor, seeds: Optional[Sequence[int]] = None,
                 generator: Optional[torch.Generator] = None, sampler: Optional[str] = None,
                 steps: Optional[int] = None, guidance: Optional[float] = None, progress: bool = False
                 ) -> torch.Tensor:
        """Samples for ``labels`` (n,) -> images in [0, 1] (n, C, H, W).

        The starting noise of sample i comes from ``seeds[i]`` (one CPU generator per sample, so a sample does not
        depend on what else is in the batch or on the device), else from ``generator``; stochastic samplers draw
        their later noise from a generator seeded by ``seeds[0]`` (or ``generator``)."""
        device = labels.device
        shape = self.model_shape(backbone)
        if seeds is not None:
            noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)))
                                 for s in seeds])
            step_gen = torch.Generator(device=device).manual_seed(int(seeds[0]) + 7919) if len(seeds) else None
        else:
            noise = torch.randn((labels.shape[0], *shape), generator=generator)
            step_gen = generator if generator is None or generator.device == device else \
                torch.Generator(device=device).manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
        sampler = sampler or self.sampler
        self.resolve_sampler(self.objective_name, sampler)
        options: dict[str, Any] = dict(steps=int(steps or self.sample_steps),
                                       guidance=float(self.guidance if guidance is None else guidance),
                                       null_label=self.null_label, generator=step_gen, progress=progress)
        if sampler == "ddim":
            options["eta"] = self.ddim_eta
        if self.objective_name == "ddpm":
            options["clip_x0"] = self.clip_x0 and self._autoencoder is None   # latents are not bounded to [-1, 1]
        y = labels if self.num_classes > 0 else None
        x = sample(backbone, self.objective, noise.to(device), y, sampler, **options)
        return self.to_pixels(x)

    def sample_rows(self, backbone: Backbone, per_class: int = 8, max_classes: int = 10, seed: int = 0,
                    device: Optional[torch.device] = None, **options: Any) -> list[torch.Tensor]:
        """``per_class`` samples for each of the first ``max_classes`` classes (sample seeds seed, seed + 1, ...), a
        row per class, in [0, 1] on the CPU; ``options`` go to :meth:`generate` (sampler, steps, guidance). The
        denoiser runs in eval mode (no drop-path / dropout while sampling) and goes back to its mode after."""
        if self.num_classes == 0:
            raise ValueError("this diffusion model is unconditional (no classes): there are no class rows to draw")
        classes = min(max_classes, self.num_classes)
        labels = torch.arange(classes).repeat_interleave(per_class).to(device or "cpu")
        training = backbone.training
        backbone.eval()
        try:
            samples = self.generate(backbone, labels, seeds=[seed + i for i in range(len(labels))], **options)
        finally:
            backbone.train(training)
        return list(samples.cpu().split(per_class))

    def predict(self, backbone: Backbone, labels: torch.Tensor) -> torch.Tensor:
        """``module(labels)``: one sample per label, images in [0, 1] (n, C, H, W), with the task's sampler."""
        return self.generate(backbone, labels, seeds=list(range(labels.shape[0])))

    def visualize(self, backbone: Backbone, batch: dict) -> dict[str, list[torch.Tensor]]:
        """Real validation images (top row) and samples for the same labels (below), as uint8 pictures."""
        if self.num_classes == 0:
            return {}
        real = self.to_uint8(batch["image"])
        labels = batch["label"]
        fake = self.generate(backbone, labels, seeds=list(range(labels.shape[0])))
        fake = (fake.cpu() * 255).round().to(torch.uint8)
        fake = fake.expand(-1, 3, -1, -1) if fake.shape[1] == 1 else fake
        return {"samples": [real, fake]}
