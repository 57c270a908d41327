"""Knowledge distillation from a frozen teacher: DeiT's distillation token and plain (Hinton) KD.

Two modes, chosen by ``distill_token``:

- **DeiT** (Touvron et al. 2021, "Training data-efficient image transformers & distillation through
  attention", ICML 2021), ``distill_token=True``: the student ViT carries a second prefix token (built with
  ``distill_token=True``, see :meth:`Distill.backbone_options`). The class token's head learns from the labels,
  the distillation token's own head (``dist_head``) from the teacher::

      loss = (1 - alpha) * task.loss(head(cls), y) + alpha * L_distill(dist_head(dist), teacher(x))

  DeiT's best setting is ``kind="hard"`` (cross-entropy with the teacher's argmax), ``alpha=0.5``. At inference
  the prediction is the mean of both heads' logits (DeiT's, and timm's ``VisionTransformerDistilled``).
- **Plain KD** (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"), ``distill_token=False``,
  any backbone: the class head learns from both, ``(1 - alpha) * CE + alpha * L_distill(head(x), teacher(x))``.

The teacher (``images -> logits``) is loaded on the first training step only, so building and evaluating a
distilled student never needs the teacher's file. It is frozen, kept in eval mode, and is not a submodule:
it is in no state dict, no optimizer, no DDP bucket. It sees the same (normalised, mixed-up) images as the
student, resized to ``teacher_img_size`` when given, so it must have been trained with the same normalisation.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.checkpoints import is_vitlab_checkpoint
from vitlab.recipes.base import LRScaling
from vitlab.recipes.supervised import Supervised

log = logging.getLogger(__name__)

Kind = Literal["soft", "hard"]
SoftReduction = Literal["batchmean", "numel"]


# ------------------------------------------------------------------ losses ---

def soft_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0,
                           reduction: SoftReduction = "batchmean") -> torch.Tensor:
    """tau^2 * KL(softmax(teacher / tau) || softmax(student / tau)), in float32.

    ``reduction="batchmean"``: the KL summed over classes, averaged over samples (Hinton et al. 2015; the tau^2
    keeps the gradients' scale independent of tau). ``"numel"``: the sum divided by B * C, as DeiT's code
    (``DistillationLoss``, ``/ outputs_kd.numel()``) does: C times smaller than batchmean.
    """
    if reduction not in ("batchmean", "numel"):
        raise ValueError(f"reduction must be batchmean or numel, got {reduction!r}")
    s = F.log_softmax(student_logits.float() / tau, dim=-1)                 # (B, C)
    t = F.log_softmax(teacher_logits.float() / tau, dim=-1)                 # (B, C)
    kl = F.kl_div(s, t, reduction="sum", log_target=True)
    n = s.numel() if reduction == "numel" else s.shape[0]
    return kl * (tau * tau) / n


def hard_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student against the teacher's argmax (DeiT's hard-label distillation), float32."""
    return F.cross_entropy(student_logits.float(), teacher_logits.argmax(dim=-1))


# ------------------------------------------------------------------ teacher ---

def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file (a bare state dict or a {"state_dict"/"model": ...}
    training checkpoint); a DDP ``module.`` prefix is removed."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "model_ema"):
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} holds no state dict (a mapping of names to tensors); save the teacher with "
                         "torch.save(model.state_dict(), path) or safetensors.torch.save_file")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_timm_teacher(path: str, model_name: str, num_classes: int, in_chans: int = 3) -> nn.Module:
    """Build timm's ``model_name`` (no pretrained download) and load the weights at ``path`` into it.

    Returns the model (images -> logits) in eval mode. Errors name the problem and the fix: a missing file,
    an unknown timm name (with close matches), weights of another architecture or another number of classes.
    """
    import timm

    file = Path(os.path.expanduser(str(path)))
    if not file.is_file():
        raise FileNotFoundError(f"teacher weights not found at {file}; point recipe.teacher at a vitlab .ckpt or "
                                "a timm state dict (.pth / .safetensors)")
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=5)
        raise ValueError(f"unknown timm model {model_name!r} (recipe.teacher_model); "
                         + (f"close matches: {', '.join(close)}" if close else "see timm.list_models('*name*')"))
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    sd = _read_weights(file)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or wrong:
        shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong[:4]]
        classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or ()       # e.g. "head", "fc"
        prefixes = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))
        hint = (f"the teacher's classifier does not have num_classes={num_classes}: a teacher must be trained on "
                "this dataset's classes (fine-tune it first)"
                if wrong and prefixes and all(k.startswith(prefixes) for k in wrong) else
                f"check that recipe.teacher_model={model_name!r} is the architecture the weights were trained with "
                f"(and in_chans={in_chans})")
        raise ValueError(f"teacher weights at {file} do not fit timm's {model_name}: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}, shape mismatches {shapes}; {hint}")
    model.load_state_dict(sd)
    return model.eval()


