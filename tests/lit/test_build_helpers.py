"""vitlab.lit.build pieces that need no Hydra run: precision, device count, loggers (wandb offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from vitlab.lit import build

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------- precision ---

@pytest.mark.parametrize("accelerator", ["cpu", "auto", "gpu"])
def test_auto_precision_is_32_without_cuda(monkeypatch, accelerator):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert build.resolve_precision("auto", accelerator) == "32-true"


def test_auto_precision_on_cpu_even_with_a_gpu_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert build.resolve_precision("auto", "cpu") == "32-true"


@pytest.mark.parametrize("bf16,expected", [(True, "bf16-mixed"), (False, "32-true")])
@pytest.mark.parametrize("accelerator", ["gpu", "cuda", "auto"])
def test_auto_precision_on_gpu_follows_bf16_support(monkeypatch, accelerator, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert build.resolve_precision("auto", accelerator) == expected


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed", "bf16-true", "64-true", 32, 16, "32"])
@pytest.mark.parametrize("accelerator", ["cpu", "gpu"])
def test_explicit_precision_passes_through(precision, accelerator):
    assert build.resolve_precision(precision, accelerator) == precision


# ----------------------------------------------------------------- devices ---

@pytest.mark.parametrize("devices,expected", [(1, 1), (4, 4), ([0, 1], 2), ((0, 2, 3), 3), ("3", 3), ("1", 1)])
def test_num_devices_explicit(devices, expected):
    assert build._num_devices(devices, "gpu") == expected
    assert build._num_devices(devices, "cpu") == expected


@pytest.mark.parametrize("devices", ["auto", -1, "-1"])
def test_num_devices_auto_counts_visible_gpus(monkeypatch, devices):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert build._num_devices(devices, "gpu") == 8
    assert build._num_devices(devices, "auto") == 8
    assert build._num_devices(devices, "cpu") == 1


@pytest.mark.parametrize("devices", ["auto", -1])
def test_num_devices_auto_without_cuda_is_one(monkeypatch, devices):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert build._num_devices(devices, "auto") == 1


def test_num_devices_comma_separated_gpu_indices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert build._num_devices("0,1", "gpu") == 2


def test_num_devices_from_a_listconfig(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    devices = OmegaConf.create({"trainer": {"devices": [0, 1]}}).trainer.devices
    assert build._num_devices(devices, "gpu") == 2


# ----------------------------------------------------------------- loggers ---

def _wandb_cfg(save_dir: Path, offline="auto"):
    return OmegaConf.create({"logger": {"wandb": {
        "_target_": "pytorch_lightning.loggers.WandbLogger", "project": "vitlab-test", "save_dir": str(save_dir),
        "offline": offline, "log_model": False, "name": None}}})


@pytest.fixture
def clean_wandb_env(monkeypatch, tmp_path):
    """No API key, no .netrc (HOME is a temporary folder), wandb files kept in tmp_path; env restored after."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_SILENT", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    return tmp_path


def test_no_loggers_and_null_entries():
    assert build._loggers(OmegaConf.create({}), None) == []
    assert build._loggers(OmegaConf.create({"logger": None}), None) == []
    assert build._loggers(OmegaConf.create({"logger": {"wandb": None}}), None) == []


def test_other_loggers_are_instantiated_unchanged(tmp_path, clean_wandb_env):
    cfg = OmegaConf.create({"logger": {"csv": {"_target_": "pytorch_lightning.loggers.CSVLogger",
                                               "save_dir": str(tmp_path), "name": "x"}}})
    (lg,) = build._loggers(cfg, "some-id")
    assert type(lg).__name__ == "CSVLogger"
    assert "WANDB_MODE" not in os.environ


def test_wandb_without_credentials_goes_offline(clean_wandb_env):
    (lg,) = build._loggers(_wandb_cfg(clean_wandb_env), None)
    assert type(lg).__name__ == "WandbLogger"
    assert lg._offline is True
    assert os.environ["WANDB_MODE"] == "offline"


def test_wandb_with_an_api_key_stays_online(clean_wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    (lg,) = build._loggers(_wandb_cfg(clean_wandb_env), None)
    assert lg._offline is False
    assert os.environ.get("WANDB_MODE") != "offline"


def test_wandb_with_a_netrc_login_stays_online(clean_wandb_env):
    (clean_wandb_env / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
    (lg,) = build._loggers(_wandb_cfg(clean_wandb_env), None)
    assert lg._offline is False


def test_wandb_explicit_offline_true(clean_wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    (lg,) = build._loggers(_wandb_cfg(clean_wandb_env, offline=True), None)
    assert lg._offline is True
    assert os.environ["WANDB_MODE"] == "offline"


def test_wandb_resumes_the_checkpoints_run_id(clean_wandb_env):
    (lg,) = build._loggers(_wandb_cfg(clean_wandb_env), "run1234")
    assert lg.version == "run1234"
    (fresh,) = build._loggers(_wandb_cfg(clean_wandb_env), None)
    assert fresh.version != "run1234"


_WANDB_SCRIPT = textwrap.dedent('''
    import json, os, sys
    from omegaconf import OmegaConf
    from vitlab.lit import build

    save_dir = sys.argv[1]
    cfg = OmegaConf.create({"logger": {"wandb": {
        "_target_": "pytorch_lightning.loggers.WandbLogger", "project": "vitlab-test", "save_dir": save_dir,
        "offline": "auto", "log_model": False, "name": None}}})
    loggers = build._loggers(cfg, None)
    mode_after_build = os.environ.get("WANDB_MODE")
    lg = loggers[0]
    lg.log_metrics({"val/top1": 0.5}, step=0)
    run = lg.experiment
    info = {"n": len(loggers), "type": type(lg).__name__, "mode_after_build": mode_after_build,
            "run_offline": bool(getattr(run, "offline", False)), "run_id": run.id}
    import wandb
    wandb.finish()
    print("RESULT " + json.dumps(info), flush=True)
''')


def test_wandb_offline_run_never_prompts(tmp_path):
    """End to end in a fresh process with no credentials and stdin closed: offline, logs, finishes, no prompt."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), WANDB_DIR=str(tmp_path), WANDB_CACHE_DIR=str(tmp_path / "cache"),
               WANDB_CONFIG_DIR=str(tmp_path / "config"), MPLBACKEND="Agg", PYTHONUNBUFFERED="1",
               MPLCONFIGDIR=os.environ.get("MPLCONFIGDIR", str(Path.home() / ".config" / "matplotlib")))
    script = tmp_path / "run_wandb.py"
    script.write_text(_WANDB_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    info = json.loads(line[len("RESULT "):])
    assert info["n"] == 1 and info["type"] == "WandbLogger"
    assert info["mode_after_build"] == "offline"
    assert info["run_offline"] is True
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{info['run_id']}"))
    assert len(runs) == 1, sorted(p.name for p in (tmp_path / "wandb").iterdir())
    assert any(p.suffix == ".wandb" and p.stat().st_size > 0 for p in runs[0].iterdir())


# --------------------------------------------------------------------- EMA ---

@pytest.mark.parametrize("task, enabled, warmup, expected", [
    ("vitlab.tasks.ClassificationTask", "auto", "auto", None),                    # classification: off
    ("vitlab.tasks.DiffusionTask", "auto", "auto", {"warmup": True}),           # diffusion samples with EMA weights
    ("vitlab.tasks.DiffusionTask", False, "auto", None),                         # the user turns it off
    ("vitlab.tasks.ClassificationTask", True, "auto", {"warmup": False}),        # on by hand: warm-up as before
    ("vitlab.tasks.DiffusionTask", "auto", False, {"warmup": False}),
])
def test_ema_auto_follows_the_task(task, enabled, warmup, expected):
    cfg = OmegaConf.create({"task": {"_target_": task}, "trainer": {"strategy": "auto"},
                            "ema": {"enabled": enabled, "decay": 0.999, "warmup": warmup, "update_every": 1,
                                    "evaluate": True}})
    got = build._ema_options(cfg)
    if expected is None:
        assert got is None
    else:
        assert got["enabled"] is True and got["warmup"] is expected["warmup"] and got["decay"] == 0.999


# ------------------------------------------------------ the built trainer ---

def test_the_trainer_build_run_makes_writes_checkpoints_atomically(tmp_path, monkeypatch):
    """The trainer of a real run (build_run) writes through vitlab.io: a crash mid-write keeps the previous
    checkpoint and leaves no temporary file, and checkpoints get the usual permissions (0666 less the umask; the
    temporary files of other writers are 0600)."""
    import stat

    from hydra import compose, initialize_config_dir

    from vitlab.lit.callbacks import AtomicCheckpointIO

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=digits_vit", f"paths.output_dir={tmp_path}", "logger=[]",
                                          "backbone.depth=1", "backbone.embed_dim=32", "backbone.num_heads=2"])
    run = build.build_run(cfg)
    io = run.trainer.strategy.checkpoint_io
    assert isinstance(io, AtomicCheckpointIO)
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    probe = tmp_path / "probe"
    probe.write_text("x")
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(probe.stat().st_mode)

    def crash(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
