"""A weight EMA of a model: the averaged copy that is evaluated (DeiT / timm's ``--model-ema``), pure torch.

``ema = d * ema + (1 - d) * model`` after every ``update_every``-th optimizer step, for float parameters and
buffers; integer buffers (BatchNorm's ``num_batches_tracked``) are copied. The update is a few fused
``torch._foreach_lerp_`` kernels and never reads a value back from the device: the decay is a Python float
computed from a Python mirror of the ``num_updates`` buffer. ``num_updates`` is saved in the state dict, so a
resumed run continues the same average (and the same warmup).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class ModelEma(nn.Module):
    """Exponential moving average of ``model``'s weights, kept in a frozen deep copy (``self.module``).

    ``decay``: per-update decay d (0.9999 in DeiT, for ~300k steps; use a smaller d for short runs: the average
    spans ~1 / (1 - d) updates). ``warmup``: d_n = min(decay, (1 + n) / (10 + n)) for the n-th update (the
    num_updates rule of TensorFlow's ``tf.train.ExponentialMovingAverage``), so the early average is not
    dominated by the random initialisation. ``update_every``: update on steps divisible by it (the decay applies
    per update, not per step).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False, update_every: int = 1):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1] (e.g. 0.9999), got {decay!r}")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"EMA update_every must be an integer >= 1, got {update_every!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.update_every = update_every
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        for p in self.module.parameters():
            p.grad = None                                   # deepcopy copies gradients too
        self.module.eval()
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._num_updates = 0                               # Python mirror: the decay is computed without a sync

    def train(self, mode: bool = True) -> ModelEma:
        """The averaged copy stays in eval mode (no dropout / drop-path, BatchNorm uses its averaged stats)."""
        super().train(mode)
        self.module.eval()
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def decay_at(self, n: int) -> float:
        """The decay of update number ``n`` (0-based)."""
        if self.warmup:
            return min(self.decay, (1 + n) / (10 + n))
        return self.decay

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor],
                                                list[torch.Tensor]]:
        """(ema float tensors, model float tensors, ema other tensors, model other tensors), matched by name."""
        ema = dict(self.module.named_parameters())
        ema.update(self.module.named_buffers())
        src = dict(model.named_parameters())
        src.update(model.named_buffers())
        if ema.keys() != src.keys():
            missing, extra = sorted(ema.keys() - src.keys()), sorted(src.keys() - ema.keys())
            raise ValueError(f"the model does not match its EMA copy (missing {missing[:5]}, unexpected "
                             f"{extra[:5]}); pass the same, unwrapped module the ModelEma was built from")
        ema_f, src_f, ema_o, src_o = [], [], [], []
        for name, e in ema.items():
            s = src[name].detach()
            if e.shape != s.shape:
                raise ValueError(f"{name}: shape {tuple(s.shape)} in the model, {tuple(e.shape)} in its EMA copy; "
                                 "pass the module the ModelEma was built from")
            if e.is_floating_point():
                ema_f.append(e)
                src_f.append(s)
            else:
                ema_o.append(e)
                src_o.append(s)
        return ema_f, src_f, ema_o, src_o

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Average ``model`` in, if ``step`` (the optimizer step just taken) is a multiple of ``update_every``."""
        if step % self.update_every:
            return
        d = self.decay_at(self._num_updates)
        ema_f, src_f, ema_o, src_o = self._pairs(model)
        if ema_f:
            src_f = [s.to(e.dtype) if s.dtype != e.dtype else s for s, e in zip(src_f, ema_f)]
            torch._foreach_lerp_(ema_f, src_f, 1.0 - d)            # ema + (1 - d) * (model - ema)
        if ema_o:
            torch._foreach_copy_(ema_o, src_o)
        self.num_updates.add_(1)
        self._num_updates += 1

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Copy ``model``'s weights and buffers exactly (num_updates is unchanged)."""
        ema_f, src_f, ema_o, src_o = self._pairs(model)
        if ema_f or ema_o:
            torch._foreach_copy_(ema_f + ema_o, src_f + src_o)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.num_updates.device.type != "meta":
            self._num_updates = int(self.num_updates)        # once, at load time: re-sync the Python mirror

    def extra_repr(self) -> str:
        return f"decay={self.decay}, warmup={self.warmup}, update_every={self.update_every}"
