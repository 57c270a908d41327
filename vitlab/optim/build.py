"""One function builds every optimizer: parameter groups with and without weight decay, optional layer-wise lr
decay, and SAM / ASAM around AdamW or SGD."""

from __future__ import annotations

import logging
from typing import Callable, Literal, Optional, Protocol, Sequence, Union, runtime_checkable

import torch
from torch import nn

from vitlab.optim.sam import SAM

log = logging.getLogger(__name__)

OptimizerName = Literal["adamw", "sgd", "sam"]
BaseName = Literal["adamw", "sgd"]
Fused = Union[bool, Literal["auto"]]


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names of parameters exempt from weight decay.

    Norm weights, biases and other 1-D parameters (LayerScale gammas), plus the
    names each submodule lists in its ``no_weight_decay()`` (position
    embeddings, class / register / mask tokens).
    """
    names = {n for n, p in model.named_parameters() if p.ndim <= 1}
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            names |= {f"{prefix}.{n}" if prefix else n for n in fn()}
    return names


@runtime_checkable
class LayeredModel(Protocol):
    """What layer-wise lr decay reads of a model: its depth and the layer of each parameter (every vitlab Recipe and
    Backbone declares both: :class:`vitlab.backbones.base.Backbone`). The optimizer builder never guesses layers
    from parameter names, so a hierarchical model (Swin's ``layers.i.blocks.j``) is decayed by its own rule."""

    num_layers: int

    def layer_id(self, name: str) -> int: ...


def param_groups(model: nn.Module, weight_decay: float, layer_decay: Optional[float] = None) -> list[dict]:
    """Trainable parameters split into groups with and without weight decay.

    Without ``layer_decay``: two groups, ``decay`` and ``no_decay``. With it (BEiT, Bao et al. 2022; ELECTRA,
    Clark et al. 2020): one group per (decay kind, layer id) that has parameters, each with
    ``lr_scale = layer_decay ** (L + 1 - layer_id)``, its ``layer_id`` and a name such as ``decay_layer3`` under
    ``group``, where L = ``model.num_layers`` and ``model.layer_id(name)`` are the model's own declaration
    (:class:`LayeredModel`: 0 = the stem, i + 1 = block i, L + 1 = the final norm, the task head and other
    recipe modules, which train at the full lr); :func:`build_optimizer` sets each group's lr to lr * lr_scale.
    """
    skip = no_weight_decay_names(model)
    if layer_decay is None:
        decay, no_decay = [], []
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if n in skip else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay, "group": "decay"},
                {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"}]
    check_layer_decay(layer_decay)
    if not isinstance(model, LayeredModel):
        raise ValueError(f"optim.layer_decay={layer_decay} needs a model that declares its layers (num_layers and "
                         f"layer_id(name): every vitlab recipe and backbone does); {type(model).__name__} does not: "
                         "set optim.layer_decay=null")
    num_layers = int(model.num_layers)
    if num_layers == 0:
        raise ValueError(f"optim.layer_decay={layer_decay} needs a backbone with layers to decay; this one declares "
                         "none (num_layers=0, e.g. a hierarchical timm feature extractor): set optim.layer_decay=null")
    groups: dict[tuple[int, bool], dict] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = int(model.layer_id(n))
        exempt = n in skip
        if (layer, exempt) not in groups:
            kind = "no_decay" if exempt else "decay"
            groups[(layer, exempt)] = {"params": [], "weight_decay": 0.0 if exempt else weight_decay,
                                       "lr_scale": layer_decay ** (num_layers + 1 - layer), "layer_id": layer,
                                       "group": f"{kind}_layer{layer}"}
        groups[(layer, exempt)]["params"].append(p)
    return [groups[k] for k in sorted(groups)]                 # embeddings first, head last; decay before no_decay


def check_layer_decay(layer_decay: Optional[float]) -> None:
    if layer_decay is not None and (isinstance(layer_decay, bool) or not 0 < layer_decay <= 1):
        raise ValueError(f"optim.layer_decay must be in (0, 1] (e.g. 0.65 for ViT-B, 0.75 for ViT-L fine-tuning) "
                         f"or null to turn it off, got {layer_decay!r}")


def describe_layer_decay(groups: list[dict], layer_decay: float, num_layers: int) -> str:
    """One line: the lr multipliers of the embeddings, the first and the last block, and the head."""
    scales = {g["layer_id"]: g["lr_scale"] for g in groups}
    label = {0: "embeddings", num_layers + 1: "head"}
    parts = [f"x{scales[i]:.3g} ({label.get(i, f'block {i - 1}')})"
             for i in sorted({0, 1, num_layers, num_layers + 1}) if i in scales]
    return f"layer-wise lr decay {layer_decay} over {num_layers + 2} layers: " + " ... ".join(parts)


def _fused_devices() -> set[str]:
    """Device types with a fused AdamW kernel in this torch: CUDA always, the CPU since torch 2.4."""
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return {"cuda", "cpu"} if (major, minor) >= (2, 4) else {"cuda"}


def resolve_fused(fused: Fused, params: Sequence[torch.Tensor]) -> bool:
    """``auto`` -> the fused AdamW (one kernel for all parameters, no value read back to the host) when every
    parameter is a float tensor on a device torch has the kernel for (CUDA; the CPU since torch 2.4, where it is
    also ~2.5x faster than the default per-tensor loop); else torch's default. ``True`` / ``False`` force it."""
    if fused == "auto":
        devices = _fused_devices()
        return bool(params) and all(p.device.type in devices and p.is_floating_point() for p in params)
    if not isinstance(fused, bool):
        raise ValueError(f"optim.fused must be true, false or auto, got {fused!r}")
    return fused


def build_optimizer(model: nn.Module, name: OptimizerName = "adamw", lr: float = 1e-3,
                    weight_decay: float = 0.05, betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
                    momentum: float = 0.9, nesterov: bool = False, fused: Fused = "auto",
                    base: BaseName = "adamw", rho: float = 0.05, adaptive: bool = False,
                    layer_decay: Optional[float] = None) -> torch.optim.Optimizer:
    """AdamW, SGD, or SAM / ASAM around either, over groups of decayed weights and everything exempt from decay.

    ``fused`` (AdamW only): see :func:`resolve_fused`. Lightning builds the optimizer after the model is on
    its device, so ``auto`` sees where the parameters really are.
    ``name="sam"``: ``base`` (adamw | sgd) is built with the same groups and arguments and wrapped in
    :class:`vitlab.optim.sam.SAM` with ``rho`` and ``adaptive`` (ASAM; use a ~10x larger rho).
    ``layer_decay``: layer-wise lr decay (fine-tuning): see :func:`param_groups`; None turns it off.
    """
    if name not in ("adamw", "sgd", "sam"):
        raise ValueError(f"unknown optimizer {name!r}; choose adamw, sgd or sam")
    if name == "sam":
        if base not in ("adamw", "sgd"):
            raise ValueError(f"unknown optim.base {base!r} for SAM; choose adamw or sgd")
        if isinstance(rho, bool) or not rho > 0:
            raise ValueError(f"optim.rho must be > 0 (0.05 for SAM, ~0.5 with optim.adaptive=true), got {rho!r}")
    check_layer_decay(layer_decay)
    groups = param_groups(model, weight_decay, layer_decay)
    if layer_decay is not None:
        for g in groups:
            g["lr"] = lr * g["lr_scale"]
        log.info(describe_layer_decay(groups, layer_decay, int(model.num_layers)))
    kind = base if name == "sam" else name
    if kind == "adamw":
        params = [p for g in groups for p in g["params"]]
        use_fused = resolve_fused(fused, params)
        try:
            opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=use_fused or None)
        except RuntimeError as e:
            raise RuntimeError(f"optim.fused=true is not supported here ({e}); use optim.fused=auto") from None
        log.info("optimizer: AdamW (%s)", "fused" if use_fused else "foreach")
    else:
        opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "sam":
        opt = SAM(opt, rho=rho, adaptive=adaptive)
        log.info("optimizer: %s around %s, rho=%g (two forward/backward passes per step)",
                 "ASAM" if adaptive else "SAM", type(opt.base).__name__, rho)
    return opt