def load_teacher(path: str, teacher_model: Optional[str], num_classes: int, in_chans: int,
                 load_model: Callable[[str], Any]) -> nn.Module:
    """The distillation teacher (images -> logits), frozen: a vitlab checkpoint of any classifier (its EMA weights
    when it kept them), read with ``load_model`` (:class:`vitlab.tasks.base.BuildContext`), or a timm model
    ``teacher_model`` whose weights are in the file ``path``."""
    if not Path(str(path)).is_file():
        raise FileNotFoundError(f"recipe.teacher={path} does not exist; give a vitlab checkpoint (a run's "
                                "checkpoints/best.ckpt) or a timm weights file with recipe.teacher_model=NAME")
    if not is_vitlab_checkpoint(path):                  # a vitlab checkpoint first, else timm weights
        if not teacher_model:
            raise ValueError(f"recipe.teacher={path} is not a vitlab checkpoint; name its timm architecture with "
                             "recipe.teacher_model=NAME (e.g. resnet50)")
        return load_timm_teacher(path, teacher_model, num_classes, in_chans)
    loaded = load_model(path)
    if loaded.data.num_classes != num_classes:
        raise ValueError(f"the teacher {path} predicts {loaded.data.num_classes} classes but this dataset has "
                         f"{num_classes}; distil from a teacher trained on the same classes")
    teacher = loaded.recipe
    if teacher.pretraining:
        raise ValueError(f"the teacher {path} is a {type(teacher).__name__} pretraining checkpoint without a "
                         "trained classifier; fine-tune it first (recipe=supervised weights=PATH)")
    log.info("distillation teacher: %s from %s", type(teacher.backbone).__name__, path)
    return teacher


# ------------------------------------------------------------------ recipe ---

