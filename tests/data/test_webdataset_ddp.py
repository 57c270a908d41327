"""ShardStream under real 2-process CPU DDP (gloo): each rank's DataLoader(num_workers=2) reads one epoch.

Asserts the contract DDP training relies on: no sample read twice across ranks and workers, the same
number of batches on both ranks, and coverage = all samples minus the leftover the stream logs.
"""

from __future__ import annotations

import json
import logging
import re
import socket
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from vitlab.data.webdataset import WebDatasetSource

SIZES = [7, 12, 9, 15, 11, 8, 13, 10, 14, 9]      # 108 samples in 10 uneven shards
BATCH, WORKERS, EPOCH = 4, 2, 1


def _write(out: Path) -> None:
    """Shards in the vitlab format (webdataset.TarWriter), written here so the test is independent of the writer."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    out.mkdir(parents=True)
    rng, index, entries = np.random.default_rng(0), 0, []
    for k, n in enumerate(SIZES):
        with wds.TarWriter(str(out / f"train-{k:06d}.tar")) as sink:
            for _ in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(buf, format="PNG")
                sink.write({"__key__": f"{index:09d}", "png": buf.getvalue(), "cls": str(index % 2).encode()})
                index += 1
        entries.append({"name": f"train-{k:06d}.tar", "num_samples": n})
    (out / "info.json").write_text(json.dumps({"format": "vitlab-shards/1", "num_classes": 2, "in_chans": 3,
                                               "splits": {"train": {"num_samples": index, "shards": entries}}}))


def _stream(out: Path, world: int, rank: int):
    stream = WebDatasetSource(str(out), shuffle_buffer=8).dataset("train", transform=_label_only, seed=3)
    stream.configure(batch_size=BATCH, world_size=world, rank=rank, num_workers=WORKERS)
    stream.set_epoch(EPOCH)
    return stream


def _label_only(image):
    return 0                                       # the image itself is not needed to check the sample assignment


def _rank_main(rank: int, out: str, port: int, result: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=rank)
    try:
        loader = DataLoader(_stream(Path(out), 2, rank), batch_size=BATCH, num_workers=WORKERS, drop_last=True)
        batches = [b["index"].tolist() for b in loader]
        gathered = [None, None]
        dist.all_gather_object(gathered, {"batches": batches, "len": len(loader)})
        if rank == 0:
            Path(result).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_ddp_epoch_is_disjoint_equal_and_complete(tmp_path, caplog):
    out, result = tmp_path / "shards", tmp_path / "result.json"
    _write(out)
    with caplog.at_level(logging.INFO, logger="vitlab"):
        plan = _stream(out, 2, 0).plan()
    logged = re.search(r"epoch 1: (\d+) of (\d+) samples left over", caplog.text)
    assert logged and int(logged.group(1)) == plan.dropped and int(logged.group(2)) == sum(SIZES)

    # fork: the ranks inherit the imported modules (spawn re-imports torch per rank: tens of seconds on a busy CPU)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_rank_main, args=(str(out), _free_port(), str(result)), nprocs=2, start_method=method)

    ranks = json.loads(result.read_text())
    seen = [i for r in ranks for b in r["batches"] for i in b]
    assert len(seen) == len(set(seen))                                         # no sample twice
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == ranks[0]["len"] == ranks[1]["len"] > 0
    assert all(len(b) == BATCH for r in ranks for b in r["batches"])
    assert len(seen) == sum(SIZES) - plan.dropped and set(seen) <= set(range(sum(SIZES)))
