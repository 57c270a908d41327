"""Write any vitlab classification source as WebDataset shards (the ``vitlab-shards/1`` format).

A shard directory ``OUT`` holds, for each written split::

    OUT/{split}-000000.tar, OUT/{split}-000001.tar, ...   # samples in dataset index order (not shuffled)
    OUT/classes.json                                     # class names in label order
    OUT/info.json                                        # written last: exact per-shard sample counts

Each sample in a tar is ``{index:09d}.{ext}`` (the image) plus ``{index:09d}.cls`` (the label as ASCII
decimal). File-backed datasets keep their ORIGINAL encoded bytes (``jpg``/``png``/``webp``...); in-memory
arrays and tensors (CIFAR, digits) are stored as lossless PNG of their uint8 pixels. The reader shuffles.

    from vitlab.data import CIFAR
    from vitlab.data.shards import write_shards
    write_shards(CIFAR(root="data/cifar10"), "data/cifar10-shards", max_count=10000)
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vitlab.data.base import SPLITS, ClassificationSource, DatasetNotFoundError, file_of, is_folder, locate
from vitlab.data.base import CorruptDataError as BaseCorruptDataError
from vitlab.io import atomic_write_json

log = logging.getLogger("vitlab")

FORMAT = "vitlab-shards/1"
MAX_CORRUPT_FRACTION = 0.1          # more unreadable files than this in a split is an error, not a skip
_PARTIAL = ".partial"               # suffix of shards being written: never matches the reader's "*.tar"


class CorruptDataError(BaseCorruptDataError, ValueError):
    """Too many images of a split failed to decode; the message names some of them."""


def shard_name(split: str, k: int) -> str:
    """The file name of shard ``k`` of ``split``: ``train-000000.tar``."""
    return f"{split}-{k:06d}.tar"


def sample_key(index: int) -> str:
    """The ``__key__`` of the sample at ``index`` of its split's dataset."""
    return f"{index:09d}"


# --------------------------------------------------------------------------- reading one sample

def reads_encoded(dataset: Dataset) -> bool:
    """Whether items come from encoded images (files or stored bytes) that can be broken, not from arrays."""
    base, _ = locate(dataset, 0)
    return callable(getattr(base, "path_of", None)) or callable(getattr(base, "bytes_of", None)) or is_folder(base)


def label_of(dataset: Dataset, i: int) -> int | None:
    """The label of item ``i`` without loading its image (``label_of(i)`` or ``.samples``), else None."""
    base, j = locate(dataset, i)
    if callable(getattr(base, "label_of", None)):
        return int(base.label_of(j))
    if is_folder(base):
        target = base.samples[j][1]
        return int(base.target_transform(target) if base.target_transform is not None else target)
    return None


def _format_ext(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as im:
        return (im.format or "").lower()


def _ext_of(path: str | None, data: bytes) -> str:
    """The lower-cased file extension (``jpeg`` -> ``jpg``); from the image's own format when there is no name."""
    ext = Path(path).suffix.lower().lstrip(".") if path else ""
    ext = ext or _format_ext(data)
    if not ext:
        raise ValueError(f"cannot tell the image format of {path or 'stored image bytes'}: give files an extension")
    return "jpg" if ext == "jpeg" else ext


def to_pil(image: Any) -> Image.Image:
    """A PIL image from a PIL image, a uint8 array (H, W[, C]) or a tensor (C, H, W) (uint8, or float in [0, 1])."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.is_floating_point():
            lo, hi = float(t.min()), float(t.max())
            if lo < -1e-6 or hi > 1 + 1e-6:
                raise ValueError(f"a float image tensor must lie in [0, 1] to be stored as PNG, got [{lo:.3g}, "
                                 f"{hi:.3g}]: give the source's un-normalised images (no Normalize transform)")
            t = (t.clamp(0, 1) * 255).round().to(torch.uint8)        # [0, 1] -> 0..255, nearest level
        if t.dtype != torch.uint8:
            raise ValueError(f"cannot store an image tensor of dtype {t.dtype} as PNG; use uint8 or float in [0, 1]")
        if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
            raise ValueError(f"an image tensor must be (C, H, W) with C in 1, 3, 4; got {tuple(t.shape)}")
        image = t.permute(1, 2, 0).numpy()                           # (C, H, W) -> (H, W, C)
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"cannot store an image array of dtype {arr.dtype} as PNG; use uint8")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]                                           # (H, W, 1) -> (H, W): mode L
    return Image.fromarray(arr)


def encode_png(image: Any) -> bytes:
    """Lossless PNG bytes of an in-memory image (see :func:`to_pil`)."""
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return buf.getvalue()


def raw_sample(dataset: Dataset, i: int) -> tuple[bytes, str, int, str | None]:
    """``(encoded bytes, extension, label, path or None)`` of item ``i``.

    In order of preference: the item's file, read as is (``path_of``, torchvision folders, through
    ``Subset``s); the encoded bytes a dataset stores (``bytes_of(i)``, e.g. Hugging Face rows); else the
    decoded image from ``dataset[i]``, encoded as lossless PNG. The label comes from ``label_of(i)`` or
    ``.samples`` when offered, so a file is not decoded just for its label.
    """
    path = file_of(dataset, i)
    base, j = locate(dataset, i)
    if path is not None:
        data = Path(path).read_bytes()
    else:
        data = base.bytes_of(j) if callable(getattr(base, "bytes_of", None)) else None
    label = label_of(dataset, i)
    if data is None:                                  # in memory (or undecodable without the dataset): PNG
        image, label = dataset[i]
        return encode_png(image), "png", int(label), None
    if label is None:
        label = dataset[i][1]
    return data, _ext_of(path, data), int(label), path


def decode_error(data: bytes) -> str | None:
    """None when ``data`` decodes as an image, else why not (a full decode: truncated files fail too)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as e:  # noqa: BLE001                   # UnidentifiedImageError, OSError, SyntaxError, ...
        return f"{type(e).__name__}: {e}"
    return None


