"""The data module's loaders: resumable position in the epoch, repeated augmentation, unreadable images."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from vitlab.data import Digits
from vitlab.data.base import ArrayDataset, ClassificationSource, CorruptDataError, DictDataset
from vitlab.lit.datamodule import ResumableLoader, VitlabDataModule


class _Epoch:
    """Stands in for trainer.current_epoch."""

    def __init__(self):
        self.value = 0

    def __call__(self) -> int:
        return self.value


def _dm(**kw) -> VitlabDataModule:
    kw.setdefault("augment", {"policy": "none"})
    return VitlabDataModule(Digits(), img_size=8, batch_size=16, **kw)


def _indices(loader) -> list[list[int]]:
    return [b["index"].tolist() for b in loader]


def _train_loader(dm: VitlabDataModule, epoch: _Epoch) -> ResumableLoader:
    dl = dm.loader("train")
    dl.epoch_fn = epoch
    return dl


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_the_same_order_without_replay(workers):
    epoch = _Epoch()
    epoch.value = 1
    full = _indices(_train_loader(_dm(num_workers=workers), epoch))

    dl = _train_loader(_dm(num_workers=workers), epoch)
    it = iter(dl)
    first = [next(it)["index"].tolist() for _ in range(5)]
    state = dl.state_dict()
    assert state == {"epoch": 1, "consumed_batches": 5}
    del it

    resumed = _train_loader(_dm(num_workers=workers), epoch)          # a fresh process: new loader, same seed
    resumed.load_state_dict(state)
    rest = _indices(resumed)
    assert first == full[:5]
    assert rest == full[5:]                                           # no replay of the first 5 batches
    assert _indices(resumed) == full                                  # the next iterator is a whole epoch again


def test_a_resume_state_of_another_epoch_is_ignored():
    epoch = _Epoch()
    dl = _train_loader(_dm(), epoch)
    full0 = _indices(dl)
    dl.load_state_dict({"epoch": 3, "consumed_batches": 4})           # saved at the end of epoch 3's 4th batch
    assert _indices(dl) == full0                                      # epoch 0 runs whole


def test_the_epoch_is_read_when_the_iterator_starts_not_when_it_is_made():
    epoch = _Epoch()
    dl = _train_loader(_dm(), epoch)
    it = iter(dl)                                                     # Lightning creates it before set_epoch
    epoch.value = 2
    got = [b["index"].tolist() for b in it]
    assert got == _indices(dl)                                        # epoch 2's order, both times
    epoch.value = 0
    assert _indices(dl) != got                                        # and epoch 0's differs


def test_order_depends_on_the_seed():
    epoch = _Epoch()
    assert _indices(_train_loader(_dm(seed=0), epoch)) != _indices(_train_loader(_dm(seed=1), epoch))


@pytest.mark.parametrize("seed", [0, 5])
def test_repeated_augmentation_sampler_repeats_each_image_across_ranks(seed):
    """DeiT's repeated augmentation: 3 copies of each image per epoch, spread over the ranks."""
    world = 2
    per_rank = []
    for rank in range(world):
        dm = _dm(repeated_aug=3, seed=seed)
        dm._world = lambda r=rank: (world, r)
        sampler = dm.loader("train").sampler
        sampler.set_epoch(0)
        per_rank.append(list(sampler))
    n = len(dm.dataset("train"))
    assert len(per_rank[0]) == len(per_rank[1])
    counts = np.bincount(np.concatenate(per_rank), minlength=n)
    # timm keeps ~len(dataset) samples per epoch in all: about a third of the images, each 3 times
    assert counts.max() == 3
    assert (counts[counts > 0] == 3).mean() > 0.95
    assert set(per_rank[0]) & set(per_rank[1])                        # copies of one image land on different ranks


def test_repeated_augmentation_order_depends_on_the_seed():
    orders = []
    for seed in (0, 1):
        sampler = _dm(repeated_aug=3, seed=seed).loader("train").sampler
        sampler.set_epoch(0)
        orders.append(list(sampler))
    assert orders[0] != orders[1]


class _Broken(Dataset):
    """Items 3 and 7 raise what PIL raises for a truncated or non-image file."""

    def __init__(self, n=20):
        self.inner = ArrayDataset(np.random.default_rng(0).random((n, 1, 4, 4)).astype(np.float32),
                                  np.arange(n) % 10, torch.from_numpy)
        self.bad = {3, 7}

    def __len__(self):
        return len(self.inner)

    def path_of(self, i):
        return f"/data/img_{i:03d}.jpg"

    def __getitem__(self, i):
        if i in self.bad:
            raise OSError("image file is truncated (5 bytes not processed)")
        return self.inner[i]


