"""Reading vitlab checkpoints with torch alone (no Lightning, no Hydra): is a file one, what it holds, and the
upgrade of configs written by older versions of vitlab (renamed ``_target_`` paths), so any checkpoint still
rebuilds its model. Rebuilding the model itself is the composition root's (``vitlab.lit.build.load_checkpoint``).

A vitlab checkpoint is a Lightning checkpoint (``state_dict``, optimizer and loop state, ...) plus a ``vitlab``
entry: ``config`` (the run's resolved config), ``data_info`` (:class:`vitlab.data.base.DataInfo` as a dict),
``rng`` and ``wandb_run_id``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Union

import torch

PathLike = Union[str, os.PathLike]

# (old prefix, new prefix) of ``_target_`` values that moved: configs stored in older checkpoints name the old ones
LEGACY_TARGETS: tuple[tuple[str, str], ...] = (
    ("vitlab.heads.", "vitlab.tasks."),                         # vitlab/heads/ became vitlab/tasks/
)


class NotACheckpointError(ValueError):
    """A file that should be a vitlab checkpoint is missing, unreadable, or another kind of file."""


class MissingCheckpointError(NotACheckpointError, FileNotFoundError):
    """The checkpoint file does not exist (also a FileNotFoundError, as ``torch.load`` of a missing file was)."""


def read_checkpoint(path: PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """The whole checkpoint at ``path``; :class:`NotACheckpointError` (naming the fix) when it is missing, cannot
    be unpickled, or holds no vitlab config."""
    p = Path(path)
    if not p.is_file():
        raise MissingCheckpointError(f"{p} does not exist; give a vitlab checkpoint (a run's checkpoints/last.ckpt "
                                  "or best.ckpt)")
    if p.suffix == ".safetensors":
        raise NotACheckpointError(f"{p} is a safetensors file, not a vitlab checkpoint (a run's .ckpt)")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as e:                      # noqa: BLE001 - any unreadable file gets the same answer
        raise NotACheckpointError(f"{p} is not a vitlab checkpoint (it cannot be read by torch.load: "
                                  f"{type(e).__name__}); give a run's checkpoints/last.ckpt or best.ckpt") from None
    meta = ckpt.get("vitlab") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or not meta.get("config"):
        raise NotACheckpointError(f"{p} is not a vitlab checkpoint (it holds no resolved vitlab config); give a "
                                  "checkpoint written by vitlab-train (checkpoints/last.ckpt or best.ckpt)")
    return ckpt


def read_meta(path: PathLike) -> dict:
    """The ``vitlab`` entry of a checkpoint (config, data_info, rng, wandb_run_id), memory-mapped; ``{}`` for a
    Lightning checkpoint without one (e.g. written by a module built without a config). NotACheckpointError
    when the file is missing or not a torch checkpoint."""
    p = Path(path)
    if not p.is_file():
        raise MissingCheckpointError(f"{p} does not exist; give a vitlab checkpoint (a run's checkpoints/last.ckpt)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:                      # noqa: BLE001
        raise NotACheckpointError(f"{p} is not a checkpoint (it cannot be read by torch.load: "
                                  f"{type(e).__name__}); give a run's checkpoints/last.ckpt") from None
    meta = ckpt.get("vitlab") if isinstance(ckpt, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


def is_vitlab_checkpoint(path: PathLike) -> bool:
    """A file written by vitlab-train (it holds the resolved config under ``vitlab``); read memory-mapped."""
    try:
        read_checkpoint(path, mmap=True)
    except NotACheckpointError:
        return False
    return True


def upgrade_config(config: dict) -> dict:
    """A stored run config with every moved ``_target_`` renamed (:data:`LEGACY_TARGETS`); a copy."""
    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: walk(v) for k, v in node.items()}
            target = out.get("_target_")
            if isinstance(target, str):
                for old, new in LEGACY_TARGETS:
                    if target.startswith(old):
                        out["_target_"] = new + target[len(old):]
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(copy.deepcopy(config))
