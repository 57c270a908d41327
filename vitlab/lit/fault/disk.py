"""The run directory and the disk: it takes a write before any work, has room for the checkpoints, a full disk
during training gets a message naming the intact checkpoint, and what a killed save left behind is removed."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from omegaconf import DictConfig

from vitlab.io import stale_temp_files
from vitlab.lit.fault.common import RunDirError, human

log = logging.getLogger("vitlab")

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def parse_size(value: Union[int, float, str]) -> int:
    """``fault.min_free_space``: bytes as a number or with a unit ("500MB", "2GiB")."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([KMGT]?)(i?)B?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ValueError(f"fault.min_free_space={value!r} is not a size: use auto, 0 (off), a number of bytes or "
                         "a size like 500MB or 20GB")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index((m.group(2) or "_").upper()))


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def _dir_message(path: Path, err: OSError, verb: str, where: Path) -> str:
    cause = f"writing in {where} failed: [Errno {err.errno}] {err.strerror}" if err.strerror else str(err)
    if err.errno in DISK_FULL:
        return (f"cannot {verb} the run directory {path}: {cause} (the disk is full, or a quota or file-size limit "
                "(ulimit -f) is reached). Free some space, or put the run on another disk: "
                "paths.output_dir=/other/disk/DIR (or VITLAB_ROOT=/other/disk for every run)")
    return (f"cannot {verb} the run directory {path}: {cause}. Choose a writable place: paths.output_dir=DIR "
            "(or VITLAB_ROOT=DIR, under which runs go to outputs/)")