class Distill(Supervised):
    """Supervised training plus distillation from a frozen teacher (module docstring: DeiT and plain KD).

    ``teacher``: the teacher's weights, a vitlab checkpoint or a timm weights file (then ``teacher_model`` names
    the timm architecture). ``teacher_factory``: a zero-argument callable returning the teacher module
    (images -> logits); the training build passes one for either kind; without it a timm teacher is loaded with
    :func:`load_timm_teacher`. ``kind``: ``hard`` (CE with the teacher's argmax) or ``soft`` (tau^2 KL at
    temperature ``tau``). ``alpha``: the weight of the distillation loss. ``soft_reduction``: how the soft loss
    is averaged, None = DeiT's ``numel`` with the token, Hinton's ``batchmean`` without
    (see :func:`soft_distillation_loss`). ``teacher_img_size``: resize the student's images (bilinear,
    antialiased) to this size for the teacher.
    """

    task_agnostic = False            # reads class logits and the labels: a classification task only

    def __init__(self, backbone: nn.Module, task: nn.Module, teacher: Optional[str] = None,
                 teacher_model: Optional[str] = None, distill_token: bool = True, kind: Kind = "hard",
                 alpha: float = 0.5, tau: float = 1.0, teacher_img_size: Optional[int] = None,
                 teacher_factory: Optional[Callable[[], nn.Module]] = None,
                 soft_reduction: Optional[SoftReduction] = None, lr_scaling: LRScaling = "linear",
                 lr_base_batch: int = 512, monitor: Optional[str] = "val/top1",
                 monitor_mode: Literal["max", "min"] = "max"):
        super().__init__(backbone, task, lr_scaling, lr_base_batch, monitor, monitor_mode)
        if not teacher and teacher_factory is None:
            raise ValueError("recipe=distill needs recipe.teacher=PATH: a vitlab .ckpt, or a timm weights file "
                             "with recipe.teacher_model=NAME")
        if kind not in ("soft", "hard"):
            raise ValueError(f"recipe.kind must be soft or hard, got {kind!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"recipe.alpha (the distillation loss weight) must be in [0, 1], got {alpha!r}")
        if tau <= 0:
            raise ValueError(f"recipe.tau (the soft distillation temperature) must be > 0, got {tau!r}")
        if soft_reduction not in (None, "batchmean", "numel"):
            raise ValueError(f"recipe.soft_reduction must be null, batchmean or numel, got {soft_reduction!r}")
        if teacher_model is not None and teacher_factory is None:
            import timm

            if not timm.is_model(teacher_model):              # fail at build time, not at the first step
                close = difflib.get_close_matches(teacher_model, timm.list_models(), n=5)
                raise ValueError(f"unknown timm model {teacher_model!r} (recipe.teacher_model)"
                                 + (f"; close matches: {', '.join(close)}" if close else ""))
        if distill_token and not backbone.has_dist_token:
            raise ValueError("the backbone has no distillation token; build it with distill_token=True "
                             "(lit/build.py does so from Distill.backbone_options) or set recipe.distill_token=false "
                             "for plain knowledge distillation")
        self.teacher_source = teacher
        self.teacher_model = teacher_model
        self.distill_token = distill_token
        self.kind = kind
        self.alpha = alpha
        self.tau = tau
        self.teacher_img_size = teacher_img_size
        self.soft_reduction: SoftReduction = soft_reduction or ("numel" if distill_token else "batchmean")
        # Not submodules: kept out of state_dict, parameters(), DDP and the optimizer.
        object.__setattr__(self, "_teacher_factory", teacher_factory)
        object.__setattr__(self, "_teacher", None)
        self.dist_head: Optional[nn.Linear] = None
        if distill_token:
            self.dist_head = nn.Linear(backbone.embed_dim, task.num_classes)     # DeiT's head_dist
            nn.init.trunc_normal_(self.dist_head.weight, std=0.02)
            nn.init.zeros_(self.dist_head.bias)
            # DDP: a head that no loss term reads must not train.
            if alpha == 0.0:
                self.freeze(self.dist_head)
            elif alpha == 1.0:
                self.freeze(self.task)

    @classmethod
    def backbone_options(cls, options: dict) -> dict:
        """DeiT's distillation token for the student backbone (unless ``distill_token=False``)."""
        return {"distill_token": True} if options.get("distill_token", True) else {}

    @classmethod
    def preflight(cls, options: dict) -> None:
        """The teacher is read on the first training step: check its file before any work."""
        teacher = options.get("teacher")
        if teacher and not Path(str(teacher)).is_file():
            raise FileNotFoundError(f"recipe.teacher={teacher} does not exist; give a vitlab checkpoint (a run's "
                                    "checkpoints/best.ckpt) or a timm weights file with recipe.teacher_model=NAME")

    @classmethod
    def from_config(cls, options: dict, backbone: nn.Module, task: nn.Module, context: Any = None) -> "Distill":
        """The teacher is loaded lazily, on the first training step (evaluating a distilled student never needs
        its file): a vitlab checkpoint through ``context.load_model``, else a timm model ``teacher_model`` whose
        weights are in the file ``teacher``."""
        factory = None
        teacher = options.get("teacher")
        if teacher and context is not None and context.load_model is not None:
            factory = functools.partial(load_teacher, str(teacher), options.get("teacher_model"),
                                        int(task.num_classes), int(backbone.in_chans), context.load_model)
        return cls(backbone=backbone, task=task, teacher_factory=factory, **options)

    def pretrained_heads(self) -> dict[str, nn.Module]:
        heads = super().pretrained_heads()
        if self.dist_head is not None:
            heads["dist_head"] = self.dist_head
        return heads

    # ------------------------------------------------------------ teacher ---
    @property
    def teacher(self) -> Optional[nn.Module]:
        """The loaded teacher, or None before the first training step."""
        return self._teacher

    def load_teacher(self, device: torch.device | str = "cpu", in_chans: int = 3) -> nn.Module:
        """Build the teacher (once): from ``teacher_factory``, else a timm model from ``teacher`` +
        ``teacher_model``; frozen, in eval mode, on ``device``."""
        if self._teacher is None:
            if self._teacher_factory is not None:
                module = self._teacher_factory()
            elif self.teacher_model is None:
                raise ValueError(f"recipe.teacher={self.teacher_source!r} is not a vitlab checkpoint (or it was "
                                 "given without the build's teacher_factory); give recipe.teacher_model=<timm name> "
                                 "for a timm weights file")
            else:
                module = load_timm_teacher(self.teacher_source, self.teacher_model, self.task.num_classes, in_chans)
            module.requires_grad_(False)
            object.__setattr__(self, "_teacher", module.eval())
        teacher = self._teacher
        p = next(teacher.parameters(), None)
        if p is not None and p.device != torch.device(device):
            teacher.to(device)
        return teacher

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's logits (B, C) for the student's images, without gradients."""
        teacher = self.load_teacher(images.device, images.shape[1])
        p = next(teacher.parameters(), None)
        x = images.to(p.dtype) if p is not None and p.is_floating_point() else images
        size = self.teacher_img_size
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        with torch.no_grad():
            logits = teacher(x)
        if isinstance(logits, (tuple, list)):                   # a distilled timm teacher in training mode
            logits = (logits[0] + logits[1]) / 2
        C = self.task.num_classes
        if logits.shape[-1] != C:
            raise ValueError(f"the teacher predicts {logits.shape[-1]} classes, the student {C}; a teacher must be "
                             "trained on this dataset's classes")
        return logits.detach()

    def train(self, mode: bool = True) -> "Distill":
        super().train(mode)                                     # the teacher is no child: this leaves it alone
        if self._teacher is not None:
            self._teacher.eval()
        return self

    # ------------------------------------------------------------- student ---
    def heads(self, images: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(class-head logits (B, C), distillation-head logits (B, C) or None without the token)."""
        feats = self.backbone(images)
        cls_logits = self.task(feats)
        if self.dist_head is None:
            return cls_logits, None
        if "dist" not in feats:
            raise ValueError("the backbone has no distillation token (no 'dist' feature); build it with "
                             "distill_token=True or set recipe.distill_token=false for plain distillation")
        return cls_logits, self.dist_head(feats["dist"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The student's prediction (B, C): with the token, the mean of both heads (DeiT's inference)."""
        cls_logits, dist_logits = self.heads(images)
        return cls_logits if dist_logits is None else (cls_logits + dist_logits) / 2

    def distill_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        if self.kind == "hard":
            return hard_distillation_loss(student_logits, teacher_logits)
        return soft_distillation_loss(student_logits, teacher_logits, self.tau, self.soft_reduction)

    # --------------------------------------------------------------- steps ---
    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        images, target = batch["image"], batch["label"]        # target (B,) or mixup's soft (B, C)
        cls_logits, dist_logits = self.heads(images)
        teacher_logits = self.teacher_logits(images)            # (B, C)
        student_kd = cls_logits if dist_logits is None else dist_logits
        loss_base = self.task.loss(cls_logits, target)
        loss_distill = self.distill_loss(student_kd, teacher_logits)
        loss = (1.0 - self.alpha) * loss_base + self.alpha * loss_distill
        logits = (cls_logits if dist_logits is None else (cls_logits + dist_logits) / 2).detach()
        agreement = (logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean()     # 0-d, stays on device
        out = {"loss": loss, "loss_base": loss_base.detach(), "loss_distill": loss_distill.detach(),
               "teacher_agreement": agreement, "preds": logits}
        if target.ndim == 1:
            out["target"] = target
        return out

    def evaluation_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """The student's prediction (both heads' mean with the token) against the labels."""
        logits = self(batch["image"])
        return {"loss": self.task.loss(logits, batch["label"]), "preds": logits, "target": batch["label"]}
