"""WebDatasetSource / ShardStream: shard discovery, metadata, exact epochs per rank and worker, resume, bad data.

The shards are written here with ``webdataset.TarWriter`` in the vitlab shard format (the reader is
tested on its own, independent of the writer): ``{split}-{k:06d}.tar`` with ``__key__`` = 9-digit
index, one image member and ``cls``, plus ``info.json`` and ``classes.json``.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from vitlab.data import DatasetNotFoundError
from vitlab.data.webdataset import ShardStream, WebDatasetSource, resume_position

CLASSES = ["cat", "dog", "owl"]


def encode(image: Image.Image, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG" if fmt == "jpg" else fmt.upper())
    return buf.getvalue()


def random_image(rng: np.random.Generator, size: int = 6) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))


def write_shards(out: Path, sizes: list[int], split: str = "train", fmt: str = "png", info: bool = True,
                 seed: int = 0, images: list | None = None, labels: list | None = None) -> list[int]:
    """Write ``{split}-{k:06d}.tar`` shards of ``sizes[k]`` samples in index order (+ info.json, classes.json).

    ``images``/``labels`` (indexed by sample index) default to random 6x6 images and ``index % 3``.
    Returns the indices written. info.json accumulates the splits of repeated calls.
    """
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    index, entries = 0, []
    for k, n in enumerate(sizes):
        name = f"{split}-{k:06d}.tar"
        with wds.TarWriter(str(out / name)) as sink:
            for _ in range(n):
                image = images[index] if images is not None else random_image(rng)
                label = labels[index] if labels is not None else index % len(CLASSES)
                sink.write({"__key__": f"{index:09d}", fmt: encode(image, fmt), "cls": str(label).encode()})
                index += 1
        entries.append({"name": name, "num_samples": n})
    if info:
        meta = json.loads((out / "info.json").read_text()) if (out / "info.json").is_file() else {
            "format": "vitlab-shards/1", "source": "test", "num_classes": len(CLASSES), "in_chans": 3,
            "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2], "created": "now", "splits": {}}
        meta["splits"][split] = {"num_samples": sum(sizes), "num_corrupt_skipped": 0, "shards": entries}
        (out / "info.json").write_text(json.dumps(meta))
        (out / "classes.json").write_text(json.dumps(CLASSES))
    return list(range(index))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL -> uint8 (C, H, W); module level so DataLoader workers can pickle it."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def indices(stream) -> list[int]:
    return [s["index"] for s in stream]


SIZES = [10, 13, 11, 12, 10, 13, 12, 11]     # 92 samples, uneven on purpose


@pytest.fixture
def shard_dir(tmp_path) -> Path:
    out = tmp_path / "shards"
    write_shards(out, SIZES)
    write_shards(out, [5, 4], split="val", seed=1)
    return out


def stream_of(out: Path, **kw) -> ShardStream:
    return WebDatasetSource(str(out), **{k: v for k, v in kw.items() if k != "seed"}).dataset(
        "train", seed=kw.get("seed", 0))


# ---------------------------------------------------------------------------------------------------------------
# Source: discovery and metadata
# ---------------------------------------------------------------------------------------------------------------

def test_metadata_from_info_and_classes_json(shard_dir):
    src = WebDatasetSource(str(shard_dir))
    src.check()
    assert src.splits == ("train", "val") and not src.has_split("test")
    assert (src.num_classes, src.class_names, src.in_chans) == (3, CLASSES, 3)
    assert src.mean == (0.5, 0.4, 0.3) and src.std == (0.2, 0.2, 0.2)
    assert [n for _, n in src.shard_list("train")] == SIZES
    assert [Path(u).name for u, _ in src.shard_list("val")] == ["val-000000.tar", "val-000001.tar"]
    override = WebDatasetSource(str(shard_dir), num_classes=5, mean=[0.1, 0.1, 0.1])
    assert override.num_classes == 5 and override.mean == (0.1, 0.1, 0.1) and override.class_names == CLASSES
    with pytest.raises(DatasetNotFoundError, match="no test shards"):
        src.dataset("test")


def test_folder_brace_glob_list_and_file_url_give_the_same_shards(shard_dir):
    expected = [str(shard_dir / f"train-{k:06d}.tar") for k in range(len(SIZES))]
    forms = [str(shard_dir), f"file://{shard_dir}", str(shard_dir / "train-{000000..000007}.tar"),
             str(shard_dir / "train-*.tar"), expected]
    for urls in forms:
        src = WebDatasetSource(urls)
        src.check()
        got = [u.removeprefix("file://") for u, _ in src.shard_list("train")]
        assert got == expected, urls
        assert src.has_split("val") and src.num_classes == 3          # val and info.json found beside the shards
        assert [n for _, n in src.shard_list("train")] == SIZES
    sub = WebDatasetSource(str(shard_dir / "train-{000000..000001}.tar"), val_urls=str(shard_dir / "val-000001.tar"))
    assert len(sub.shard_list("train")) == 2 and [n for _, n in sub.shard_list("val")] == [4]


def test_missing_shards_and_missing_metadata_are_clear_errors(tmp_path, shard_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no shards match .*vitlab-shards"):
        WebDatasetSource(str(tmp_path / "empty")).check()
    with pytest.raises(DatasetNotFoundError, match="2 of the 10 train shards do not exist .*train-000008.tar"):
        WebDatasetSource(str(shard_dir / "train-{000000..000009}.tar")).check()
    bare = tmp_path / "bare"
    write_shards(bare, [3, 4, 5], info=False)
    with pytest.raises(ValueError, match="data.source.num_classes"):
        WebDatasetSource(str(bare)).check()


def test_without_info_json_counts_come_from_the_tar_headers(tmp_path, caplog):
    bare = tmp_path / "bare"
    write_shards(bare, [3, 4, 5], info=False)
    src = WebDatasetSource(str(bare), num_classes=3)
    src.check()
    assert src.class_names == ["0", "1", "2"] and [n for _, n in src.shard_list("train")] == [None] * 3
    stream = src.dataset("train")
    with caplog.at_level(logging.INFO, logger="vitlab"):
        stream.configure(batch_size=1)
    assert stream.counts == [3, 4, 5] and "counting the samples of 3 shards" in caplog.text
    assert sorted(indices(stream)) == list(range(12))


# ---------------------------------------------------------------------------------------------------------------
# One epoch: coverage, shuffling, ranks
# ---------------------------------------------------------------------------------------------------------------

def test_one_epoch_reads_every_sample_once(tmp_path, shard_dir):
    exact = tmp_path / "exact"                      # 8 x 12 samples, batch 4, 2 workers: nothing left over
    all_idx = write_shards(exact, [12] * 8)
    stream = stream_of(exact, shuffle_buffer=16).configure(batch_size=4, num_workers=2)
    got = indices(stream)
    assert sorted(got) == all_idx and len(stream) == 96 and stream.plan().dropped == 0

    stream = stream_of(shard_dir).configure(batch_size=4, num_workers=2)   # uneven: a few left over
    got = indices(stream)
    assert len(got) == len(set(got)) == len(stream) and len(stream) % 4 == 0
    assert len(got) == sum(SIZES) - stream.plan().dropped and set(got) <= set(range(sum(SIZES)))
    sample = next(iter(stream))
    assert isinstance(sample["image"], Image.Image) and sample["image"].mode == "RGB"
    assert sample["label"].dtype == torch.long and int(sample["label"]) == sample["index"] % 3
    assert sample["corrupt"] == 0


def test_shuffle_differs_between_epochs_and_repeats_for_a_seed(shard_dir):
    def order(epoch: int, seed: int = 0) -> list[int]:
        stream = stream_of(shard_dir, shuffle_buffer=8, seed=seed).configure(batch_size=4, num_workers=2)
        stream.set_epoch(epoch)
        return indices(stream)

    e0, e1 = order(0), order(1)
    assert e0 != e1 and order(0) == e0 and order(1) == e1 and order(0, seed=1) != e0
    assert e0 != sorted(e0)                                            # shuffled within the workers, too
    val = WebDatasetSource(str(shard_dir)).dataset("val").configure(batch_size=2, drop_last=False)
    assert indices(val) == list(range(9))                              # eval: in order, nothing dropped


def worker_id(_image) -> int:
    """A transform that replaces the image by the id of the DataLoader worker that read it (module level: picklable)."""
    from torch.utils.data import get_worker_info

    return get_worker_info().id


def test_each_rank_and_workers_shards_are_reshuffled_every_epoch(shard_dir):
    """Which shards each (rank, worker) reads follows the seed and the epoch: real DataLoader workers report the
    shards they read. A frozen shard order (the seed without the epoch) would keep every worker on the same shards
    epoch after epoch, which the in-worker shuffle buffer alone hides from a test of the sample order."""
    starts = np.cumsum([0] + SIZES)
    shard_of = {i: k for k in range(len(SIZES)) for i in range(starts[k], starts[k + 1])}

    def assignment(epoch: int, seed: int = 0) -> dict:
        out: dict = {}
        for rank in range(2):
            stream = stream_of(shard_dir, shuffle_buffer=4, seed=seed).configure(batch_size=2, world_size=2,
                                                                                 rank=rank, num_workers=2)
            stream.transform = worker_id
            stream.set_epoch(epoch)
            for batch in DataLoader(stream, batch_size=2, num_workers=2):
                for index, worker in zip(batch["index"].tolist(), batch["image"].tolist()):
                    out.setdefault((rank, worker), set()).add(shard_of[index])
        return out

    epochs = [assignment(e) for e in range(3)]
    for a in epochs:                                       # each epoch: 4 readers on disjoint shards
        assert len(a) == 4 and sum(len(s) for s in a.values()) == len(set().union(*a.values()))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
    moved = [k for k in epochs[0] if epochs[0][k] != epochs[1][k]]
    assert len(moved) >= 2                                 # readers changed shards, not just one swap of order
    assert assignment(1) == epochs[1]                      # and it is reproducible for a seed
    assert assignment(1, seed=1) != epochs[1]


def test_ranks_get_equal_batches_and_disjoint_samples(shard_dir):
    per_rank = []
    for rank in range(2):
        stream = stream_of(shard_dir).configure(batch_size=4, world_size=2, rank=rank, num_workers=2)
        stream.set_epoch(3)
        got = indices(stream)
        assert len(got) == len(stream) and len(stream) % 4 == 0
        per_rank.append(got)
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(set(per_rank[0]) | set(per_rank[1])) == sum(SIZES) - stream.plan().dropped


def test_too_few_shards_error_and_resample_fallback(tmp_path, caplog):
    out = tmp_path / "few"
    write_shards(out, [9, 9, 9])
    with pytest.raises(ValueError, match="3 shards for 2 ranks x 2 workers: write more shards .*too_few_shards=resample"):
        stream_of(out).configure(batch_size=2, world_size=2, rank=0, num_workers=2)
    stream = stream_of(out, too_few_shards="resample")
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        stream.configure(batch_size=2, world_size=2, rank=1, num_workers=2)
    assert "drawing shards with replacement" in caplog.text and stream.is_resampled
    got = indices(stream)
    assert len(got) == len(stream) == 12                                # 27 samples // 2 ranks -> 6 batches of 2


def test_resampled_epoch_length_in_samples_and_steps(shard_dir):
    by_samples = stream_of(shard_dir, resampled=True, epoch_samples=40).configure(batch_size=4, world_size=2)
    assert len(indices(by_samples)) == len(by_samples) == 20            # 40 global over 2 ranks
    by_steps = stream_of(shard_dir, resampled=True, epoch_steps=3).configure(batch_size=4, num_workers=2)
    assert len(indices(by_steps)) == len(by_steps) == 12
    default = stream_of(shard_dir, resampled=True).configure(batch_size=4)
    assert len(indices(default)) == len(default) == sum(SIZES) // 4 * 4
    capped = stream_of(shard_dir, epoch_steps=5).configure(batch_size=4, num_workers=2)   # non-resampled cap
    got = indices(capped)
    assert len(got) == len(set(got)) == 20


# ---------------------------------------------------------------------------------------------------------------
# Mid-epoch resume with a real DataLoader
# ---------------------------------------------------------------------------------------------------------------

def test_resume_position_simulates_the_round_robin():
    assert resume_position([3, 3], 0) == ([0, 0], 0)
    assert resume_position([3, 3], 3) == ([2, 1], 1)
    assert resume_position([2, 7], 5) == ([2, 3], 0)                   # worker 0 ran dry after 4 batches
    assert resume_position([1, 4, 2], 6) == ([1, 3, 2], 2)


def test_resume_mid_epoch_continues_without_replay(tmp_path):
    out = tmp_path / "resume"
    write_shards(out, [4, 4, 4, 24])                                   # workers get 2 and 7 batches of 4

    def loader(start: int = 0) -> DataLoader:
        stream = WebDatasetSource(str(out), shuffle_buffer=6).dataset("train", transform=to_tensor, seed=7)
        stream.configure(batch_size=4, num_workers=2)
        stream.set_epoch(2)
        stream.set_start_batch(start)
        return DataLoader(stream, batch_size=4, num_workers=2, drop_last=True)

    full_loader = loader()
    full = [b["index"].tolist() for b in full_loader]
    flat = [i for b in full for i in b]
    assert len(full) == len(full_loader) == 9 and sorted(flat) == list(range(36))
    assert indices(full_loader.dataset) == flat                        # in-process iteration: the same order
    for k in (3, 6):                                                   # mid-round; after one worker ran dry
        resumed = [b["index"].tolist() for b in loader(k)]
        assert full[:k] + resumed == full, k


def test_resume_skips_the_consumed_samples_before_decoding(shard_dir, monkeypatch):
    import vitlab.data.webdataset as wd

    decoded = []
    real = wd.decode_sample
    monkeypatch.setattr(wd, "decode_sample", lambda s, mode: decoded.append(s["__key__"]) or real(s, mode))
    stream = stream_of(shard_dir).configure(batch_size=4, num_workers=2)
    full = indices(stream)
    decoded.clear()
    stream.set_start_batch(5)
    rest = indices(stream)
    assert rest == full[20:] and len(decoded) == len(rest)              # nothing consumed was decoded again
    stream.set_epoch(1)
    assert stream.start_batch == 0                                     # a new epoch starts from its beginning


# ---------------------------------------------------------------------------------------------------------------
# Bad data
# ---------------------------------------------------------------------------------------------------------------

def test_corrupt_image_non_image_member_and_truncated_shard(tmp_path, caplog):
    out = tmp_path / "bad"
    write_shards(out, [10, 10, 10, 40], fmt="jpg")
    rng = np.random.default_rng(5)
    with wds.TarWriter(str(out / "train-000000.tar")) as sink:          # rewrite shard 0 with bad samples
        for i in range(10):
            sample = {"__key__": f"{i:09d}", "jpg": encode(random_image(rng), "jpg"), "cls": b"1"}
            if i == 3:
                sample["jpg"] = b"\xff\xd8\xff\xe0 this is not a jpeg"
            if i == 5:
                sample = {"__key__": f"{i:09d}", "txt": b"no image here", "cls": b"1"}
            if i == 7:
                sample["json"] = b'{"extra": "member, ignored"}'
            sink.write(sample)
    truncated = out / "train-000003.tar"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])

    stream = stream_of(out, shuffle_buffer=4).configure(batch_size=4, num_workers=2)
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        samples = list(stream)
    assert len(samples) == len(stream) == 68                            # quotas met (second pass over the shards)
    assert "'000000003'" in caplog.text and "train-000000.tar" in caplog.text
    assert "'000000005'" in caplog.text and "no image member" in caplog.text
    assert "'000000007'" not in caplog.text and 7 in [s["index"] for s in samples]
    assert "train-000003.tar is corrupt or truncated" in caplog.text
    assert sum(s["corrupt"] for s in samples) >= 2
    assert "samples short after pass 1" in caplog.text                 # the worker with the cut shard re-read
    assert caplog.text.count("dropped corrupt sample '000000003'") == 1    # warned once per sample


def test_unreadable_shards_everywhere_is_a_clear_error(tmp_path):
    out = tmp_path / "junk"
    write_shards(out, [4, 4])
    for p in out.glob("train-*.tar"):
        p.write_bytes(b"not a tar" * 10)
    stream = stream_of(out).configure(batch_size=2)
    with pytest.raises(RuntimeError, match="read no sample in a whole pass"):
        list(stream)


# ---------------------------------------------------------------------------------------------------------------
# Real data: a few hundred CIFAR-10 images round-trip through shards
# ---------------------------------------------------------------------------------------------------------------

def test_real_cifar_images_round_trip(tmp_path, cifar10_subset_root):
    from vitlab.data import CIFAR

    base = CIFAR(str(cifar10_subset_root)).dataset("train")
    pairs = [base[i] for i in range(300)]
    out = tmp_path / "cifar"
    write_shards(out, [75] * 4, images=[im for im, _ in pairs], labels=[lb for _, lb in pairs])
    stream = WebDatasetSource(str(out), shuffle_buffer=50).dataset("train", transform=to_tensor)
    stream.configure(batch_size=25, num_workers=2)
    seen = 0
    for s in stream:
        image, label = pairs[s["index"]]
        assert int(s["label"]) == label and torch.equal(s["image"], to_tensor(image))   # PNG is lossless
        seen += 1
    assert seen == 300