# --------------------------------------------------------------------------- writing

def _prepare_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir {out} is a file; give a folder for the shards")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"*.tar{_PARTIAL}"):              # left by an interrupted run: never complete
        log.info("removing %s, left by an interrupted run", stale.name)
        stale.unlink()
    old = sorted(out.glob("*.tar")) + [p for p in (out / "info.json", out / "classes.json") if p.exists()]
    if not old:
        return
    if not overwrite:
        names = ", ".join(p.name for p in old[:3]) + (", ..." if len(old) > 3 else "")
        raise FileExistsError(f"{out} already holds shards ({len(old)} files: {names}). Pass overwrite=true "
                              "(write_shards(..., overwrite=True)) to replace them, or choose another output_dir.")
    log.info("overwrite: removing %d old shard files from %s", len(old), out)
    (out / "info.json").unlink(missing_ok=True)              # first, so no info.json ever describes missing shards
    for p in old:
        p.unlink(missing_ok=True)


def _write_split(dataset: Dataset, split: str, out: Path, num_classes: int, max_count: int, max_size: float,
                 verify: bool, progress: bool, partials: list[Path]) -> dict:
    """Write one split as ``{split}-%06d.tar.partial`` files (appended to ``partials``); return its info."""
    import webdataset as wds
    from tqdm.auto import tqdm

    n = len(dataset)
    shards: list[dict] = []
    bad: list[str] = []
    written = 0
    # ShardWriter formats the pattern with %: escape any % in the folder name
    pattern = os.path.join(str(out).replace("%", "%%"), f"{split}-%06d.tar{_PARTIAL}")

    def finished(fname: str) -> None:                         # called by ShardWriter as each shard closes
        shards.append({"name": Path(fname).name[:-len(_PARTIAL)], "num_samples": writer.count})

    tolerant = reads_encoded(dataset)
    start = time.perf_counter()
    # mtime fixed: the same data gives byte-identical shards
    writer = wds.ShardWriter(pattern, maxcount=max_count, maxsize=max_size, post=finished, verbose=0,
                             encoder=False, mtime=0.0, user="vitlab", group="vitlab")
    partials.append(Path(writer.fname))
    bar = tqdm(total=n, desc=f"{split:>5}", unit="img", disable=not progress, mininterval=0.5, smoothing=0.1)
    try:
        for i in range(n):
            bar.update(1)
            if tolerant:                                      # files / stored bytes: broken ones are skipped
                try:
                    data, ext, label, path = raw_sample(dataset, i)
                    why = decode_error(data) if verify else None
                except Exception as e:  # noqa: BLE001         # unreadable file, a label lookup that decodes it
                    path, why = file_of(dataset, i), f"{type(e).__name__}: {e}"
                if why is not None:
                    name = path or f"item {i} of the {split} split"
                    bad.append(name)
                    log.warning("skipping unreadable image %s (%s)", name, why)
                    if len(bad) > MAX_CORRUPT_FRACTION * n:
                        raise CorruptDataError(_corrupt_message(split, bad, n))
                    continue
            else:                                             # arrays in memory: an error here is a real bug
                data, ext, label, _ = raw_sample(dataset, i)
            if not 0 <= label < num_classes:
                raise ValueError(f"sample {i} of {split} has label {label}, outside 0..{num_classes - 1}: "
                                 "the source's labels and class_names disagree")
            writer.write({"__key__": sample_key(i), ext: data, "cls": str(label).encode("ascii")})
            written += 1
            if Path(writer.fname) != partials[-1]:
                partials.append(Path(writer.fname))
    finally:
        bar.close()
        writer.close()
    elapsed = max(time.perf_counter() - start, 1e-9)
    size_mb = sum(p.stat().st_size for p in out.glob(f"{split}-*.tar{_PARTIAL}")) / 1e6
    log.info("%s: %d images, %d shards, %.1f MB, %.0f img/s%s", split, written, len(shards), size_mb,
             written / elapsed, f" ({len(bad)} unreadable skipped)" if bad else "")
    return {"num_samples": written, "num_corrupt_skipped": len(bad), "shards": shards}


