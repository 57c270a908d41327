"""Optimizers and schedules: the targets of conf/optim and conf/sched."""

from vitlab.optim.build import LayeredModel, build_optimizer, no_weight_decay_names, param_groups
from vitlab.optim.sam import SAM
from vitlab.optim.schedules import constant_schedule, cosine_schedule, warmup_cosine_factor

__all__ = ["build_optimizer", "no_weight_decay_names", "param_groups", "LayeredModel", "SAM", "cosine_schedule",
           "constant_schedule", "warmup_cosine_factor"]
