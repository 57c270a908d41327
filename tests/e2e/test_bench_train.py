"""vitlab-bench train end to end on the CPU: the contract command, the timm reference, memory, MFU, variants."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

FAST = ["bench.steps=3", "bench.warmup=1", "bench.repeats=1", "threads=1"]


@pytest.mark.slow
def test_contract_command_reports_vitlab_timm_and_the_ratio(tmp_path: Path):
    """The issue's command (plus fewer steps): table on stdout, JSON with both images/s and ratio_vs_timm."""
    out = tmp_path / "OUT.json"
    proc = run_cli("vitlab.cli.bench", "train", "backbone=vit_tiny", "data.batch_size=16", f"output_file={out}",
                   *FAST, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    v, t = r["vitlab"], r["timm"]
    assert v["images_per_s"] > 0 and t["images_per_s"] > 0
    assert r["ratio_vs_timm"] == pytest.approx(v["images_per_s"] / t["images_per_s"], rel=1e-9)
    # the reference is the same network: same parameter count and the same FLOPs per image
    assert v["params"] == t["params"] == 5_393_482           # ViT-Ti/16 on 1-channel digits at 64 px, 10 classes
    assert v["gflops_per_image_train"] == pytest.approx(t["gflops_per_image_train"], rel=1e-9)
    # forward + backward is ~3x the forward
    row = r["rows"][0]
    assert 2.5 < row["gflops_per_image_train"] / row["gflops_per_image_fwd"] < 3.5
    # MFU: achieved FLOP/s over the bf16 matmul rate measured in the same run
    assert r["peak_tflops"]["bfloat16"] > 0 and r["peak_tflops"]["float32"] > 0
    achieved = row["gflops_per_image_train"] * row["images_per_s"] / 1e3
    assert row["achieved_tflops"] == pytest.approx(achieved, rel=1e-6)
    assert r["mfu"] == pytest.approx(achieved / r["peak_tflops"]["bfloat16"], rel=1e-6)
    assert v["peak_memory_mib"] > 0 and t["peak_memory_mib"] > 0
    assert len(row["step_ms_all"]) == 3 and r["batch_size"] == 16 and r["precision"] == "32-true"
    # which attention kernel ran: vitlab's record over the training steps, and the profiler's op names (both rows)
    assert sum(row["attention_kernels"].values()) >= 12 * 3 and all(k.startswith("sdpa:") for k in
                                                                   row["attention_kernels"])
    for x in r["rows"]:
        assert any("scaled_dot_product" in op for op in x["attention_ops"]), x["attention_ops"]
    assert "vitlab / timm" in proc.stdout and "MFU" in proc.stdout and "timm" in proc.stdout


@pytest.mark.slow
def test_activation_checkpointing_variant_uses_less_memory(tmp_path: Path):
    """A variant row is the same command plus overrides; per-block checkpointing lowers the peak memory
    (CPU: allocator peak from the profiler) and costs extra compute (recomputed forwards)."""
    out = tmp_path / "ckpt.json"
    proc = run_cli("vitlab.cli.bench", "train", "backbone=vit_tiny", "data.batch_size=32", "bench.reference=null",
                   'bench.variants=["model.activation_checkpointing=true"]', f"output_file={out}", *FAST,
                   timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    base, ckpt = r["rows"]
    assert r["timm"] is None and r["ratio_vs_timm"] is None
    assert ckpt["activation_checkpointing"] and not base["activation_checkpointing"]
    assert ckpt["overrides"] == ["model.activation_checkpointing=true"]
    assert ckpt["peak_memory_mib"] < 0.8 * base["peak_memory_mib"], (base["peak_memory_mib"], ckpt["peak_memory_mib"])
    assert ckpt["gflops_per_image_train"] == pytest.approx(base["gflops_per_image_train"])   # model FLOPs unchanged


@pytest.mark.slow
def test_real_loader_splits_data_and_compute(tmp_path: Path):
    out = tmp_path / "real.json"
    proc = run_cli("vitlab.cli.bench", "train", "backbone=vit_tiny", "data.batch_size=16", "bench.loader=real",
                   "bench.reference=null", "bench.memory=false", f"output_file={out}", *FAST, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(out.read_text())["rows"][0]
    assert row["loader"] == "real" and row["data"] == "digits"
    assert row["data_ms"] > 0 and 0 < row["data_fraction"] < 1
    assert row["step_ms"] == pytest.approx(row["data_ms"] + row["compute_ms"], rel=0.5)
    assert row["peak_memory_mib"] is None


@pytest.mark.parametrize("args, needle", [
    (["bench.loader=disk"], "bench.loader must be synthetic or real"),
    (["trainer.devices=2"], "measures one device"),
    (["bench.stps=3"], "bench.steps"),
])
def test_bad_settings_stop_with_exit_2(args, needle):
    proc = run_cli("vitlab.cli.bench", "train", "backbone=vit_tiny", *args, "bench.matmul_size=64", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr
