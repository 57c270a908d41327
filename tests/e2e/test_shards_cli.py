"""vitlab-shards end to end: the real CIFAR-10 subset to shards, and its errors (exit 2, clear messages)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from tests.conftest import run_cli

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.slow                      # ~10 s: a fresh interpreter imports torch, then writes 5,085 images
def test_cifar10_subset_to_shards(cifar_subset: Path, tmp_path):
    out = tmp_path / "shards"
    p = run_cli("vitlab.cli.shards", "data=cifar10", f"data.root={cifar_subset}", f"output_dir={out}",
                "shard_size=1000", "progress=false", timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "wrote 5085 images of cifar10" in p.stdout
    info = json.loads((out / "info.json").read_text())
    assert json.loads((out / "classes.json").read_text()) == CIFAR10_CLASSES
    assert sorted(p.name for p in out.glob("*.tar")) == [f"train-{k:06d}.tar" for k in range(5)] + ["val-000000.tar"]
    assert sum(s["num_samples"] for s in info["splits"].values()) == 5085
    for split in info["splits"].values():
        for shard in split["shards"]:
            with tarfile.open(out / shard["name"]) as tar:
                names = tar.getnames()
            assert len(names) == 2 * shard["num_samples"]            # <key>.png + <key>.cls per sample
            assert {n.split(".", 1)[1] for n in names} == {"png", "cls"}
    assert not list(out.glob("*.partial"))


def test_bad_key_exits_2_naming_the_valid_keys(tmp_path):
    p = run_cli("vitlab.cli.shards", "data=digits", f"output_dir={tmp_path / 'out'}", "shard_sise=10", timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "unknown config key 'shard_sise'" in p.stderr and "shard_size" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


def test_missing_dataset_exits_2_with_its_message(tmp_path):
    p = run_cli("vitlab.cli.shards", "data=cifar10", f"data.root={tmp_path / 'nowhere'}",
                f"output_dir={tmp_path / 'out'}", timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "cifar10 not found" in p.stderr and "point data.root at" in p.stderr   # the DatasetNotFoundError text
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.tar"))


def test_missing_output_dir_exits_2():
    p = run_cli("vitlab.cli.shards", "data=digits", timeout=120)
    assert p.returncode == 2 and "output_dir=DIR" in p.stderr, p.stderr[-3000:]
