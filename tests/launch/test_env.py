"""vitlab/env.py: the environment record, and environment.json as a single-process vitlab-train run writes it."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import CONF, REPO
from vitlab import env

TINY = ["experiment=digits_vit", "backbone.embed_dim=32", "backbone.depth=1", "backbone.num_heads=2",
        "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu"]


def _git(*args, cwd):
    e = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
         "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, env=e, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def git_repo(tmp_path):
    try:
        _git("init", "-q", cwd=tmp_path)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not available")
    (tmp_path / "a.txt").write_text("a\n")
    _git("add", "a.txt", cwd=tmp_path)
    _git("commit", "-q", "-m", "first", cwd=tmp_path)
    return tmp_path


def test_git_info_reads_the_commit_and_the_dirty_flag(git_repo):
    info = env.git_info(git_repo)
    assert info["sha"] == _git("rev-parse", "HEAD", cwd=git_repo) and info["dirty"] is False
    (git_repo / "a.txt").write_text("b\n")
    assert env.git_info(git_repo)["dirty"] is True


def test_git_info_ignores_a_repository_that_merely_contains_the_package(git_repo, tmp_path_factory):
    """vitlab installed into a venv inside another project's repository must not report that project's commit."""
    inner = git_repo / "venv" / "site-packages"
    inner.mkdir(parents=True)
    assert env.git_info(inner) == {"sha": "unknown", "dirty": None, "root": str(inner)}
    outside = tmp_path_factory.mktemp("no_git")
    assert env.git_info(outside)["sha"] == "unknown"


def test_config_hash_is_of_the_resolved_values():
    a = OmegaConf.create({"x": 1, "y": "${x}", "z": {"w": [1, 2]}})
    assert env.config_sha256(a) == env.config_sha256({"z": {"w": [1, 2]}, "y": 1, "x": 1})   # key order too
    assert env.config_sha256(a) != env.config_sha256({"x": 2, "y": 2, "z": {"w": [1, 2]}})


def test_a_single_process_record_has_one_rank_and_no_collective():
    record = env.environment_record(config={"a": 1})
    assert record["distributed"] == {"world_size": 1, "backend": None, "num_nodes": 1}
    assert [r["config_sha256"] for r in record["ranks"]] == [env.config_sha256({"a": 1})]
    assert record["ranks"][0]["pid"] == os.getpid()
    json.dumps(record)                                    # JSON-able as it is
    assert "1 rank(s) on 1 host(s), the same config" in env.summary(record)


def test_single_process_run_writes_environment_json(tmp_path):
    """Through vitlab-train's train(): the file is there, with the versions, the commit, the hardware and the
    rank's hash of the very config.yaml the run wrote."""
    from vitlab.cli.train import train

    out = tmp_path / "run"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=TINY + [f"paths.output_dir={out}", "logger=[]"])
    train(cfg)
    record = json.loads((out / "environment.json").read_text())

    for key in ("python", "platform", "torch", "packages", "vitlab", "hardware", "distributed", "ranks"):
        assert key in record, key
    t = record["torch"]
    assert isinstance(t["version"], str) and t["version"]
    assert t["cuda"] is None or isinstance(t["cuda"], str)
    assert t["cudnn"] is None or isinstance(t["cudnn"], int)
    assert record["packages"]["flash-attn"]                 # a version or "not installed", never missing
    assert isinstance(record["packages"]["pytorch-lightning"], str)
    hw = record["hardware"]
    assert isinstance(hw["hostname"], str) and isinstance(hw["logical_cores"], int) and hw["logical_cores"] >= 1
    assert isinstance(hw["gpus"], list) and (hw["ram_bytes"] is None or hw["ram_bytes"] > 0)
    assert record["distributed"]["world_size"] == 1 and len(record["ranks"]) == 1

    if (REPO / ".git").exists():
        assert record["vitlab"]["sha"] == _git("rev-parse", "HEAD", cwd=REPO)
        assert isinstance(record["vitlab"]["dirty"], bool)
    else:
        assert record["vitlab"]["sha"] == "unknown"
    saved = OmegaConf.to_container(OmegaConf.load(out / "config.yaml"))
    assert record["ranks"][0]["config_sha256"] == env.config_sha256(saved)
