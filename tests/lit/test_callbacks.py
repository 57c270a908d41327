"""AtomicCheckpointIO and RunArtifacts (driven by a tiny real Lightning run). The atomic writer itself: tests/test_io.py."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import new_file_mode
from vitlab.lit import callbacks
from vitlab.lit.callbacks import AtomicCheckpointIO, RunArtifacts


def _ckpt(value: float) -> dict:
    return {"state_dict": {"w": torch.full((3, 4), value)}, "epoch": int(value), "meta": {"name": f"v{value}"}}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert torch.equal(a["state_dict"]["w"], b["state_dict"]["w"])
    assert a["epoch"] == b["epoch"] and a["meta"] == b["meta"]


def _crashing_save(written: list):
    def save(obj, f, *args, **kwargs):
        f.write(b"PARTIAL-CHECKPOINT-BYTES" * 100)
        written.append(getattr(f, "name", None))
        raise OSError(28, "No space left on device")
    return save


# --------------------------------------------------------- checkpoint IO ---

def test_save_checkpoint_writes_a_loadable_file(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"            # the folder does not exist yet
    io.save_checkpoint(_ckpt(1.0), path)
    _assert_same(torch.load(path, weights_only=False), _ckpt(1.0))
    _assert_same(io.load_checkpoint(path), _ckpt(1.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_save_checkpoint_accepts_string_paths_and_overwrites(tmp_path):
    io = AtomicCheckpointIO()
    path = str(tmp_path / "last.ckpt")
    io.save_checkpoint(_ckpt(1.0), path)
    io.save_checkpoint(_ckpt(2.0), path)
    _assert_same(torch.load(path, weights_only=False), _ckpt(2.0))
    assert os.listdir(tmp_path) == ["last.ckpt"]


@pytest.mark.parametrize("exc", [OSError, KeyboardInterrupt])
def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, exc):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(_ckpt(1.0), path)
    size_before = path.stat().st_size

    written: list = []
    crash = _crashing_save(written)
    if exc is KeyboardInterrupt:
        def crash(obj, f, *a, **k):                          # noqa: F811  (Ctrl-C mid-write)
            f.write(b"PARTIAL")
            written.append(f.name)
            raise KeyboardInterrupt
    monkeypatch.setattr(callbacks.torch, "save", crash)
    with pytest.raises(exc):
        io.save_checkpoint(_ckpt(2.0), path)
    monkeypatch.undo()

    assert written, "the fake torch.save was not called: the test did not exercise the crash"
    assert path.stat().st_size == size_before
    _assert_same(torch.load(path, weights_only=False), _ckpt(1.0))
    assert os.listdir(tmp_path) == ["last.ckpt"], "a temporary file was left behind"


def test_crash_during_first_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(callbacks.torch, "save", _crashing_save([]))
    with pytest.raises(OSError):
        AtomicCheckpointIO().save_checkpoint(_ckpt(1.0), tmp_path / "epoch=0.ckpt")
    assert os.listdir(tmp_path) == []


def test_checkpoint_gets_the_usual_file_permissions(tmp_path):
    """Checkpoints must stay readable to whoever could read a plainly written file (a lab group)."""
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(_ckpt(1.0), path)
    assert stat.S_IMODE(path.stat().st_mode) == new_file_mode(tmp_path)


def test_trainer_save_checkpoint_goes_through_the_plugin(tmp_path, tiny_fit, monkeypatch):
    trainer, module, _ = tiny_fit(plugins=[AtomicCheckpointIO()], config={"seed": 7})
    calls = []
    real = AtomicCheckpointIO.save_checkpoint

    def spy(self, checkpoint, path, storage_options=None):
        calls.append(Path(path))
        return real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", spy)
    trainer.save_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert calls == [tmp_path / "ckpt" / "last.ckpt"]
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert ckpt["vitlab"]["config"] == {"seed": 7}
    assert ckpt["global_step"] == trainer.global_step == 3
    assert set(ckpt["state_dict"]) == set(module.state_dict())


# ------------------------------------------------------- run artifacts ---

@pytest.fixture(scope="module")
def artifacts_run(tiny_fit, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    trainer, module, dm = tiny_fit(callbacks=[RunArtifacts(str(out))])
    after_fit = {
        "metrics": json.loads((out / "metrics.json").read_text()),
        "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "global_step": trainer.global_step,
    }
    trainer.test(module, datamodule=dm, verbose=False)
    after_test = {"metrics": json.loads((out / "metrics.json").read_text()),
                  "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}}
    return {"out": out, "fit": after_fit, "test": after_test}


def test_run_writes_the_three_artifacts_and_no_temporary_files(artifacts_run):
    names = sorted(os.listdir(artifacts_run["out"]))
    assert names == ["curves.png", "history.json", "metrics.json"]


def test_metrics_json_has_flat_final_keys(artifacts_run):
    m = artifacts_run["fit"]["metrics"]
    for key in ("val/top1", "val/top5", "val/loss", "train/loss", "train/top1", "train/global_step",
                "train/epochs", "train/seconds"):
        assert key in m, f"{key} missing from metrics.json: {sorted(m)}"
    # Lightning's per-step / per-epoch variants are folded into one flat key each
    assert not any(k.endswith(("_step", "_epoch")) for k in m if k != "train/global_step"), sorted(m)
    assert all(isinstance(v, (int, float)) for v in m.values())
    assert m["train/global_step"] == artifacts_run["fit"]["global_step"] == 3
    assert m["train/epochs"] == 1
    assert m["train/seconds"] >= 0
    assert 0.0 <= m["val/top1"] <= m["val/top5"] <= 1.0


def test_metrics_json_values_are_the_trainers_final_metrics(artifacts_run):
    m, cm = artifacts_run["fit"]["metrics"], artifacts_run["fit"]["callback_metrics"]
    for key in ("val/top1", "val/top5", "val/loss", "train/top1"):
        assert m[key] == pytest.approx(cm[key])
    assert m["train/loss"] == pytest.approx(cm["train/loss_epoch"])


def test_test_run_adds_its_metrics_and_keeps_the_fit_ones(artifacts_run):
    m, cm = artifacts_run["test"]["metrics"], artifacts_run["test"]["callback_metrics"]
    for key in ("test/top1", "test/top5", "test/loss"):
        assert m[key] == pytest.approx(cm[key])
    for key, value in artifacts_run["fit"]["metrics"].items():
        assert m[key] == value


def test_history_json_has_steps_and_epochs(artifacts_run):
    h = json.loads((artifacts_run["out"] / "history.json").read_text())
    steps = h["steps"]
    assert [s for s, _ in steps] == [1, 2, 3]
    assert all(isinstance(l, float) and l > 0 for _, l in steps)
    assert len(h["epochs"]) == 1
    ep = h["epochs"][0]
    assert ep["epoch"] == 0 and ep["step"] == 3
    m = artifacts_run["fit"]["metrics"]
    assert ep["val/loss"] == pytest.approx(m["val/loss"])
    assert ep["val/top1"] == pytest.approx(m["val/top1"])
    assert ep["train/loss_epoch"] == pytest.approx(m["train/loss"])
    # the epoch's train loss is the mean of the step losses (equal batch sizes)
    assert ep["train/loss_epoch"] == pytest.approx(sum(l for _, l in steps) / len(steps), rel=1e-5)


def test_curves_png_is_a_valid_image(artifacts_run):
    path = artifacts_run["out"] / "curves.png"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert w > 200 and h > 100
        im.load()
        assert len(set(im.convert("L").getdata())) > 2, "the plot is blank"


def test_nothing_is_written_without_any_metric(tmp_path):
    """An empty run makes no empty plot."""
    cb = RunArtifacts(str(tmp_path / "run"))
    cb._save_plot()
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------ progress bar ---

class _SpyBar(callbacks.ProgressBar):
    """Records the global step of every metric read made while a training batch ends."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.reads: list[int] = []
        self._in_batch = False

    def on_train_batch_end(self, trainer, *args):
        self._in_batch = True
        try:
            super().on_train_batch_end(trainer, *args)
        finally:
            self._in_batch = False

    def get_metrics(self, trainer, pl_module):
        if self._in_batch:
            self.reads.append(trainer.global_step)
        return super().get_metrics(trainer, pl_module)


def test_progress_bar_reads_metrics_only_on_logging_steps(tiny_fit):
    bar = _SpyBar(refresh_rate=1)
    tiny_fit(callbacks=[bar], enable_progress_bar=True, limit_train_batches=5, log_every_n_steps=2)
    assert bar.reads == [2, 4]                      # after batches 2 and 4 of 5 (global step already counted)
    assert bar.train_progress_bar.n == 5            # ... while the bar itself advanced on every batch
    postfix = bar.train_progress_bar.postfix
    for shown in ("train/loss=", "img/s=", "eta=", "val/top1="):
        assert shown in postfix, postfix


def test_progress_bar_is_lightnings_progress_bar_with_its_refresh_rate():
    from pytorch_lightning.callbacks.progress import ProgressBar as LightningProgressBar

    bar = callbacks.ProgressBar(refresh_rate=7)
    assert isinstance(bar, LightningProgressBar)    # what lit/build.py checks for trainer.enable_progress_bar=false
    assert bar.refresh_rate == 7 and bar.step_metrics == ("train/loss",)
