"""A LightningDataModule over any vitlab data source; batches are dicts."""

from __future__ import annotations

from typing import Optional

import pytorch_lightning as pl
from torch.utils.data import DataLoader, DistributedSampler

from vitlab.data import ClassificationSource, DictDataset, build_transforms


class VitlabDataModule(pl.LightningDataModule):
    """Loaders for train / val / test of a source, with its transforms.

    Sampling always goes through a ``DistributedSampler`` (one replica when not
    distributed), seeded by the run seed and reshuffled per epoch through
    ``set_epoch``. The order is therefore the same on one process and on N
    (the union of the ranks' batches at a step is the one-process batch of
    N x the size), and resuming at an epoch boundary replays nothing.
    """

    def __init__(self, source: ClassificationSource, img_size: int, batch_size: int, num_workers: int = 0,
                 augment: Optional[dict] = None, seed: int = 0, eval_batch_size: Optional[int] = None,
                 pin_memory: bool = False, drop_last: bool = True):
        super().__init__()
        self.source = source
        self.img_size, self.batch_size, self.num_workers = img_size, batch_size, num_workers
        self.eval_batch_size = eval_batch_size or batch_size
        self.augment = dict(augment or {})
        self.seed, self.pin_memory, self.drop_last = seed, pin_memory, drop_last
        self.datasets: dict[str, DictDataset] = {}

    def prepare_data(self) -> None:
        self.source.check()                        # downloads when configured; runs once per node

    def dataset(self, split: str) -> DictDataset:
        if split not in self.datasets:
            tf = build_transforms(split == "train", self.img_size, self.source.mean, self.source.std, **self.augment)
            self.datasets[split] = DictDataset(self.source.dataset(split), tf)
        return self.datasets[split]

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit"):
            self.dataset("train")
            self.dataset("val")

    def _world(self) -> tuple[int, int]:
        t = getattr(self, "trainer", None)
        return (t.world_size, t.global_rank) if t is not None else (1, 0)

    def loader(self, split: str) -> DataLoader:
        ds = self.dataset(split)
        train = split == "train"
        world, rank = self._world()
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=train, seed=self.seed,
                                     drop_last=train and self.drop_last)
        return DataLoader(ds, batch_size=self.batch_size if train else self.eval_batch_size, sampler=sampler,
                          num_workers=self.num_workers, pin_memory=self.pin_memory, drop_last=train and self.drop_last,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader(getattr(self, "eval_split", "test"))