def _probe(folder: Path, nbytes: int) -> None:
    """Write (and fsync: delayed allocation reports a full disk only then) ``nbytes`` in ``folder``."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=".vitlab-probe-")
    try:
        with os.fdopen(fd, "wb") as f:
            chunk = b"\0" * min(nbytes, 1 << 20)
            left = nbytes
            while left > 0:
                f.write(chunk[:left])
                left -= len(chunk)
            f.flush()
            os.fsync(f.fileno())
    finally:
        Path(name).unlink(missing_ok=True)


def check_output_dir(path: Union[str, Path], probe_bytes: int = 1 << 20) -> None:
    """The run directory exists and takes a ``probe_bytes`` write, or can be made. Nothing is created when it does
    not exist yet (the probe goes to a temporary folder in its nearest existing parent), so this can run before
    Hydra decides the directory. Raises :class:`RunDirError`."""
    path = Path(os.path.abspath(path))
    existing = _existing_ancestor(path)
    if not existing.is_dir():
        raise RunDirError(f"cannot create the run directory {path}: {existing} is a file, not a folder. Choose "
                          "another place: paths.output_dir=DIR (or VITLAB_ROOT=DIR, under which runs go to outputs/)")
    verb = "write to" if existing == path else "create"
    try:
        if existing == path:
            _probe(path, probe_bytes)
        else:
            scratch = Path(tempfile.mkdtemp(dir=existing, prefix=".vitlab-probe-"))
            try:
                _probe(scratch, probe_bytes)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    except OSError as e:
        raise RunDirError(_dir_message(path, e, verb, existing)) from e


def checkpoint_bytes(module: torch.nn.Module, optimizer: str = "adamw") -> int:
    """An estimate of one checkpoint's size: the weights and buffers (an EMA copy included: it is a submodule),
    plus the optimizer's per-parameter state (AdamW: 2 copies, SGD with momentum and SAM's saved point: 1)."""
    weights = sum(t.numel() * t.element_size() for t in module.state_dict().values() if torch.is_tensor(t))
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return int(weights + _optimizer_copies(optimizer) * trainable)


def _optimizer_copies(optimizer: str) -> int:
    name = str(optimizer).lower()
    if name.startswith("sam"):
        return 1 + _optimizer_copies(name.partition(":")[2] or "adamw")
    if name.startswith("sgd"):
        return 0 if name.endswith(":0") else 1
    return 2                             # AdamW, Adam, LAMB, ... (or unknown: the common case)


def _optimizer_name(cfg: DictConfig) -> str:
    o = cfg.get("optim") or {}
    name = str(o.get("name", "adamw"))
    if name == "sam":
        return f"sam:{o.get('base', 'adamw')}"
    if name == "sgd":
        return f"sgd:{0 if not o.get('momentum') else 1}"
    return name


def check_free_space(cfg: DictConfig, output_dir: Union[str, Path], module: Optional[torch.nn.Module] = None
                     ) -> None:
    """``fault.min_free_space`` bytes free where checkpoints go (auto: 3 checkpoints' worth: best.ckpt, last.ckpt and
    the temporary file of the next atomic write of last.ckpt, less the checkpoints a resumed run already has there:
    they are overwritten, but at least one checkpoint's worth). Raises :class:`RunDirError`."""
    setting = (cfg.get("fault") or {}).get("min_free_space", "auto")
    where = Path(output_dir) / "checkpoints"
    if setting in (None, "auto"):
        if module is None:
            return
        one = checkpoint_bytes(module, _optimizer_name(cfg))
        have = sum(p.stat().st_size for p in where.glob("*.ckpt") if p.is_file()) if where.is_dir() else 0
        needed, how = 3 * one, f"3 checkpoints of ~{human(one)}: best, last and the next last being written"
        if have:
            needed = max(one, 3 * one - have)
            how += f", less the {human(have)} of checkpoints already in {where}"
    else:
        needed, how = parse_size(setting), f"fault.min_free_space={setting}"
    if needed <= 0:
        return
    free = shutil.disk_usage(_existing_ancestor(where)).free
    if free < needed:
        raise RunDirError(f"not enough free space for the checkpoints in {where}: {human(free)} free, "
                          f"{human(needed)} needed ({how}). Free some space, put the run on another disk "
                          "(paths.output_dir=/other/disk/DIR or VITLAB_ROOT=/other/disk), or turn this check off "
                          "with fault.min_free_space=0")
    log.info("free space for checkpoints: %s (%s needed: %s)", human(free), human(needed), how)


def disk_full_message(exc: BaseException, output_dir: Union[str, Path]) -> Optional[str]:
    """The message for a write that failed on a full disk during training (None for any other error). torch.save
    reports it as a RuntimeError whose context is the OSError, so the whole chain is searched."""
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            break
        e = e.__cause__ or e.__context__
    else:
        return None
    last = Path(output_dir) / "checkpoints" / "last.ckpt"
    state = "there is no checkpoint yet"
    if last.is_file():
        try:
            step = torch.load(last, map_location="cpu", weights_only=False, mmap=True).get("global_step", "?")
            state = f"the last complete checkpoint is {last} (step {step}): a failed write never replaces it"
        except Exception:                # noqa: BLE001 - the message must not fail
            state = f"the last checkpoint is {last}"
    return (f"a write in {output_dir} failed during training: {e} (the disk is full, or a quota or file-size limit "
            f"is reached); {state}. Free some space (or move the run directory to another disk and point "
            "paths.output_dir at it), then resume with ckpt_path=auto and the same paths.output_dir")


def remove_stale_temp_files(ckpt_dir: Union[str, Path]) -> list[Path]:
    """Temporary checkpoint files a killed save left in ``ckpt_dir`` (only the atomic writer's own name pattern for
    ``.ckpt`` targets, :data:`vitlab.io.TEMP_PATTERN`, only in that folder). Call it before the run writes: a live
    save's file looks the same."""
    removed = []
    for p in stale_temp_files(ckpt_dir, ".ckpt"):
        size = p.stat().st_size
        p.unlink(missing_ok=True)
        removed.append(p)
        log.info("removed %s (%s), left by a checkpoint write that was killed", p, human(size))
    return removed