def _corrupt_message(split: str, bad: list[str], n: int) -> str:
    return (f"more than {MAX_CORRUPT_FRACTION:.0%} of the {n} {split} images could not be read or decoded "
            f"({len(bad)} so far), e.g. {', '.join(bad[:5])}. Fix or remove those files (or check that "
            "data.root points at the right folder) and run again.")


def write_shards(source: ClassificationSource, output_dir: str | os.PathLike, splits: Iterable[str] = SPLITS,
                 max_count: int = 10000, max_size: float = 3e9, verify: bool = True, overwrite: bool = False,
                 progress: bool = True) -> dict:
    """Write ``source``'s splits as shards into ``output_dir``; return the info dict (also ``info.json``).

    Args:
        source: any vitlab classification source (``check()`` it first for a clear missing-data message).
        output_dir: folder for ``{split}-{k:06d}.tar``, ``classes.json`` and ``info.json``.
        splits: which splits to write; those the source lacks are skipped with a log line.
        max_count: at most this many samples per shard.
        max_size: start a new shard once a shard holds this many bytes of payload.
        verify: fully decode each file-backed image; undecodable ones are skipped, counted and warned
            about by name (more than 10 % of a split is an error). Files that cannot be read at all
            are skipped the same way with ``verify=False``, which only saves the decoding time.
        overwrite: replace the shards already in ``output_dir`` (otherwise that is an error).
        progress: show a tqdm bar per split.
    """
    if source.label_kind != "class":
        raise ValueError(f"vitlab-shards writes one class label per image (a .cls member); {source.name} is "
                         f"{source.task} data ({source.label_kind} labels): train from its files directly")
    splits = list(splits)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; choose from {', '.join(SPLITS)}")
    if max_count < 1 or max_size <= 0:
        raise ValueError(f"max_count ({max_count}) and max_size ({max_size}) must be positive")
    present = [s for s in splits if source.has_split(s)]
    for s in splits:
        if s not in present:
            log.info("skipping split %r: %s has no such split (it has: %s)", s, source.name,
                     ", ".join(source.splits))
    if not present:
        raise DatasetNotFoundError(f"{source.name} has none of the requested splits ({', '.join(splits)}); "
                                   f"it has: {', '.join(source.splits)}. Ask for those, e.g. splits=[train,val].")
    out = Path(output_dir).expanduser()
    _prepare_output_dir(out, overwrite)
    class_names = [str(c) for c in source.class_names]
    if len(class_names) != source.num_classes:
        raise ValueError(f"{source.name} lists {len(class_names)} class names for {source.num_classes} classes")

    info: dict[str, Any] = {"format": FORMAT, "source": source.name, "num_classes": int(source.num_classes),
                            "in_chans": int(source.in_chans), "mean": [float(m) for m in source.mean],
                            "std": [float(s) for s in source.std],
                            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "splits": {}}
    partials: list[Path] = []
    try:
        for split in present:
            dataset = source.dataset(split)
            if len(dataset) == 0:
                log.warning("skipping split %r: it is empty", split)
                continue
            info["splits"][split] = _write_split(dataset, split, out, source.num_classes, max_count, max_size,
                                                 verify, progress, partials)
        if not info["splits"]:
            raise DatasetNotFoundError(f"every requested split of {source.name} is empty; nothing was written")
        for p in partials:                                    # all splits done: publish the shards
            os.replace(p, p.with_name(p.name[:-len(_PARTIAL)]))
        atomic_write_json(out / "classes.json", class_names, sort_keys=False)
        atomic_write_json(out / "info.json", info, sort_keys=False)           # last: its presence means the set is complete
    except BaseException:
        for p in partials:
            p.unlink(missing_ok=True)
        raise
    return info
