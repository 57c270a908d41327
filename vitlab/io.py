"""The one atomic writer: every file vitlab writes that someone may read while it is being written (checkpoints,
metrics.json, history.json, curves and pictures, sweep summaries, shard indexes, eval results) goes through here.

A write goes to a temporary file in the target's folder (a unique name from :func:`tempfile.mkstemp`, so two
writers never share one), is flushed and fsync'ed, then renamed over the target (``os.replace``, atomic on POSIX):
a reader sees the old file or the new one, never a partial one, and a crash mid-write leaves the old one whole.
The file gets the permissions ``open(path, "w")`` would give it (``0o666`` less the process umask; mkstemp's own
``0o600`` would hide checkpoints and metrics from the rest of a lab group). A killed write leaves its temporary
file, ``.<name>.<8 characters>.tmp`` (:data:`TEMP_PATTERN`), which the next run removes
(:func:`vitlab.lit.fault.disk.remove_stale_temp_files`).

    atomic_write(path, b"...")                        # bytes
    atomic_write_text(path, "...")                    # text
    atomic_write_json(path, {"val/top1": 0.97})       # JSON, sorted keys
    atomic_torch_save(path, obj)                      # torch.save
    atomic_write_with(path, lambda f: fig.savefig(f, format="png"))   # anything that writes to a binary file

Nothing here imports a model, Lightning or Hydra.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Union

PathLike = Union[str, os.PathLike]

# ".<name>.<mkstemp's 8 random characters>.tmp": what a write killed before its rename leaves next to <name>
TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0o022)              # the only way to read it is to set it: read once, on the first write
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The permissions ``open(path, "w")`` gives a new file in this process: ``0o666`` less the umask."""
    return 0o666 & ~_umask()


def atomic_write_with(path: PathLike, write: Callable[[IO[bytes]], Any], sync: bool = True) -> Path:
    """Write ``path`` through ``write(binary file)``, atomically (see the module docstring); returns the path.

    ``sync``: flush and fsync the data before the rename (default), so that after a power loss the file is the
    old one or the whole new one. Folders are created as needed. The temporary file is removed if ``write``
    raises (the target is untouched)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:                # owns the descriptor from here: closed on any error
            os.fchmod(f.fileno(), file_mode())
            write(f)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write(path: PathLike, data: bytes, sync: bool = True) -> Path:
    """Write ``data`` (bytes) to ``path`` atomically."""
    return atomic_write_with(path, lambda f: f.write(data), sync=sync)


def atomic_write_text(path: PathLike, text: str, sync: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, text.encode("utf-8"), sync=sync)


def atomic_write_json(path: PathLike, obj: Any, indent: int = 2, sort_keys: bool = True, sync: bool = True) -> Path:
    """Write ``obj`` as JSON (with a final newline) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n", sync=sync)


def atomic_torch_save(path: PathLike, obj: Any, sync: bool = True) -> Path:
    """``torch.save(obj)`` to ``path`` atomically: a checkpoint is never seen half-written."""
    import torch

    return atomic_write_with(path, lambda f: torch.save(obj, f), sync=sync)


def stale_temp_files(folder: PathLike, suffix: str = "") -> list[Path]:
    """Temporary files a killed atomic write left in ``folder`` (:data:`TEMP_PATTERN`), for targets ending in
    ``suffix`` (e.g. ``".ckpt"``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = TEMP_PATTERN.match(p.name)
        if m and m.group("name").endswith(suffix) and p.is_file():
            out.append(p)
    return sorted(out)
