"""Training from WebDataset shards written from the shared CIFAR-10 subset, on one process and on 2 DDP ranks."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SHARED_DATA, run_cli
from vitlab.data.webdataset import WebDatasetSource

pytestmark = pytest.mark.slow

MODEL = ["backbone=vit_tiny", "backbone.patch_size=8", "backbone.embed_dim=48", "backbone.depth=2",
         "backbone.num_heads=2", "data.img_size=32", "trainer.enable_progress_bar=false", "run_test=false"]


@pytest.fixture(scope="module")
def cifar_shards(tmp_path_factory):
    root = SHARED_DATA / "cifar10-subset"
    if not (root / "cifar-10-batches-py" / "data_batch_1").is_file():
        pytest.skip(f"the shared CIFAR-10 subset is not at {root} (set VITLAB_SHARED_DATA)")
    out = tmp_path_factory.mktemp("shards")
    p = run_cli("vitlab.cli.shards", "data=cifar10", f"data.root={root}", f"output_dir={out}", "shard_size=500")
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_ddp_two_ranks_read_every_shard_sample_at_most_once(cifar_shards, tmp_path):
    info = json.loads((cifar_shards / "info.json").read_text())
    n_train = info["splits"]["train"]["num_samples"]
    assert len(info["splits"]["train"]["shards"]) == 10                   # 4,577 images at 500 per shard
    # what the plan promises: every rank the same number of whole batches; the shards' imbalance is dropped
    stream = WebDatasetSource(str(cifar_shards)).dataset("train")
    expected = 2 * len(stream.configure(batch_size=32, world_size=2, rank=0, num_workers=2))
    assert expected >= 0.85 * n_train
    rec = tmp_path / "seen"
    p = run_cli("vitlab.cli.train", *MODEL, "data=webdataset", f"data.urls={cifar_shards}", "trainer=ddp",
                "trainer.devices=2", "data.num_workers=2", "data.batch_size=32", "trainer.max_epochs=2",
                f"paths.output_dir={tmp_path / 'run'}", "+callbacks.seen._target_=tests.e2e.recorders.RecordIndices",
                f"+callbacks.seen.out_dir={rec}", timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ranks = [json.loads((rec / f"indices-rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in ("0", "1"):
        per_rank = [[i for batch in r[epoch] for i in batch] for r in ranks]
        assert len(ranks[0][epoch]) == len(ranks[1][epoch])               # equal batch counts: no DDP hang
        seen = per_rank[0] + per_rank[1]
        assert len(seen) == len(set(seen))                                # no sample twice within the epoch
        assert len(seen) == expected                                      # all the plan promises (whole batches)
        assert min(seen) >= 0 and max(seen) < n_train
    assert [i for b in ranks[0]["0"] for i in b] != [i for b in ranks[0]["1"] for i in b]   # reshuffled per epoch
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["ddp/world_size"] == 2 and metrics["ddp/max_param_divergence"] == 0.0
    assert 0.0 <= metrics["val/top1"] <= 1.0

    # validation split the val shards across the ranks and read each sample once: one process evaluating the
    # same checkpoint on the same shards gets the same accuracy
    ev = run_cli("vitlab.cli.eval", f"ckpt={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", "split=val",
                 f"metrics_file={tmp_path / 'eval.json'}", timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["val/top1"] == pytest.approx(metrics["val/top1"], abs=1e-6)


def test_too_few_shards_for_the_workers_fails_clearly(cifar_shards, tmp_path):
    p = run_cli("vitlab.cli.train", *MODEL, "data=webdataset", f"data.urls={cifar_shards}", "data.num_workers=16",
                "trainer.max_epochs=1", f"paths.output_dir={tmp_path / 'run'}", timeout=600)
    assert p.returncode != 0
    assert "too_few_shards" in p.stderr and "Traceback" not in p.stderr.split("too_few_shards")[0][-2000:]
