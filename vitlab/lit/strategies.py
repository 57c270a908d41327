"""Fully sharded data parallel for large ViTs (ViT-L/H/g), with torch's FSDP2 (``fully_shard``).

conf/trainer/fsdp.yaml points at :func:`fsdp`. It returns Lightning's ModelParallelStrategy with a 1-D
data-parallel mesh over all processes; :meth:`VitlabModule.configure_model` then calls :meth:`FSDP.shard` with
the units the recipe declares (:meth:`vitlab.recipes.Recipe.fsdp_units`: the backbone contract's
``fsdp_units()``, one per transformer block, plus e.g. MAE's decoder blocks): each becomes its own FSDP unit and
the rest of the model the root unit, so a block's parameters are all-gathered just before it runs and freed
after. ``wrap`` (a list of module classes by dotted path) overrides the declaration: every module of those
classes is a unit.

FSDP2 shards parameters as DTensors, so parameter names, per-parameter optimizer groups (the weight-decay
exemptions), ``torch.compile`` and gradient clipping work unchanged. It runs on CUDA (NCCL) and on CPU with
gloo, which is how the tests check it. (Lightning's older FSDPStrategy wraps with FSDP1, which needs a GPU.)
"""

from __future__ import annotations

import importlib
import logging
from typing import Literal, Optional, Sequence

import torch
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn

log = logging.getLogger(__name__)

DType = Literal["float32", "bfloat16", "float16"]
# the recipe's methods every rank calls in place of its forward (vitlab.recipes.Recipe; the kNN monitor's features)
FORWARD_METHODS = ("training_step", "evaluation_step", "features")


def _resolve_class(dotted: str) -> type[nn.Module]:
    module_name, _, name = dotted.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"trainer.strategy.wrap: cannot import {dotted!r}; give a module class by its dotted "
                         "path, e.g. vitlab.layers.Block") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"trainer.strategy.wrap: {dotted!r} is not an nn.Module class")
    return cls


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"FSDP dtype must be float32, bfloat16 or float16 (or null), got {name!r}")
    return getattr(torch, name)


class FSDP(ModelParallelStrategy):
    """ModelParallelStrategy as pure data parallelism (every process one shard, no tensor parallelism), plus
    the sharding plan: :meth:`shard` is what the LightningModule's ``configure_model`` applies."""

    def __init__(self, wrap: Optional[Sequence[str]] = None, reshard_after_forward: bool = True,
                 param_dtype: Optional[DType] = None, reduce_dtype: Optional[DType] = None,
                 save_distributed_checkpoint: bool = False, process_group_backend: Optional[str] = None):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend)
        self.wrap_classes = tuple(_resolve_class(name) for name in wrap) if wrap else None
        self.reshard_after_forward = reshard_after_forward
        self.param_dtype, self.reduce_dtype = _dtype(param_dtype), _dtype(reduce_dtype)

    def setup_environment(self) -> None:
        # one data-parallel dimension over every process of every node (Lightning's "auto" means one per node)
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def shard(self, model: nn.Module, units: Optional[Sequence[nn.Module]] = None) -> int:
        """Apply ``fully_shard`` to every unit (the declared ``units``, or every module of the ``wrap`` classes when
        the config names them), then to ``model``; return the number of units."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = self.device_mesh["data_parallel"]
        kwargs = {"mesh": mesh}
        if self.param_dtype is not None or self.reduce_dtype is not None:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)
        if self.wrap_classes is not None:
            blocks = [m for m in model.modules() if isinstance(m, self.wrap_classes)]
            if not blocks:
                raise ValueError(f"trainer=fsdp: the model has no module of the wrap classes "
                                 f"{[c.__name__ for c in self.wrap_classes]}; set trainer.strategy.wrap to its block "
                                 "class, or to null for the units the backbone declares")
        else:
            blocks = list(units or [])
            if not blocks:
                raise ValueError("trainer=fsdp: the model declares no FSDP units (its backbone's fsdp_units() is "
                                 "empty): set trainer.strategy.wrap to the module classes to shard one by one")
        for block in blocks:
            fully_shard(block, reshard_after_forward=self.reshard_after_forward, **kwargs)
        fully_shard(model, reshard_after_forward=self.reshard_after_forward, **kwargs)
        # Lightning calls the recipe's training / evaluation step, not its forward: they are the root's forward
        # methods (the root unit's parameters, e.g. the patch embedding and the task head, are gathered around them)
        from torch.distributed.fsdp import register_fsdp_forward_method

        for method in FORWARD_METHODS:
            register_fsdp_forward_method(model, method)
        log.info("FSDP2: %d blocks + the root sharded over %d processes (reshard_after_forward=%s)", len(blocks),
                 mesh.size(), self.reshard_after_forward)
        return len(blocks)


def fsdp(wrap: Optional[Sequence[str]] = None, reshard_after_forward: bool = True,
         param_dtype: Optional[DType] = None, reduce_dtype: Optional[DType] = None,
         save_distributed_checkpoint: bool = False, process_group_backend: Optional[str] = None) -> FSDP:
    """The strategy of conf/trainer/fsdp.yaml.

    - ``wrap``: null (default): the units the model declares (its backbone's ``fsdp_units()``); or module classes
      by dotted path (e.g. ``[vitlab.layers.Block]``), every module of which becomes a unit.
    - ``reshard_after_forward``: True frees a block's gathered parameters after its forward (ZeRO-3, least
      memory); False keeps them until the backward (ZeRO-2: less communication, more memory).
    - ``param_dtype`` / ``reduce_dtype``: FSDP's own mixed precision (e.g. bfloat16 / float32: gathers and
      computes in bf16, reduces gradients in fp32). Null leaves it to ``trainer.precision`` (autocast over
      fp32 shards).
    - ``save_distributed_checkpoint``: False gathers one ordinary checkpoint on rank 0 (``vitlab-eval`` reads
      it); True writes a folder with one shard per process (faster and lighter for ViT-H/g).
    """
    return FSDP(wrap, reshard_after_forward, param_dtype, reduce_dtype, save_distributed_checkpoint,
                process_group_backend)
