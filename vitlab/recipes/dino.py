"""DINO: self-distillation with no labels (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
Transformers"; facebookresearch/dino main_dino.py).

A student (backbone + :class:`DINOHead`) is trained to match, on every multi-crop view, the output distribution
of a teacher on the *other* global views. The teacher is an exponential moving average of the student (no
gradients); its outputs are centred (a running mean, :class:`DINOLoss`) and sharpened (a low temperature), which
together keep the two from collapsing. The pieces, each testable alone:

    DINOHead                  MLP -> bottleneck -> L2 normalise -> weight-normalised linear (K prototypes)
    DINOLoss                  cross-entropy teacher (centred, sharpened) vs student over (global i, view v != i)
    DINO.momentum_at(step)    the teacher's EMA momentum: cosine from momentum_teacher to 1 over training
    DINO.teacher_temp_at(e)   the teacher temperature: linear warm-up, then constant
    DINO.update_teacher(m)    teacher = m * teacher + (1 - m) * student (foreach ops, no host sync)

Hook order per optimizer step (vitlab/recipes/base.py): training_step -> on_before_optimizer_step (the last
layer's gradients are dropped during the first ``freeze_last_layer_epochs``) -> on_after_optimizer_step (EMA).
The teacher is what gets evaluated and exported (:meth:`DINO.eval_backbone`).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Literal, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from vitlab.data.multicrop import MultiCropTransform
from vitlab.recipes.base import LRScaling, Recipe

Outputs = Union[torch.Tensor, Sequence[torch.Tensor]]


# -------------------------------------------------------------------- head ---

class DINOHead(nn.Module):
    """DINO's projection head: ``head_layers`` linear layers (GELU, optional BN) down to ``bottleneck_dim``,
    L2 normalisation, then a weight-normalised linear layer to ``out_dim`` without bias.

    With ``norm_last_layer`` the last layer's magnitude is fixed at 1 (its ``original0``, the weight-norm g, is
    frozen): DINO's remedy for unstable training of small models; only the directions are learned.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 head_layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True):
        super().__init__()
        if head_layers < 1:
            raise ValueError(f"head_layers must be >= 1, got {head_layers}")
        if head_layers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = []
            dims = [in_dim] + [hidden_dim] * (head_layers - 1)
            for a, b in zip(dims[:-1], dims[1:]):
                layers.append(nn.Linear(a, b))
                if use_bn:
                    layers.append(nn.BatchNorm1d(b))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(_init_linear)
        # As in DINO, the last layer keeps nn.Linear's default init: only its direction matters after weight norm.
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0              # (out_dim, 1), the magnitude
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)                                                     # (B, bottleneck)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)                                           # (B, out_dim)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# -------------------------------------------------------------------- loss ---

def teacher_temperature(epoch: int, teacher_temp: float, warmup_teacher_temp: float, warmup_epochs: int) -> float:
    """DINO's schedule: ``np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs)`` for the first
    ``warmup_epochs`` epochs, then ``teacher_temp``."""
    if epoch >= warmup_epochs:
        return teacher_temp
    if warmup_epochs == 1:
        return warmup_teacher_temp
    return warmup_teacher_temp + (teacher_temp - warmup_teacher_temp) * epoch / (warmup_epochs - 1)


def _as_list(x: Outputs, n_per_view: int) -> list[torch.Tensor]:
    return list(x) if not torch.is_tensor(x) else list(x.split(n_per_view))


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student, over every (teacher view i,
    student view v) pair with v != i, averaged over the pairs and the batch. Computed in float32.

    ``forward(student_out, teacher_out, epoch)``: ``student_out`` is a list with one (B, K) tensor per view
    (global views first) or their concatenation (V*B, K); ``teacher_out`` the same for the 2 global views.
    It does not change the centre: call :meth:`update_center` with the teacher outputs after it.
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, teacher_temp: float = 0.04, warmup_teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 0, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        for name, t in (("teacher_temp", teacher_temp), ("warmup_teacher_temp", warmup_teacher_temp),
                        ("student_temp", student_temp)):
            if not t > 0:
                raise ValueError(f"{name} must be > 0, got {t}")
        if not 0.0 <= center_momentum < 1.0:
            raise ValueError(f"center_momentum must be in [0, 1), got {center_momentum}")
        if warmup_teacher_temp_epochs < 0:
            raise ValueError(f"warmup_teacher_temp_epochs must be >= 0, got {warmup_teacher_temp_epochs}")
        self.teacher_temp, self.warmup_teacher_temp = teacher_temp, warmup_teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def temperature(self, epoch: int) -> float:
        return teacher_temperature(epoch, self.teacher_temp, self.warmup_teacher_temp,
                                   self.warmup_teacher_temp_epochs)

    def teacher_log_probs(self, teacher_out: torch.Tensor, epoch: int) -> torch.Tensor:
        """log softmax((t - center) / temp), float32, no gradient."""
        t = teacher_out.detach().float()
        return F.log_softmax((t - self.center) / self.temperature(epoch), dim=-1)

    def forward(self, student_out: Outputs, teacher_out: Outputs, epoch: int) -> torch.Tensor:
        t_views = _as_list(teacher_out, teacher_out.shape[0] // 2) if torch.is_tensor(teacher_out) \
            else list(teacher_out)
        s_views = _as_list(student_out, t_views[0].shape[0])
        if len(t_views) > len(s_views):
            raise ValueError(f"the student saw {len(s_views)} views but the teacher {len(t_views)}: the student sees "
                             "every view, the teacher the global ones (the first of the student's)")
        q = [self.teacher_log_probs(t, epoch).exp() for t in t_views]               # (B, K) each
        log_p = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in s_views]
        total, n = 0.0, 0
        for i, qi in enumerate(q):
            for v, lp in enumerate(log_p):
                if v == i:                                  # never the teacher's own view
                    continue
                total = total + torch.sum(-qi * lp, dim=-1).mean()
                n += 1
        if n == 0:
            raise ValueError("DINO's loss needs at least two views (a teacher view and another student view)")
        return total / n

    @torch.no_grad()
    def update_center(self, teacher_out: Outputs) -> None:
        """center = m * center + (1 - m) * mean of the teacher outputs over the batch (all ranks' batches when
        torch.distributed is initialised)."""
        t = teacher_out.float() if torch.is_tensor(teacher_out) else torch.cat(list(teacher_out)).float()
        batch_center = t.sum(dim=0, keepdim=True)                                   # (1, K)
        count = t.shape[0]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            count *= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_center / count, alpha=1.0 - self.center_momentum)


# ------------------------------------------------------------------ recipe ---