def test_unreadable_images_are_skipped_counted_and_named(caplog):
    ds = DictDataset(_Broken())
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        items = [ds[i] for i in range(len(ds))]
    assert [it["corrupt"] for it in items].count(1) == 2
    assert items[3]["index"] == 4 and items[3]["corrupt"] == 1        # the next readable image takes its place
    assert items[4]["index"] == 4 and items[4]["corrupt"] == 0
    assert "/data/img_003.jpg" in caplog.text and "/data/img_007.jpg" in caplog.text
    assert "truncated" in caplog.text


def test_a_dataset_with_nothing_readable_fails_clearly():
    ds = _Broken(4)
    ds.bad = {0, 1, 2, 3}
    with pytest.raises(CorruptDataError, match="could not be read"):
        DictDataset(ds)[0]


class _BrokenSource(ClassificationSource):
    name, num_classes, in_chans, mean, std = "broken", 10, 1, (0.5,), (0.5,)
    class_names = [str(i) for i in range(10)]

    def __init__(self, n):
        self.n = n

    def _load(self, split):
        return _Broken(self.n)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_data_module_stops_past_the_corrupt_fraction(workers):
    # 2 of 20 unreadable: 10% — allowed at 0.2, an error at 0.05, raised in the main process with a clear message
    ok = VitlabDataModule(_BrokenSource(20), img_size=4, batch_size=4, num_workers=workers,
                          augment={"policy": "none"}, max_corrupt_fraction=0.2)
    for b in ok.loader("train"):
        ok.on_before_batch_transfer(b, 0)
        assert "corrupt" not in b
    assert sum(ok._corrupt.values()) == 2

    strict = VitlabDataModule(_BrokenSource(20), img_size=4, batch_size=4, num_workers=workers,
                              augment={"policy": "none"}, max_corrupt_fraction=0.05)
    it = iter(strict.loader("train"))
    with pytest.raises(CorruptDataError, match="max_corrupt_fraction=0.05"):
        for b in it:
            strict.on_before_batch_transfer(b, 0)
    it.close()                                                        # stop the loader's workers now


def test_mixup_needs_an_even_batch():
    with pytest.raises(ValueError, match="batch_size must be even"):
        VitlabDataModule(Digits(), img_size=8, batch_size=15, mixup={"mixup_alpha": 0.8, "cutmix_alpha": 1.0})


def test_mixup_soft_targets_reach_the_training_batch_only():
    dm = _dm(mixup={"mixup_alpha": 0.8, "cutmix_alpha": 0.0, "label_smoothing": 0.1})
    batch = next(iter(dm.loader("train")))
    labels = batch["label"].clone()
    out = dm.on_after_batch_transfer(dict(batch), 0)                 # no trainer: the training stage
    assert out["label"].shape == (16, 10)
    # timm's batch mixup: lam x smoothed one-hot(label) + (1 - lam) x smoothed one-hot(the flipped batch's label)
    off, on = 0.1 / 10, 1 - 0.1 + 0.1 / 10
    one_hot = torch.full((16, 10), off).scatter_(1, labels[:, None], on)
    i = int((labels != labels.flip(0)).nonzero()[0])                  # a row whose two labels differ gives lam
    lam = float((out["label"][i, labels[i]] - off) / (on - off))
    torch.testing.assert_close(out["label"], lam * one_hot + (1 - lam) * one_hot.flip(0))


class _Constant(ClassificationSource):
    """Image k is the constant (k + 1) / 64 on every pixel, label k % 10: a mixed pixel tells which images were mixed
    and in which proportion."""

    name, num_classes, in_chans, mean, std = "constant", 10, 1, (0.0,), (1.0,)
    class_names = [str(i) for i in range(10)]

    def _load(self, split):
        n = 32
        images = np.stack([np.full((1, 8, 8), (k + 1) / 64, np.float32) for k in range(n)])
        return ArrayDataset(images, np.arange(n) % 10, torch.from_numpy)