# ------------------------------------------- fused AdamW under gradient scaling ---

def unfused_for_scaled_clipping(opt: torch.optim.Optimizer, rebuild_unfused: Callable[[], torch.optim.Optimizer],
                                grad_scaling: bool, clipping: bool, fused_setting: Fused = "auto"
                                ) -> torch.optim.Optimizer:
    """fp16's GradScaler + gradient clipping + a fused optimizer cannot work: the fused kernel unscales the
    gradients itself, after clipping would have seen them scaled (Lightning refuses it). With ``optim.fused=auto``
    the unfused optimizer (``rebuild_unfused()``) is used then; an explicit ``optim.fused=true`` gets an error that
    says what to change. Otherwise ``opt`` as it is."""
    if not (opt.defaults.get("fused") and grad_scaling and clipping):
        return opt
    if fused_setting != "auto":
        raise ValueError("optim.fused=true cannot be combined with trainer.precision=16-mixed and gradient "
                         "clipping (the fused kernel unscales fp16 gradients after clipping would see them): "
                         "set optim.fused=auto, or trainer.precision=bf16-mixed, or trainer.gradient_clip_val=null")
    log.info("optimizer: unfused AdamW (fp16 gradient scaling + clipping; the fused kernel cannot clip)")
    return rebuild_unfused()


def clip_gradients(optimizer: torch.optim.Optimizer, value: float, algorithm: Optional[str] = "norm") -> None:
    """Clip the gradients of ``optimizer``'s parameters by norm (default) or ``"value"``: what a training loop
    does itself for a fused optimizer when no GradScaler is involved (the gradients are the true ones)."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if algorithm == "value":                            # a str, or Lightning's GradClipAlgorithmType (a str enum)
        torch.nn.utils.clip_grad_value_(params, float(value))
    else:
        torch.nn.utils.clip_grad_norm_(params, float(value))
