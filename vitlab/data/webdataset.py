"""Classification data streamed from WebDataset tar shards (the format ``vitlab-shards`` writes).

A shard directory ``OUT`` holds ``{split}-{k:06d}.tar`` files, each sample a ``__key__`` (the
sample's 9-digit index in its split), one encoded image (``jpg``/``png``/...) and ``cls`` (the
label as decimal text), plus ``info.json`` (metadata, exact per-shard sample counts) and
``classes.json`` (class names).

:class:`WebDatasetSource` finds the shards and metadata; :class:`ShardStream` is the
``IterableDataset`` that reads them. One epoch of a ShardStream, for a given (seed, epoch):

- the shard list is permuted (same on every rank), split by rank (``shards[rank::world]``) and
  then by DataLoader worker (``[worker::num_workers]``): no sample is read twice in an epoch;
- every worker yields a whole number of batches and every rank the same number of batches
  (computed from the per-shard counts; the few leftover samples are dropped and logged), so
  ``len(DataLoader)`` is right and DDP ranks never wait on each other;
- within a worker, samples pass a seeded shuffle buffer (webdataset's), so the order is
  reproducible and a run resumed mid-epoch (:meth:`ShardStream.set_start_batch`) continues the
  same order without replaying what was consumed;
- undecodable images and broken shards are skipped with a warning naming them; the number of
  dropped samples travels in each yielded sample's ``"corrupt"`` field, and a worker that comes
  up short re-reads its shards (a second pass) to keep every rank's batch count.

With ``resampled=True`` (or ``too_few_shards="resample"`` when there are fewer shards than
ranks x workers), shards are drawn with replacement instead, as webdataset's ResampledShards does.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import logging
import math
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from vitlab.data.base import SPLITS, ClassificationSource, DatasetNotFoundError

log = logging.getLogger("vitlab")

TooFewShards = Literal["error", "resample"]
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm")
_WRITER_HINT = ("point data.urls at a folder written by vitlab-shards (or a brace pattern like "
                "DIR/train-{000000..000009}.tar)")


# ----------------------------------------------------------------------------------------------------------------
# URLs, local paths and sample counts
# ----------------------------------------------------------------------------------------------------------------

def local_path(url: str) -> Path | None:
    """The local file for a plain path or ``file://`` URL; None for remote URLs (http://, pipe:, ...)."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and url[1:3] in (":\\", ":/")):   # "C:\..." is local
        return Path(url).expanduser()
    return None


def expand_urls(spec: str | Sequence[str] | None) -> list[str]:
    """Brace patterns (``train-{000000..000009}.tar``), globs and lists -> a flat list of shard URLs.

    Globs are expanded (sorted) for local paths only; a pattern that matches nothing stays as written,
    so :meth:`WebDatasetSource.check` can name it.
    """
    if spec is None:
        return []
    if not isinstance(spec, str):
        return [url for item in spec for url in expand_urls(item)]
    out = []
    for url in braceexpand.braceexpand(spec.strip()):
        path = local_path(url)
        if path is not None and glob.has_magic(str(path)):
            out += sorted(glob.glob(str(path))) or [url]
        else:
            out.append(url)
    return out


_COUNTED: dict[tuple[str, int, int], int] = {}     # (path, mtime_ns, size) -> samples: a shard is scanned once


def count_tar_samples(url: str) -> int:
    """Samples in a shard: distinct keys among its members, from the tar headers only (no image is read)."""
    path = local_path(url)
    stat = path.stat() if path is not None and path.is_file() else None
    cache_key = (str(path), stat.st_mtime_ns, stat.st_size) if stat is not None else None
    if cache_key in _COUNTED:
        return _COUNTED[cache_key]
    keys, count = None, 0
    try:
        with (open(path, "rb") if path is not None else gopen(url)) as fileobj, \
                tarfile.open(fileobj=fileobj, mode="r:*" if path is not None else "r|*") as tar:
            for member in tar:                          # seekable file: headers only, data is skipped
                if not member.isreg():
                    continue
                key, _ = base_plus_ext(member.name)
                if key is not None and key != keys:     # members of one sample are adjacent
                    keys, count = key, count + 1
    except (tarfile.TarError, OSError) as exn:
        log.warning("shard %s is unreadable or truncated (%s); counted the %d samples before the damage", url, exn,
                    count)
    if cache_key is not None:
        _COUNTED[cache_key] = count
    return count


