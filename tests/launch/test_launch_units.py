"""vitlab/cli/launch.py without starting processes: who is a rank, the devices x nodes check, the cleanup after a
job, and the SLURM launcher config as sbatch would get it."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import CONF
from vitlab.cli import launch

LAUNCH_VARS = ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
               "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "SUBMITIT_EXECUTOR", launch.FROZEN_CONFIG)


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher's variables; afterwards the environment exactly as before (launch.py exports LOCAL_RANK and
    NODE_RANK itself, which a later test's subprocess would otherwise inherit: a DDP child waiting for its rank 0)."""
    saved = dict(os.environ)
    for var in list(os.environ):
        if var in LAUNCH_VARS or var.startswith(("SLURM_", "SUBMITIT_")):
            monkeypatch.delenv(var)
    yield monkeypatch
    monkeypatch.undo()
    os.environ.clear()
    os.environ.update(saved)


def test_a_plain_process_is_no_rank(clean_env):
    assert launch.external_ranks() is None
    assert not launch.is_spawned_child()
    assert launch.submitit_ranks() is None


def test_torchrun_ranks_come_from_its_variables(clean_env):
    clean_env.setenv("TORCHELASTIC_RUN_ID", "x")
    for k, v in dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", GROUP_RANK="1",
                     MASTER_ADDR="10.0.0.1", MASTER_PORT="29500").items():
        clean_env.setenv(k, v)
    r = launch.external_ranks()
    assert (r.launcher, r.rank, r.world_size, r.local_rank, r.node_rank, r.local_world_size, r.num_nodes) == \
        ("torchrun", 3, 4, 1, 1, 2, 2)
    assert (r.address, r.port) == ("10.0.0.1", 29500)
    clean_env.setenv("WORLD_SIZE", "1")                  # torchrun with one process: nothing to share
    assert launch.external_ranks() is None


def test_srun_ranks_come_from_slurm_and_submitit_tasks_are_left_to_the_job(clean_env):
    for k, v in dict(SLURM_NTASKS="8", SLURM_PROCID="5", SLURM_LOCALID="1", SLURM_NODEID="1", SLURM_NNODES="2",
                     SLURM_NTASKS_PER_NODE="4(x2)", SLURM_NODELIST="gpu[07-08]", SLURM_JOB_ID="4242",
                     SLURM_JOB_NAME="train").items():
        clean_env.setenv(k, v)
    r = launch.external_ranks()
    assert (r.launcher, r.rank, r.world_size, r.local_rank, r.node_rank, r.local_world_size) == \
        ("srun", 5, 8, 1, 1, 4)
    assert r.address == "gpu07"                          # the first node hosts rank 0
    clean_env.setenv("SUBMITIT_EXECUTOR", "slurm")       # submitit runs the Hydra job in every task instead
    assert launch.external_ranks() is None
    assert launch.submitit_ranks().launcher == "submitit"


def test_submitit_local_tasks_become_ranks_lightning_can_read(clean_env, tmp_path):
    pytest.importorskip("submitit")
    for k, v in dict(SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_NTASKS="2", SUBMITIT_LOCAL_GLOBALID="1",
                     SUBMITIT_LOCAL_LOCALID="1", SUBMITIT_LOCAL_JOB_ID="31337",
                     SUBMITIT_FOLDER=str(tmp_path / "%j")).items():
        clean_env.setenv(k, v)
    r = launch.submitit_ranks()
    assert (r.rank, r.world_size, r.local_rank) == (1, 2, 1)
    # what Lightning's own environment reads for processes someone else started
    assert os.environ["LOCAL_RANK"] == "1" and os.environ["NODE_RANK"] == "0"
    # both tasks meet in a file of the job's own folder, not on a port another program may hold
    assert r.store_file == str(tmp_path / "31337" / "31337_vitlab_store")


def test_spawned_child_needs_the_frozen_config_and_a_nonzero_local_rank(clean_env, tmp_path):
    clean_env.setenv(launch.FROZEN_CONFIG, str(tmp_path / "config.yaml"))
    clean_env.setenv("LOCAL_RANK", "0")
    assert not launch.is_spawned_child()                 # rank 0 is the Hydra process itself
    clean_env.setenv("LOCAL_RANK", "1")
    assert launch.is_spawned_child()


def _cfg(devices, nodes=1):
    return OmegaConf.create({"trainer": {"devices": devices, "num_nodes": nodes}})


def test_launched_processes_must_match_devices_times_nodes(capsys):
    ranks = launch.Ranks("torchrun", 0, 4, 0, 0, 2, "127.0.0.1", 1)
    launch._check_world(_cfg(2, 2), ranks)
    launch._check_world(_cfg("auto"), ranks)             # left to Lightning
    with pytest.raises(SystemExit) as e:
        launch._check_world(_cfg(2, 1), ranks)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "torchrun started 4 processes" in err and "set trainer.devices=2 trainer.num_nodes=2" in err


def test_a_submitit_task_cannot_start_more_processes(clean_env, capsys):
    clean_env.setenv("SUBMITIT_EXECUTOR", "local")
    launch._check_submitit_tasks(_cfg(1))
    with pytest.raises(SystemExit):
        launch._check_submitit_tasks(_cfg(2))
    assert "hydra.launcher.tasks_per_node=2" in capsys.readouterr().err


def test_job_restores_the_environment_reaps_children_and_closes_lightnings_group(clean_env, tmp_path):
    """What a multirun's next job needs: no LOCAL_RANK / MASTER_PORT left over (Lightning would take them for an
    outside launcher's and wait for processes that never come), no child left, no process group left open."""
    clean_env.setenv("KEEP_ME", "1")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    trainer = SimpleNamespace(strategy=SimpleNamespace(launcher=SimpleNamespace(procs=[child])))
    with launch.job(trainer, tmp_path / "config.yaml"):
        assert os.environ[launch.FROZEN_CONFIG] == str((tmp_path / "config.yaml").resolve())
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29511", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ["KEEP_ME"] = "changed"
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert child.returncode == 0
    assert not dist.is_initialized()
    assert os.environ["KEEP_ME"] == "1"
    for var in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE", launch.FROZEN_CONFIG):
        assert var not in os.environ, var


def test_slurm_launcher_config_gives_one_task_per_gpu_and_a_requeueable_job(tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                                          "trainer.num_nodes=2", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params["_target_"].endswith("SlurmLauncher")
    # as the plugin hands them to submitit (hydra_submitit_launcher.submitit_launcher.BaseSubmititLauncher.launch)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    params = {k if k in base else f"slurm_{k}": v for k, v in params.items()
              if k not in ("_target_", "submitit_folder", "max_num_timeout")}
    fake_bin = tmp_path / "bin"                          # submitit's SLURM executor looks for srun on PATH
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(**params)
    sbatch = executor._executor._make_submission_file_text("python -u -m submitit.core._submit", "uid")
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--requeue",
                 "--signal=USR2@120", "--time=1440", "--cpus-per-task=8"):
        assert f"#SBATCH {line}\n" in sbatch, line
    assert "srun" in sbatch                              # the tasks are srun's: Lightning reads their ranks