class DINO(Recipe):
    """DINO pretraining of ``backbone``. The classification ``task`` is frozen (pretraining reads no labels).

    Arguments follow DINO's main_dino.py (ViT-S/16 defaults): the head (``out_dim`` prototypes, ``hidden_dim``,
    ``bottleneck_dim``, ``head_layers``, ``use_bn_in_head``, ``norm_last_layer``), the teacher's EMA momentum
    (cosine from ``momentum_teacher`` to 1), the temperatures (teacher: ``warmup_teacher_temp`` ->
    ``teacher_temp`` over ``warmup_teacher_temp_epochs``; student ``student_temp``), ``center_momentum``,
    ``freeze_last_layer_epochs`` and the multi-crop (``num_local_crops``, the crop scales and
    ``local_crop_size``: null = the multiple of the patch size nearest img_size * 96 / 224).

    The representation fed to the head is the backbone's ``pooled`` feature: the class token with
    ``global_pool=token`` (DINO's choice), the normed patch average with ``global_pool=avg``.
    """

    pretraining = True

    def __init__(self, backbone: nn.Module, task: nn.Module, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, head_layers: int = 3, use_bn_in_head: bool = False,
                 norm_last_layer: bool = True, momentum_teacher: float = 0.996, teacher_temp: float = 0.04,
                 warmup_teacher_temp: float = 0.04, warmup_teacher_temp_epochs: int = 0, student_temp: float = 0.1,
                 center_momentum: float = 0.9, freeze_last_layer_epochs: int = 1, num_local_crops: int = 8,
                 global_crop_scale: Sequence[float] = (0.4, 1.0), local_crop_scale: Sequence[float] = (0.05, 0.4),
                 local_crop_size: Optional[int] = None, lr_scaling: LRScaling = "linear", lr_base_batch: int = 256,
                 monitor: Optional[str] = None, monitor_mode: Literal["max", "min"] = "max"):
        super().__init__(backbone, task, lr_scaling, lr_base_batch, monitor, monitor_mode)
        if not 0.0 <= momentum_teacher <= 1.0:
            raise ValueError(f"momentum_teacher must be in [0, 1] (DINO: 0.996; 0.9995 for small batches), "
                             f"got {momentum_teacher}")
        if freeze_last_layer_epochs < 0:
            raise ValueError(f"freeze_last_layer_epochs must be >= 0, got {freeze_last_layer_epochs}")
        if isinstance(num_local_crops, bool) or not isinstance(num_local_crops, int) or num_local_crops < 0:
            raise ValueError(f"num_local_crops must be an integer >= 0, got {num_local_crops!r}")
        patch = int(backbone.patch_size)
        if local_crop_size is not None and (local_crop_size < patch or local_crop_size % patch):
            raise ValueError(f"local_crop_size must be a multiple of the patch size {patch}, got {local_crop_size}; "
                             "or set it to null (img_size * 96 / 224, rounded to the patch size)")
        self.freeze(task)
        self.momentum_teacher = momentum_teacher
        self.freeze_last_layer_epochs = freeze_last_layer_epochs
        self.num_local_crops = num_local_crops
        self.global_crop_scale = tuple(global_crop_scale)
        self.local_crop_scale = tuple(local_crop_scale)
        self.local_crop_size = local_crop_size

        self.head = DINOHead(backbone.embed_dim, out_dim, hidden_dim, bottleneck_dim, head_layers, use_bn_in_head,
                             norm_last_layer)
        # The teacher starts as a copy of the student (again in setup_schedule) and is then only moved by the EMA.
        self.teacher_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.dino_loss = DINOLoss(out_dim, teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs,
                                  student_temp, center_momentum)
        # Schedules are Python functions of a Python step counter: no tensor is read back to the host.
        self.total_steps: Optional[int] = None
        self.steps_per_epoch: Optional[int] = None
        self._step = 0                    # optimizer steps completed (saved via get_extra_state for resume)
        self._epoch = 0                   # the epoch the hooks last reported (used without setup_schedule)
        self.train(self.training)

    # ------------------------------------------------------------ wiring ---
    def train(self, mode: bool = True) -> DINO:
        """The teacher stays in eval mode (no dropout / drop-path), except BatchNorm in its head, which uses
        batch statistics while training, as DINO's teacher does."""
        super().train(mode)
        self.teacher_backbone.eval()
        self.teacher_head.eval()
        if mode:
            for m in self.teacher_head.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
        return self

    def local_size(self, img_size: int) -> int:
        """The local crops' side: ``local_crop_size``, or the multiple of the patch size nearest
        img_size * 96 / 224 (DINO's 96 at 224), at least one patch."""
        if self.local_crop_size is not None:
            return self.local_crop_size
        p = int(self.backbone.patch_size)
        return max(p, p * round(img_size * 96 / 224 / p))

    def train_transform(self, img_size: int, mean: Sequence[float], std: Sequence[float],
                        in_chans: int) -> Optional[Callable]:
        return MultiCropTransform(global_size=img_size, local_size=self.local_size(img_size),
                                  num_local=self.num_local_crops, mean=mean, std=std, in_chans=in_chans,
                                  global_scale=self.global_crop_scale, local_scale=self.local_crop_scale)

    def get_extra_state(self) -> Any:
        return {"step": self._step, "epoch": self._epoch}

    def set_extra_state(self, state: Any) -> None:
        self._step, self._epoch = int(state["step"]), int(state["epoch"])

    # --------------------------------------------------------- schedules ---
    def setup_schedule(self, total_steps: int, steps_per_epoch: int) -> None:
        """Size the schedules. Before the first step it also re-copies the student into the teacher, so weights
        loaded into the backbone after construction (``weights=...``) reach the teacher too; a resumed run
        (steps already taken, restored from the checkpoint) keeps its teacher."""
        self.total_steps = int(total_steps)
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        if self._step == 0:
            self.sync_teacher()

    @torch.no_grad()
    def sync_teacher(self) -> None:
        """teacher = student (backbone and head, parameters and buffers)."""
        self.teacher_backbone.load_state_dict(self.backbone.state_dict())
        self.teacher_head.load_state_dict(self.head.state_dict())

    def momentum_at(self, step: int) -> float:
        """DINO's cosine_scheduler for the teacher momentum: momentum_teacher at step 0, 1 at the last step
        (``total_steps - 1``); constant momentum_teacher before setup_schedule."""
        m0 = self.momentum_teacher
        if not self.total_steps or self.total_steps < 2:
            return m0
        t = min(step, self.total_steps - 1) / (self.total_steps - 1)
        return 1.0 - (1.0 - m0) * (math.cos(math.pi * t) + 1.0) / 2.0

    @property
    def epoch(self) -> int:
        """The current training epoch, from the step counter (or the hooks' epoch before setup_schedule)."""
        return self._step // self.steps_per_epoch if self.steps_per_epoch else self._epoch

    def teacher_temp_at(self, epoch: int) -> float:
        return self.dino_loss.temperature(epoch)

    # ------------------------------------------------------------- hooks ---
    def on_before_optimizer_step(self, step: int, epoch: int) -> None:
        """DINO's cancel_gradients_last_layer: the last layer is not updated during the first epochs."""
        self._epoch = epoch
        if epoch < self.freeze_last_layer_epochs:
            for p in self.head.last_layer.parameters():
                p.grad = None

    def on_after_optimizer_step(self, step: int, epoch: int) -> None:
        self.update_teacher(self.momentum_at(step))
        self._step, self._epoch = step + 1, epoch

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher = m * teacher + (1 - m) * student, over every parameter of backbone and head."""
        t_params, s_params = [], []
        for student, teacher in ((self.backbone, self.teacher_backbone), (self.head, self.teacher_head)):
            for (ns, ps), (nt, pt) in zip(student.named_parameters(), teacher.named_parameters(), strict=True):
                if ns != nt:
                    raise RuntimeError(f"student and teacher parameters differ ({ns} vs {nt})")
                t_params.append(pt)
                s_params.append(ps.detach())
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)

    # ------------------------------------------------------------- steps ---
    def student_forward(self, crops: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Student outputs, one (B, K) per view. Views of one resolution go through the backbone together (the
        globals, then the locals); the head runs once over all of them (DINO's MultiCropWrapper)."""
        feats, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats.append(self.backbone(torch.cat(list(crops[start:end])))["pooled"])   # (n*B, D)
            start = end
        out = self.head(torch.cat(feats))                                             # (V*B, K)
        return list(out.split(crops[0].shape[0]))

    @torch.no_grad()
    def teacher_forward(self, global_crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher outputs on the global views, concatenated: (2B, K)."""
        return self.teacher_head(self.teacher_backbone(torch.cat(list(global_crops)))["pooled"])

    def _crops(self, batch: dict) -> list[torch.Tensor]:
        crops = batch["image"]
        if torch.is_tensor(crops):
            raise ValueError(
                "recipe=dino needs its multi-crop transform; batch['image'] is a single tensor "
                f"{tuple(crops.shape)} instead of a list of views. The data module must use "
                "recipe.train_transform(img_size, mean, std, in_chans) for the train split (its train_transform "
                "argument), with data.batched_augment=false")
        crops = list(crops)
        if len(crops) < 2:
            raise ValueError(f"DINO needs 2 global views (+ local ones), got {len(crops)}")
        return crops

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        crops = self._crops(batch)
        epoch = self.epoch
        teacher_out = self.teacher_forward(crops[:2])                                  # (2B, K)
        student_out = self.student_forward(crops)                                      # V x (B, K)
        loss = self.dino_loss(student_out, teacher_out, epoch)
        with torch.no_grad():
            lq = self.dino_loss.teacher_log_probs(teacher_out, epoch)                  # (2B, K)
            entropy = -(lq.exp() * lq).sum(-1).mean()                                  # collapse: -> 0 or -> log K
        self.dino_loss.update_center(teacher_out)
        # torch.full, not torch.tensor: a fill kernel on the device, no host-to-device copy to wait for
        dev = loss.device
        return {"loss": loss, "entropy": entropy,
                "teacher_temp": torch.full((), self.teacher_temp_at(epoch), device=dev),
                "momentum": torch.full((), self.momentum_at(self._step), device=dev)}

    @torch.no_grad()
    def evaluation_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """{"loss": DINO's loss between teacher and student}, with the centre left as it is. On the single
        evaluation view (a tensor) it is the cross-entropy of the student against the teacher on the same image
        (how well the student matches its teacher); on multi-crop views it is the training loss."""
        images = batch["image"]
        epoch = self.epoch
        if torch.is_tensor(images):
            teacher_out = self.teacher_forward([images])                               # (B, K)
            lq = self.dino_loss.teacher_log_probs(teacher_out, epoch)
            s = self.head(self.backbone(images)["pooled"]).float()
            loss = torch.sum(-lq.exp() * F.log_softmax(s / self.dino_loss.student_temp, dim=-1), dim=-1).mean()
            return {"loss": loss}
        crops = self._crops(batch)
        return {"loss": self.dino_loss(self.student_forward(crops), self.teacher_forward(crops[:2]), epoch)}

    # -------------------------------------------------------- evaluation ---
    def fsdp_units(self) -> list[nn.Module]:
        """The student's blocks and the EMA teacher's (each its own FSDP unit, as the student's)."""
        return super().fsdp_units() + list(self.teacher_backbone.fsdp_units())

    def eval_backbone(self) -> nn.Module:
        """DINO evaluates (and exports) the teacher's backbone."""
        return self.teacher_backbone