def _int_seed(*parts: int) -> int:
    """A 64-bit seed from non-negative integer parts (seed, epoch, rank, worker, ...)."""
    return int(np.random.SeedSequence([int(p) % 2**32 for p in parts]).generate_state(2, np.uint64)[0])


def _fill(caps: Sequence[float], total: int) -> list[int]:
    """Split ``total`` units over slots as evenly as their capacities allow (water filling); sum == total."""
    quotas, remaining = [0] * len(caps), total
    active = [i for i, c in enumerate(caps) if c > 0]
    while remaining > 0 and active:
        share = max(1, remaining // len(active))
        for i in list(active):
            add = int(min(share, caps[i] - quotas[i], remaining))
            quotas[i] += add
            remaining -= add
            if quotas[i] >= caps[i]:
                active.remove(i)
            if remaining == 0:
                break
    if remaining:
        raise ValueError(f"cannot place {total} units in capacities {list(caps)}")
    return quotas


# ----------------------------------------------------------------------------------------------------------------
# Decoding one sample
# ----------------------------------------------------------------------------------------------------------------

def decode_sample(sample: dict, mode: str) -> tuple[Image.Image, int, int]:
    """Raw webdataset sample (bytes per member) -> (PIL image in ``mode``, label, index). Raises on bad data."""
    ext = next((k for k in sample if not k.startswith("__") and k.rsplit(".", 1)[-1] in IMAGE_EXTS), None)
    if ext is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise ValueError(f"no image member (has {members}; expected one of {', '.join(IMAGE_EXTS)})")
    if "cls" not in sample:
        raise ValueError("no 'cls' member (the label)")
    label = int(sample["cls"].decode("ascii").strip())
    with Image.open(io.BytesIO(sample[ext])) as img:
        image = img.convert(mode)                     # convert() forces the full decode: errors surface here
    name = sample["__key__"].rsplit("/", 1)[-1]
    index = int(name) if name.isdigit() else -1
    return image, label, index


# ----------------------------------------------------------------------------------------------------------------
# The epoch plan: which shards each (rank, worker) reads and how many samples it yields
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EpochPlan:
    """One epoch's assignment. ``quotas[r][w]`` samples come from worker ``w`` of rank ``r``."""

    epoch: int
    batch_size: int
    drop_last: bool
    resampled: bool
    shards: list[list[list[int]]]     # [rank][worker] -> shard ids in read order (empty when resampled)
    quotas: list[list[int]]           # [rank][worker] -> samples yielded (whole batches when drop_last)
    total_samples: int                # samples in all shards, per the counts (-1: unknown, resampled only)

    def worker_batches(self, rank: int) -> list[int]:
        b = self.batch_size
        return [q // b if self.drop_last else math.ceil(q / b) for q in self.quotas[rank]]

    def rank_samples(self, rank: int) -> int:
        return sum(self.quotas[rank])

    @property
    def dropped(self) -> int:
        """Samples not read this epoch (non-resampled): the leftover of whole batches and equal ranks, or a cap."""
        return self.total_samples - sum(map(sum, self.quotas)) if not self.resampled else 0


def resume_position(worker_batches: Sequence[int], k: int) -> tuple[list[int], int]:
    """Batches each worker produced when the DataLoader delivered ``k`` batches, and the worker asked next.

    The in-order DataLoader takes one batch from worker 0, 1, ..., W-1 in turn, skipping exhausted ones.
    """
    n = len(worker_batches)
    produced, last, left = [0] * n, -1, k
    while left > 0:
        active = [w for w in range(n) if produced[w] < worker_batches[w]]
        if not active:
            break
        rounds = min(worker_batches[w] - produced[w] for w in active)
        if left >= rounds * len(active):           # whole rounds until the next worker runs dry
            for w in active:
                produced[w] += rounds
            left -= rounds * len(active)
            last = active[-1]
        else:
            full, part = divmod(left, len(active))
            for i, w in enumerate(active):
                produced[w] += full + (i < part)
            last = active[part - 1] if part else active[-1]
            left = 0
    return produced, (last + 1) % n


# ----------------------------------------------------------------------------------------------------------------
# The stream
# ----------------------------------------------------------------------------------------------------------------

class ShardStream(IterableDataset):
    """Samples ``{"image", "label", "index", "corrupt"}`` from tar shards, exact per rank and worker.

    Call :meth:`configure` (batch size, world size, rank, DataLoader workers), :meth:`set_epoch` and
    optionally :meth:`set_start_batch` before each epoch's DataLoader iterator is created. The
    DataLoader must use the same ``batch_size``, ``num_workers`` and ``drop_last``.
    """

    def __init__(self, shards: Sequence[tuple[str, int | None]], transform: Callable | None = None,
                 shuffle: bool = True, shuffle_buffer: int = 2000, seed: int = 0, resampled: bool = False,
                 epoch_samples: int | None = None, epoch_steps: int | None = None,
                 too_few_shards: TooFewShards = "error", mode: str = "RGB", split: str = "train"):
        if not shards:
            raise DatasetNotFoundError(f"no shards for the {split} split; {_WRITER_HINT}")
        if too_few_shards not in ("error", "resample"):
            raise ValueError(f"too_few_shards={too_few_shards!r}; choose error or resample")
        if epoch_samples is not None and epoch_steps is not None:
            raise ValueError("set data.source.epoch_samples or data.source.epoch_steps, not both")
        self.urls = [url for url, _ in shards]
        self.counts: list[int | None] = [None if n is None else int(n) for _, n in shards]
        self.transform, self.shuffle, self.shuffle_buffer, self.seed = transform, shuffle, shuffle_buffer, seed
        self.resampled, self.too_few_shards = resampled, too_few_shards
        self.epoch_samples, self.epoch_steps = epoch_samples, epoch_steps
        self.mode, self.split = mode, split
        self.batch_size, self.world_size, self.rank, self.num_workers, self.drop_last = 1, 1, 0, 0, True
        self.epoch, self.start_batch = 0, 0
        self._fallback = False            # too_few_shards=resample kicked in
        self._warned_fallback = False
        self._plan: EpochPlan | None = None
        self._plan_key: tuple = ()

    # -- set-up, called by the data module before each epoch ---------------------------------------------------

    def configure(self, batch_size: int, world_size: int = 1, rank: int = 0, num_workers: int = 0,
                  drop_last: bool = True) -> ShardStream:
        """Tell the stream how it is consumed; raises at once when the shards cannot be spread that way."""
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0:
            raise ValueError(f"bad configure(batch_size={batch_size}, world_size={world_size}, rank={rank}, "
                             f"num_workers={num_workers})")
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.num_workers, self.drop_last = num_workers, drop_last
        self._plan, self._fallback = None, False
        slots = world_size * self.workers
        if not self.resampled and drop_last and len(self.urls) < slots:
            msg = (f"{len(self.urls)} shards for {world_size} ranks x {self.workers} workers: write more shards "
                   "(vitlab-shards shard_size=...), lower data.num_workers, or set "
                   "data.source.too_few_shards=resample")
            if self.too_few_shards != "resample":
                raise ValueError(msg)
            if not self._warned_fallback:                 # configure() runs every epoch: say it once
                log.warning("%s; too_few_shards=resample: drawing shards with replacement instead",
                            msg.split(":")[0])
                self._warned_fallback = True
            self._fallback = True
        elif not self.is_resampled and len(self.urls) < slots:
            log.info("%s: %d shards for %d ranks x %d workers; some workers read nothing", self.split,
                     len(self.urls), world_size, self.workers)
        self.plan()                        # count samples / raise on an empty epoch now, not inside a worker
        return self

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its shard order and shuffle); a different epoch clears :meth:`set_start_batch`."""
        if epoch != self.epoch:
            self.start_batch = 0
        self.epoch = epoch

    def set_start_batch(self, k: int) -> None:
        """Resume mid-epoch: this rank already consumed ``k`` batches of the current epoch."""
        if k < 0:
            raise ValueError(f"start batch must be >= 0, got {k}")
        self.start_batch = k

    @property
    def workers(self) -> int:
        return max(1, self.num_workers)

    @property
    def is_resampled(self) -> bool:
        return self.resampled or self._fallback

    # -- the plan --------------------------------------------------------------------------------------------

    def _ensure_counts(self) -> list[int]:
        missing = [i for i, n in enumerate(self.counts) if n is None]
        if missing:
            log.info("%s: counting the samples of %d shards without info.json counts (tar headers only)...",
                     self.split, len(missing))
            for i in missing:
                self.counts[i] = count_tar_samples(self.urls[i])
            log.info("%s: %d samples in %d shards", self.split, sum(self.counts), len(self.counts))
        return self.counts  # type: ignore[return-value]

    def _epoch_cap(self) -> int | None:
        """Per-rank samples asked for by epoch_samples / epoch_steps (None: no cap)."""
        if self.epoch_steps is not None:
            return self.epoch_steps * self.batch_size
        if self.epoch_samples is not None:
            per_rank = self.epoch_samples // self.world_size
            return per_rank - per_rank % self.batch_size if self.drop_last else per_rank
        return None

    def plan(self) -> EpochPlan:
        """The current epoch's plan (cached); identical on every rank and worker."""
        key = (self.epoch, self.seed, self.shuffle, self.is_resampled)
        if self._plan is not None and self._plan_key == key:
            return self._plan
        b, world, nw = self.batch_size, self.world_size, self.workers
        cap = self._epoch_cap()
        if self.is_resampled:
            total = -1 if cap is not None else sum(self._ensure_counts())
            per_rank = cap if cap is not None else total // world
            unit = b if self.drop_last else 1
            quotas = [[q * unit for q in _fill([math.inf] * nw, per_rank // unit)] for _ in range(world)]
            plan = EpochPlan(self.epoch, b, self.drop_last, True, [[[] for _ in range(nw)] for _ in range(world)],
                             quotas, total)
        else:
            counts = self._ensure_counts()
            order = list(range(len(self.urls)))
            if self.shuffle:
                order = np.random.default_rng([self.seed % 2**32, self.epoch]).permutation(len(order)).tolist()
            shards = [[order[r::world][w::nw] for w in range(nw)] for r in range(world)]
            sizes = [[sum(counts[s] for s in ws) for ws in rs] for rs in shards]
            if self.drop_last:                       # whole batches per worker, the same number on every rank
                caps = [[n // b for n in rs] for rs in sizes]
                steps = min(sum(rs) for rs in caps)
                if cap is not None:
                    steps = min(steps, cap // b)
                quotas = [[q * b for q in _fill(caps[r], steps)] for r in range(world)]
            else:                                    # evaluation: every sample once; ranks may differ
                quotas = [_fill(sizes[r], min(sum(sizes[r]), cap if cap is not None else sum(sizes[r])))
                          for r in range(world)]
            plan = EpochPlan(self.epoch, b, self.drop_last, False, shards, quotas, sum(counts))
            if self.drop_last and sum(plan.quotas[0]) == 0:
                raise ValueError(f"{self.split}: no worker has a whole batch of {b} samples ({sum(counts)} samples "
                                 f"in {len(counts)} shards for {world} ranks x {nw} workers); lower the batch "
                                 "size or data.num_workers, or write more samples")
            if get_worker_info() is None and self.rank == 0 and plan.dropped:
                log.info("%s epoch %d: %d of %d samples left over (whole batches per worker, equal batches per "
                         "rank%s); they are not read this epoch", self.split, self.epoch, plan.dropped,
                         plan.total_samples, ", epoch cap" if cap is not None else "")
        self._plan, self._plan_key = plan, key
        return plan

    def __len__(self) -> int:
        """Samples this rank yields per epoch (a multiple of batch_size when drop_last): len(DataLoader) is right."""
        return self.plan().rank_samples(self.rank)

    @property
    def num_batches(self) -> int:
        """Batches this rank yields per epoch (with drop_last=False each worker's last batch may be partial)."""
        return sum(self.plan().worker_batches(self.rank))

    # -- iteration -------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        plan = self.plan()
        batches = plan.worker_batches(self.rank)
        produced, offset = resume_position(batches, self.start_batch)
        info = get_worker_info()
        nw = self.workers
        if info is not None:
            if info.num_workers != nw:
                raise ValueError(f"ShardStream was configured for {nw} workers but the DataLoader runs "
                                 f"{info.num_workers}: call configure(num_workers={info.num_workers}) first")
            # A resumed DataLoader starts asking worker 0: it plays the worker that was next in line.
            yield from self._worker_stream(plan, (info.id + offset) % nw, produced)
            return
        # Main process: interleave the workers batch by batch, as the in-order DataLoader would.
        streams = [self._worker_stream(plan, (p + offset) % nw, produced) for p in range(nw)]
        b = self.batch_size
        while streams:
            for s in list(streams):
                chunk = list(itertools.islice(s, b))
                if not chunk:
                    streams.remove(s)
                yield from chunk

    def _worker_stream(self, plan: EpochPlan, worker: int, produced: Sequence[int]) -> Iterator[dict]:
        """The samples one (rank, worker) yields, after skipping the ``produced`` batches (undecoded)."""
        quota = plan.quotas[self.rank][worker]
        skip = min(produced[worker] * self.batch_size, quota)
        if quota - skip <= 0:
            return
        rng = random.Random(_int_seed(self.seed, self.epoch, self.rank, worker))
        warned: set[tuple[str, str]] = set()
        left, dropped = quota - skip, 0
        for pass_idx in itertools.count():
            raw = self._one_pass(plan, worker, pass_idx)
            if self.shuffle and self.shuffle_buffer > 1:   # per pass: a second pass never mixes into the first
                raw = wds.filters.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(raw)
            seen = 0
            for sample in raw:
                seen += 1
                if skip:                                   # resume: drop consumed samples before decoding
                    skip -= 1
                    continue
                try:
                    image, label, index = decode_sample(sample, self.mode)
                except Exception as exn:  # noqa: BLE001  (any decode failure is a corrupt sample)
                    dropped += 1
                    where = (sample.get("__url__", "?"), sample.get("__key__", "?"))
                    if where not in warned:
                        warned.add(where)
                        log.warning("dropped corrupt sample %r in shard %s: %s: %s", where[1], where[0],
                                    type(exn).__name__, exn)
                    continue
                if self.transform is not None:
                    image = self.transform(image)
                yield {"image": image, "label": torch.tensor(label, dtype=torch.long), "index": index,
                       "corrupt": dropped}
                dropped, left = 0, left - 1
                if left == 0:
                    return
            if seen == 0:
                raise RuntimeError(f"{self.split}: rank {self.rank} worker {worker} read no sample in a whole pass "
                                   f"over its shards ({self._pass_urls(plan, worker)[:3]}...): they are all "
                                   "unreadable; check them or rewrite them with vitlab-shards")
            log.warning("%s: rank %d worker %d is %d samples short after pass %d (corrupt data); reading its "
                        "shards again to keep every rank's batch count", self.split, self.rank, worker, left,
                        pass_idx + 1)

    def _pass_urls(self, plan: EpochPlan, worker: int, pass_idx: int = 0) -> list[str]:
        if not plan.resampled:
            return [self.urls[s] for s in plan.shards[self.rank][worker]]
        rng = np.random.default_rng([self.seed % 2**32, self.epoch, self.rank, worker, pass_idx, 1])
        return [self.urls[i] for i in rng.integers(0, len(self.urls), size=len(self.urls))]

    def _one_pass(self, plan: EpochPlan, worker: int, pass_idx: int) -> Iterator[dict]:
        """Raw samples (bytes per member) of one pass over this worker's shards."""
        for url in self._pass_urls(plan, worker, pass_idx):
            yield from self._read_shard(url)

    def _read_shard(self, url: str) -> Iterator[dict]:
        """Raw samples of one tar; a broken or truncated shard is warned about and the stream moves on."""
        try:
            stream = gopen(url)
        except Exception as exn:  # noqa: BLE001
            log.warning("cannot open shard %s (%s: %s); skipping it", url, type(exn).__name__, exn)
            return
        n = 0
        try:
            files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
            for sample in group_by_keys(files):
                n += 1
                yield sample
        except Exception as exn:  # noqa: BLE001  (tarfile.ReadError, truncated members, duplicate names ...)
            log.warning("shard %s is corrupt or truncated after %d samples (%s: %s); skipping the rest of it", url,
                        n, type(exn).__name__, exn)
            return
        finally:
            stream.close()
        expected = self.counts[self.urls.index(url)] if url in self.urls else None
        if expected is not None and n < expected:
            log.warning("shard %s ended after %d of its %d samples (truncated?)", url, n, expected)


# ----------------------------------------------------------------------------------------------------------------
# The source
# ----------------------------------------------------------------------------------------------------------------

class WebDatasetSource(ClassificationSource):
    """Tar shards as a data source: ``urls`` is a shard folder, a brace pattern, a glob or a list.

    With a folder, the splits are its ``train-*.tar``, ``val-*.tar`` and ``test-*.tar``; with a
    pattern or list (the train shards), val/test default to the ``val-*``/``test-*`` shards beside
    them. ``info.json`` / ``classes.json`` beside the shards give the metadata; explicit arguments win.
    """

    def __init__(self, urls: str | Sequence[str], val_urls: str | Sequence[str] | None = None,
                 test_urls: str | Sequence[str] | None = None, shuffle_buffer: int = 2000, resampled: bool = False,
                 epoch_samples: int | None = None, epoch_steps: int | None = None,
                 too_few_shards: TooFewShards = "error", num_classes: int | None = None,
                 in_chans: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, class_names: Sequence[str] | None = None,
                 name: str = "webdataset"):
        if too_few_shards not in ("error", "resample"):
            raise ValueError(f"data.source.too_few_shards={too_few_shards!r}; choose error or resample")
        self.urls, self.val_urls, self.test_urls = urls, val_urls, test_urls
        self.shuffle_buffer, self.resampled, self.too_few_shards = shuffle_buffer, resampled, too_few_shards
        self.epoch_samples, self.epoch_steps = epoch_samples, epoch_steps
        self.name = name
        self._args = {"num_classes": num_classes, "in_chans": in_chans, "mean": mean, "std": std,
                      "class_names": class_names}
        self._resolved: dict[str, list[str]] | None = None
        self._meta: dict | None = None

    # -- where the shards are --------------------------------------------------------------------------------

    def _split_urls(self) -> dict[str, list[str]]:
        if self._resolved is not None:
            return self._resolved
        spec = self.urls
        root = local_path(spec) if isinstance(spec, str) else None
        out: dict[str, list[str]] = {}
        if root is not None and root.is_dir():
            for split in SPLITS:
                out[split] = sorted(str(p) for p in root.glob(f"{split}-*.tar"))
            if not any(out.values()) and (plain := sorted(str(p) for p in root.glob("*.tar"))):
                log.info("%s has no train-/val-/test- shards; using its %d .tar files as the train split", root,
                         len(plain))
                out["train"] = plain
        else:
            out["train"] = expand_urls(spec)
            folder = self.folder(out["train"])
            for split in ("val", "test"):
                out[split] = sorted(str(p) for p in folder.glob(f"{split}-*.tar")) if folder is not None else []
        for split, explicit in (("val", self.val_urls), ("test", self.test_urls)):
            if explicit is not None:
                out[split] = expand_urls(explicit)
        self._resolved = out
        return out

    @staticmethod
    def folder(urls: Sequence[str]) -> Path | None:
        """The local folder of the first shard (where info.json / classes.json live), if local."""
        path = local_path(urls[0]) if urls else None
        return path.parent if path is not None else None

    def _meta_folder(self) -> Path | None:
        root = local_path(self.urls) if isinstance(self.urls, str) else None
        if root is not None and root.is_dir():
            return root
        resolved = self._split_urls()
        return next((self.folder(resolved[s]) for s in SPLITS if resolved.get(s)), None)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(s for s in SPLITS if self._split_urls().get(s))

    def check(self) -> None:
        resolved = self._split_urls()
        if not any(resolved.values()):
            raise DatasetNotFoundError(f"no shards match {self.urls!r}; {_WRITER_HINT}")
        for split, urls in resolved.items():
            missing = [u for u in urls if (p := local_path(u)) is not None and not p.is_file()]
            if missing:
                raise DatasetNotFoundError(f"{len(missing)} of the {len(urls)} {split} shards do not exist "
                                           f"(e.g. {missing[0]}); {_WRITER_HINT}")
        self.metadata()            # raises when num_classes is unknown

    # -- metadata ----------------------------------------------------------------------------------------------

    def metadata(self) -> dict:
        """info.json + classes.json beside the shards, overridden by the explicit arguments."""
        if self._meta is not None:
            return self._meta
        folder, info, classes = self._meta_folder(), {}, None
        if folder is not None and (folder / "info.json").is_file():
            info = json.loads((folder / "info.json").read_text())
        if folder is not None and (folder / "classes.json").is_file():
            classes = json.loads((folder / "classes.json").read_text())
        a = self._args
        class_names = a["class_names"] or classes or info.get("class_names")
        num_classes = a["num_classes"] or info.get("num_classes") or (len(class_names) if class_names else None)
        if num_classes is None:
            raise ValueError(f"the number of classes of the shards at {self.urls!r} is unknown: no info.json or "
                             "classes.json beside them. Set data.source.num_classes=N, or write the shards with "
                             "vitlab-shards")
        self._meta = {
            "num_classes": int(num_classes),
            "class_names": list(class_names) if class_names else [str(i) for i in range(num_classes)],
            "in_chans": int(a["in_chans"] or info.get("in_chans") or 3),
            "mean": tuple(a["mean"] or info.get("mean") or ClassificationSource.mean),
            "std": tuple(a["std"] or info.get("std") or ClassificationSource.std),
            "splits": info.get("splits", {}),
        }
        return self._meta

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return self.metadata()["num_classes"]

    @property
    def class_names(self) -> list[str]:  # type: ignore[override]
        return self.metadata()["class_names"]

    @property
    def in_chans(self) -> int:  # type: ignore[override]
        return self.metadata()["in_chans"]

    @property
    def mean(self) -> tuple[float, ...]:  # type: ignore[override]
        return self.metadata()["mean"]

    @property
    def std(self) -> tuple[float, ...]:  # type: ignore[override]
        return self.metadata()["std"]

    def shard_list(self, split: str) -> list[tuple[str, int | None]]:
        """(url, sample count) of the split's shards; the count is None when info.json does not list it."""
        known: dict[str, int] = {}
        for entry in self.metadata()["splits"].values():
            for shard in entry.get("shards", []):
                known[shard["name"]] = int(shard["num_samples"])
        return [(url, known.get(url.rstrip("/").rsplit("/", 1)[-1])) for url in self._split_urls().get(split, [])]

    # -- datasets --------------------------------------------------------------------------------------------

    def dataset(self, split: str, transform: Callable | None = None, seed: int = 0) -> ShardStream:
        """The split's :class:`ShardStream` (train: shuffled, resampled/epoch length per the source's settings).

        ``transform`` maps each PIL image (None: yield PIL); ``seed`` fixes the shard and sample order.
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        if not self.has_split(split):
            raise DatasetNotFoundError(self.missing_split_message(split))
        train = split == "train"
        return ShardStream(self.shard_list(split), transform=transform, shuffle=train,
                           shuffle_buffer=self.shuffle_buffer, seed=seed, resampled=train and self.resampled,
                           epoch_samples=self.epoch_samples if train else None,
                           epoch_steps=self.epoch_steps if train else None,
                           too_few_shards=self.too_few_shards if train else "error",
                           mode="L" if self.in_chans == 1 else "RGB", split=split)

    def missing_split_message(self, split: str) -> str:
        where = "data.urls" if split == "train" else f"data.source.{split}_urls"
        return (f"no {split} shards for {self.urls!r} (found: {', '.join(self.splits) or 'none'}); write them with "
                f"vitlab-shards, set {where}, or use another split")

    def __repr__(self) -> str:
        return f"WebDatasetSource(urls={self.urls!r})"