@pytest.mark.parametrize("mixer", [{"mixup_alpha": 0.8, "cutmix_alpha": 0.0}, {"mixup_alpha": 0.0, "cutmix_alpha": 1.0},
                                   {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mode": "elem"}],
                         ids=["mixup", "cutmix", "both_per_element"])
def test_mixup_targets_match_the_mixed_pixels(mixer):
    """The soft target of each image weighs its label by the share of the image that is really its own, read off the
    mixed pixels (not solved from the targets, which would agree with themselves): swapping lam and 1 - lam, or the
    partner images, in the data module's mixing is caught."""
    np.random.seed(0)
    dm = VitlabDataModule(_Constant(), img_size=8, batch_size=16, augment={"policy": "none"},
                          mixup={**mixer, "label_smoothing": 0.0, "prob": 1.0})
    seen = 0
    for batch in dm.loader("train"):
        index, labels = batch["index"].clone(), batch["label"].clone()
        value = (index.float() + 1) / 64                                       # each image's own constant
        out = dm.on_after_batch_transfer(dict(batch), 0)
        x = out["image"].reshape(16, -1)                                       # (B, 64) mixed pixels
        partner = value.flip(0)
        for i in range(16):
            if mixer["cutmix_alpha"] and mixer["mixup_alpha"] == 0.0:          # a box of the partner pasted in
                lam = float(torch.isclose(x[i], value[i].expand(64)).float().mean())
            elif torch.isclose(x[i], x[i, :1].expand(64)).all():              # blended everywhere alike (mixup)
                lam = float((x[i, 0] - partner[i]) / (value[i] - partner[i]))
            else:                                                              # a cutmix box in the elem mode
                lam = float(torch.isclose(x[i], value[i].expand(64)).float().mean())
            expected = torch.zeros(10)
            expected[labels[i]] += lam
            expected[labels.flip(0)[i]] += 1 - lam
            torch.testing.assert_close(out["label"][i], expected, atol=1e-5, rtol=0)
            seen += 1
    assert seen == 32


def test_batched_augment_fetches_uint8_batches_and_augments_them_after_the_transfer():
    dm = _dm(batched_augment=True, num_workers=2, augment={"policy": "crop_flip", "crop_padding": 1, "hflip": 0.0},
             mixup={"mixup_alpha": 0.8, "cutmix_alpha": 1.0})
    assert dm.num_workers == 0                                        # one tensor index: no worker processes
    batch = next(iter(dm.loader("train")))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (16, 1, 8, 8)
    out = dm.on_after_batch_transfer(dict(batch), 0)
    assert out["image"].dtype == torch.float32 and out["image"].shape == (16, 1, 8, 8)
    assert out["image"].mean().abs() < 1.0                            # normalised with the source's statistics
    assert out["label"].shape == (16, 10)                             # then mixed: soft targets
    val = next(iter(dm.loader("val")))
    dm._stage = lambda: "val"
    v = dm.on_after_batch_transfer(dict(val), 0)
    assert v["label"].ndim == 1 and v["image"].dtype == torch.float32  # evaluation: no mixup, no random crop
    mean, std = dm.source.mean[0], dm.source.std[0]
    torch.testing.assert_close(v["image"], (val["image"].float() / 255 - mean) / std, atol=1e-5, rtol=0)


def test_an_evaluation_shard_loader_reports_every_batch_its_workers_yield(tmp_path):
    """2 workers, shards of 50 and 8 samples, batch 32, no drop_last: the workers yield 32+18 and 8, i.e. 3 batches,
    where ceil(58 / 32) = 2 would make Lightning stop early and skip 18 samples."""
    from vitlab.data.shards import write_shards
    from vitlab.data.webdataset import WebDatasetSource

    class Small(ClassificationSource):
        name, num_classes, in_chans, mean, std = "small", 10, 1, (0.5,), (0.5,)
        class_names = [str(i) for i in range(10)]
        splits = ("train", "val")

        def _load(self, split):
            n = 58
            return ArrayDataset(np.random.default_rng(0).random((n, 1, 8, 8)).astype(np.float32), np.arange(n) % 10,
                                torch.from_numpy)

    write_shards(Small(), tmp_path, max_count=50, progress=False)
    dm = VitlabDataModule(WebDatasetSource(str(tmp_path)), img_size=8, batch_size=16, eval_batch_size=32,
                          num_workers=2, augment={"policy": "none"})
    dl = dm.loader("val")
    seen = [i for b in dl for i in b["index"].tolist()]
    assert sorted(seen) == list(range(58))
    assert len(dl) == 3
