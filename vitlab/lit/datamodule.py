"""A LightningDataModule over any vitlab data source; batches are dicts.

Three kinds of training data flow through it, chosen by the source and the config:

- map-style datasets (CIFAR, folders, file lists, ...): per-image transforms in
  the loader workers, a seeded ``DistributedSampler`` (or DeiT's repeated-
  augmentation sampler when ``data.repeated_aug`` > 1);
- WebDataset shards (:class:`vitlab.data.webdataset.ShardStream`): split by
  rank and worker inside the stream, an equal number of batches on every rank;
- in-memory uint8 tensors with ``data.batched_augment=true``: whole batches
  fetched with one index and augmented on the training device.

Mixup / CutMix run on the training device after the transfer, for every kind.
The training loader is *resumable*: checkpoints hold its place in the epoch,
so resuming from a mid-epoch checkpoint continues the same epoch order and
never replays its start.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections import Counter
from typing import Any, Callable, Iterator, Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, Sampler

from vitlab.data import DataSource, build_mixup
from vitlab.data.base import CorruptDataError, DataConfigError
from vitlab.data.webdataset import ShardStream

log = logging.getLogger("vitlab")


class _SkippingSampler(Sampler):
    """Wraps a sampler: optionally offsets its epoch (to fold in a seed) and skips the first ``skip`` indices."""

    def __init__(self, base: Sampler, epoch_offset: int = 0):
        self.base, self.epoch_offset, self.skip = base, epoch_offset, 0

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch + self.epoch_offset)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return len(self.base)


class StreamLoader(DataLoader):
    """A DataLoader whose length is the exact number of batches it yields, for shard streams too.

    PyTorch takes ``ceil(len(dataset) / batch_size)`` for an iterable dataset, but each loader worker
    batches its own shards, so with ``drop_last=False`` (evaluation) the workers' partial last batches
    make more batches than that, and Lightning, which stops at ``len(loader)``, would skip samples.
    """

    def __len__(self) -> int:
        if isinstance(self.dataset, ShardStream):
            return int(self.dataset.num_batches)
        return super().__len__()


class ResumableLoader(StreamLoader):
    """A DataLoader that knows its position in the epoch.

    The data module stores :meth:`state_dict` in every checkpoint and calls
    :meth:`load_state_dict` before the first iterator of a resumed run. The
    epoch is read from ``epoch_fn`` when an iterator *starts yielding* (not
    when it is created), so the order is always the current epoch's, even on
    the iterator Lightning creates before it calls ``set_epoch``. A resumed
    epoch skips the batches already consumed: for map-style data the sampler
    skips their indices (nothing is loaded); for shards, the stream skips the
    samples before decoding them.
    """

    def __init__(self, *args: Any, epoch_fn: Callable[[], int], seed: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.epoch_fn, self.seed = epoch_fn, seed
        self._epoch, self._consumed = 0, 0
        self._resume: Optional[tuple[int, int]] = None

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "consumed_batches": self._consumed}

    def load_state_dict(self, state: dict) -> None:
        self._resume = (int(state["epoch"]), int(state["consumed_batches"]))

    def _prepare(self, epoch: int, start: int) -> None:
        if isinstance(self.dataset, IterableDataset):
            self.dataset.set_epoch(epoch)
            self.dataset.set_start_batch(start)
        else:
            if isinstance(self.sampler, (_SkippingSampler, DistributedSampler)):
                self.sampler.set_epoch(epoch)
            if isinstance(self.sampler, _SkippingSampler):
                self.sampler.skip = start * int(self.batch_size or 1)

    def __iter__(self) -> Iterator[Any]:
        return self._generate()

    def _generate(self) -> Iterator[Any]:
        epoch = int(self.epoch_fn())
        start = 0
        if self._resume is not None:
            r_epoch, r_consumed = self._resume
            self._resume = None
            if r_epoch == epoch:
                start = r_consumed
                log.info("resuming epoch %d at batch %d: the %d batches already trained on are skipped",
                         epoch, start, start)
        self._prepare(epoch, start)
        # The iterator draws its workers' base seed from this generator, not from the global RNG: drawing from
        # the global RNG would make a resumed run's RNG differ from the uninterrupted one.
        self.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        self._epoch, self._consumed = epoch, start
        try:
            for batch in super().__iter__():
                self._consumed += 1
                yield batch
        finally:
            self._prepare(epoch, 0)                      # the next iterator starts at the beginning


class VitlabDataModule(pl.LightningDataModule):
    """Loaders for train / val / test of a source, with its transforms, samplers and batch-level augmentation.

    Sampling of map-style data always goes through a ``DistributedSampler``
    (one replica when not distributed), seeded by the run seed and reshuffled
    per epoch, so the order is the same on one process and on N (the union of
    the ranks' batches at a step is the one-process batch of N x the size).
    """

    def __init__(self, source: DataSource, img_size: int, batch_size: int, num_workers: int = 0,
                 augment: Optional[dict] = None, seed: int = 0, eval_batch_size: Optional[int] = None,
                 pin_memory: bool = False, drop_last: bool = True, mixup: Optional[dict] = None,
                 repeated_aug: int = 0, batched_augment: bool = False, max_corrupt_fraction: float = 0.01,
                 train_transform: Optional[Callable] = None):
        super().__init__()
        self.source = source
        self.img_size, self.batch_size, self.num_workers = img_size, batch_size, num_workers
        self.eval_batch_size = eval_batch_size or batch_size
        self.augment = dict(augment or {})
        self.seed, self.pin_memory, self.drop_last = seed, pin_memory, drop_last
        self.repeated_aug = int(repeated_aug or 0)
        self.batched_augment = bool(batched_augment)
        if self.batched_augment and num_workers:
            # a batch is one index into a tensor in memory: sending it through a worker process costs more
            log.info("data.batched_augment=true: batches are fetched in the main process (data.num_workers=%d "
                     "is not used)", num_workers)
            self.num_workers = 0
        if not 0.0 <= max_corrupt_fraction <= 1.0:
            raise DataConfigError(f"data.max_corrupt_fraction must be in [0, 1], got {max_corrupt_fraction}")
        self.max_corrupt_fraction = max_corrupt_fraction
        # a recipe's own training transform (DINO's multi-crop) replaces data.augment for the train split
        self.train_transform = train_transform
        if train_transform is not None and self.batched_augment:
            raise DataConfigError("this recipe brings its own training transform (e.g. DINO's multi-crop), which "
                                  "runs per image in the loader: set data.batched_augment=false")
        # detection / segmentation data brings its own joint image + box / mask transforms and batching (the
        # source's build_transform, wrap and collate): nothing that mixes or batches images alone applies to it
        if source.label_kind == "dense":
            if mixup and (mixup.get("mixup_alpha") or mixup.get("cutmix_alpha")):
                raise DataConfigError(f"mixup / cutmix mix image labels; {source.task} data has boxes or masks: set "
                                      "data.mixup.mixup_alpha=0 and data.mixup.cutmix_alpha=0")
            if self.batched_augment or self.repeated_aug > 1:
                raise DataConfigError(f"{source.task} data is augmented per image with its boxes / masks: set "
                                      "data.batched_augment=false and data.repeated_aug=0")
            mixup = None
        self.mixup = None
        if mixup:
            self.mixup = build_mixup(source.num_classes, **mixup)
        if self.mixup is not None and batch_size % 2:
            raise DataConfigError(f"mixup/cutmix pair images within a batch, so data.batch_size must be even "
                                  f"(got {batch_size}); change it or turn data.mixup off")
        self.eval_split = "test"                   # the split trainer.test reads (vitlab-eval sets it)
        self.datasets: dict[str, Any] = {}
        self._batch_augment: dict[bool, torch.nn.Module] = {}
        self._epoch_size: dict[str, int] = {}
        self._corrupt: Counter = Counter()
        self._train_loader: Optional[ResumableLoader] = None
        self._train_state: Optional[dict] = None

    # ----------------------------------------------------------- checkpoint ---
    # The train loader's place in the epoch travels in the checkpoint as the data module's state. (Lightning
    # also restores loaders that have state_dict(), but only when the loader is created after the restore;
    # configure_optimizers asks for estimated_stepping_batches, which creates it before.)
    def state_dict(self) -> dict:
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._train_state = state.get("train_loader")
        if self._train_loader is not None and self._train_state is not None:
            self._train_loader.load_state_dict(self._train_state)
            self._train_state = None

    def prepare_data(self) -> None:
        self.source.check()                        # downloads when configured; runs once per node

    # ------------------------------------------------------------- datasets ---
    def dataset(self, split: str) -> Any:
        if split not in self.datasets:
            base = self.source.dataset(split)
            if self.batched_augment:
                self.datasets[split] = self._in_memory(base, split)
            else:
                tf = self._transform(split == "train")
                if isinstance(base, IterableDataset):              # shards: the stream applies the transform
                    base.transform, base.seed = tf, self.seed
                    self.datasets[split] = base
                else:
                    self.datasets[split] = self.source.wrap(base, tf)
        return self.datasets[split]

    def _transform(self, train: bool) -> Callable:
        """A recipe's or task's own training transform when it brings one, else the source's for the split."""
        if train and self.train_transform is not None:
            return self.train_transform
        return self.source.build_transform(train, self.img_size, **self.augment)

    def eval_loader(self, split: str, batch_size: Optional[int] = None, max_samples: Optional[int] = None,
                    num_workers: Optional[int] = None) -> DataLoader:
        """The whole ``split`` (this process reads all of it, also under DDP) with the *evaluation* transform,
        in a fixed order: what feature extraction for the kNN and linear probes reads, the train split included.
        ``max_samples`` keeps that many, evenly spaced over the split (map-style data); shards yield all (the
        reader stops early)."""
        base = self.source.dataset(split)
        tf = self._transform(False)
        bs = int(batch_size or self.eval_batch_size)
        workers = self.num_workers if num_workers is None else num_workers
        if isinstance(base, IterableDataset):
            base.transform, base.seed = tf, self.seed
            base.configure(batch_size=bs, world_size=1, rank=0, num_workers=workers, drop_last=False)
            return StreamLoader(base, batch_size=bs, num_workers=workers, drop_last=False)
        ds: Any = self.source.wrap(base, tf)
        if max_samples is not None and max_samples < len(ds):
            idx = torch.linspace(0, len(ds) - 1, int(max_samples)).round().long().unique().tolist()
            ds = torch.utils.data.Subset(ds, idx)
        return DataLoader(ds, batch_size=bs, shuffle=False, num_workers=workers, drop_last=False,
                          persistent_workers=False, collate_fn=self.source.collate)

    def _in_memory(self, base: Any, split: str) -> Any:
        from vitlab.data.batched import InMemoryImages

        if isinstance(base, IterableDataset):
            raise DataConfigError("data.batched_augment=true needs an in-memory (map-style) dataset such as CIFAR or "
                             "digits; shards stream from disk: set data.batched_augment=false")
        log.info("loading the %s split into memory for batched augmentation on the training device", split)
        return InMemoryImages.from_dataset(base, self.img_size)

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit"):
            self.dataset("train")
            self.dataset("val")

    def validate(self, world_size: int) -> None:
        """Build the training data as rank 0 of ``world_size`` would, so a setting that cannot work stops the run
        before any work (e.g. fewer shards than ranks x workers) with :class:`DataConfigError`."""
        ds = self.dataset("train")
        if isinstance(ds, IterableDataset):
            try:
                ds.configure(batch_size=self.batch_size, world_size=world_size, rank=0,
                             num_workers=self.num_workers, drop_last=self.drop_last)
            except ValueError as e:
                raise DataConfigError(str(e)) from e
            if len(ds) == 0:
                raise DataConfigError(f"the training shards give no full batch of {self.batch_size} per rank on "
                                      f"{world_size} rank(s); lower data.batch_size or write more data")

    def _world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.world_size, t.global_rank) if t is not None else (1, 0)

    def _current_epoch(self) -> int:
        t = self.trainer
        return int(t.current_epoch) if t is not None else 0

    # -------------------------------------------------------------- loaders ---
    def _sampler(self, ds: Any, train: bool, world: int, rank: int) -> Sampler:
        if train and self.repeated_aug > 1:
            from timm.data.distributed_sampler import RepeatAugSampler

            # timm seeds each epoch's permutation with the epoch alone: offset it by the run seed
            return _SkippingSampler(RepeatAugSampler(ds, num_replicas=world, rank=rank, shuffle=True,
                                                     num_repeats=self.repeated_aug), epoch_offset=self.seed * 100_003)
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=train, seed=self.seed,
                                     drop_last=train and self.drop_last)
        return _SkippingSampler(sampler) if train else sampler

    def loader(self, split: str) -> DataLoader:
        ds = self.dataset(split)
        train = split == "train"
        world, rank = self._world()
        batch_size = self.batch_size if train else self.eval_batch_size
        kwargs: dict[str, Any] = dict(batch_size=batch_size, num_workers=self.num_workers,
                                      pin_memory=self.pin_memory, drop_last=train and self.drop_last)
        if self.source.collate is not None:                 # dense data: lists of boxes, padded images / masks
            kwargs["collate_fn"] = self.source.collate
        if isinstance(ds, IterableDataset):
            ds.configure(batch_size=batch_size, world_size=world, rank=rank, num_workers=self.num_workers,
                         drop_last=train and self.drop_last)
            kwargs["persistent_workers"] = False           # the stream is re-sent to the workers every epoch
            self._epoch_size[split] = len(ds)
        else:
            sampler = self._sampler(ds, train, world, rank)
            kwargs.update(sampler=sampler, persistent_workers=self.num_workers > 0)
            if self.batched_augment:
                from vitlab.data.batched import passthrough_collate

                kwargs["collate_fn"] = passthrough_collate
            self._epoch_size[split] = len(sampler)
        if train:
            # epoch_fn holds the data module weakly: a loader <-> module cycle would be freed by the cyclic garbage
            # collector, whose finalisation order makes persistent loader workers time out (10 s) on shutdown
            ref = weakref.ref(self)
            self._train_loader = ResumableLoader(ds, epoch_fn=lambda: ref()._current_epoch() if ref() else 0,
                                                 seed=self.seed, **kwargs)
            if self._train_state is not None:
                self._train_loader.load_state_dict(self._train_state)
                self._train_state = None
            return self._train_loader
        # a fixed generator: evaluating must not advance the global RNG that training draws from
        return StreamLoader(ds, generator=torch.Generator().manual_seed(self.seed), **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.eval_split)

    # ----------------------------------------------------- batch transforms ---
    def _stage(self) -> str:
        t = self.trainer
        if t is None or t.training:
            return "train"
        if t.sanity_checking or t.validating:
            return "val"
        return self.eval_split

    def count_corrupt(self, batch: dict) -> None:
        """Sum the workers' counts of skipped unreadable images; stop past ``max_corrupt_fraction`` of an epoch."""
        skipped = batch.pop("corrupt", None)
        if skipped is None:
            return
        n = int(skipped.sum()) if torch.is_tensor(skipped) else int(sum(skipped))
        if not n:
            return
        split = self._stage()
        key = (split, self._current_epoch())
        self._corrupt[key] += n
        total = self._epoch_size.get(split) or len(batch["image"])
        if self._corrupt[key] > self.max_corrupt_fraction * total:
            raise CorruptDataError(
                f"{self._corrupt[key]} unreadable images in the {split} data this epoch, more than "
                f"data.max_corrupt_fraction={self.max_corrupt_fraction} of the {total} this process reads per "
                "epoch. The warnings above name the files: repair or remove them (or rewrite the shards with "
                "vitlab-shards, which skips them), or raise data.max_corrupt_fraction to accept more losses.")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict):
            self.count_corrupt(batch)                  # on CPU, before the transfer: no device sync
        return batch

    def batch_augment(self, train: bool, device: torch.device) -> torch.nn.Module:
        if train not in self._batch_augment:
            from vitlab.data.batched import BatchAugment

            self._batch_augment[train] = BatchAugment(img_size=self.img_size, mean=self.source.mean,
                                                      std=self.source.std, train=train, **self.augment)
        return self._batch_augment[train].to(device)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not isinstance(batch, dict):
            return batch
        train = self._stage() == "train"
        if self.batched_augment:
            batch["image"] = self.batch_augment(train, batch["image"].device)(batch["image"])
        if train and self.mixup is not None:
            batch["image"], batch["label"] = self.mixup(batch["image"], batch["label"])
        return batch
