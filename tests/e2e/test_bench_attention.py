"""vitlab-bench attention end to end on the CPU with tiny shapes: rows for every backend, math as the
reference (ratio 1, no error), torch's kernels close to it, backends that cannot run here reported with
their reason instead of stopping the run; and a wrong backend name stops before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from vitlab.cli.bench.attention import attention_main, attention_ops_ran

TINY = ["seq_lens=[17,33]", "head_dim=16", "num_heads=2", "batch_size=2", "repeats=2", "warmup=1"]
BACKENDS = ["math", "sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "flash_attn"]


def test_bench_attention_rows_on_cpu(tmp_path: Path):
    out = tmp_path / "attention.json"
    code = f"from vitlab.cli.bench.attention import attention_main; attention_main({[*TINY, f'output_file={out}']!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, check=False,
                          env={k: v for k, v in os.environ.items() if k != "VITLAB_ATTN_BACKEND"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"].startswith("cpu") and result["dtype"] == "float32"
    assert result["torch"] and result["date"] and result["command"].startswith("vitlab-bench attention")
    assert (result["batch_size"], result["num_heads"], result["head_dim"]) == (2, 2, 16)
    rows = {(r["seq_len"], r["backend"]): r for r in result["rows"]}
    assert set(rows) == {(n, b) for n in (17, 33) for b in BACKENDS}
    for n in (17, 33):
        math_row = rows[n, "math"]
        assert math_row["status"] == "ok" and math_row["speedup_vs_math"] == 1.0
        assert math_row["max_abs_err_out"] == 0 and math_row["kernel"] == "math:math"
        for b, kernel, op in (("sdpa", "sdpa:flash", "_scaled_dot_product_flash_attention"),
                              ("sdpa_flash", "sdpa_flash:flash", "_scaled_dot_product_flash_attention")):
            r = rows[n, b]
            assert r["status"] == "ok" and r["kernel"] == kernel, r
            assert r["max_abs_err_out"] < 1e-5 and r["max_abs_err_grad"] < 1e-5
            assert r["ms"] > 0 and len(r["ms_runs"]) == 2 and r["speedup_vs_math"] > 0
            assert any(op in name for name in r["profiler_ops"]) and r["profiler_confirms"] is True
        for b in ("sdpa_efficient", "sdpa_cudnn"):           # no CPU kernels: n/a with torch's reason
            assert rows[n, b]["status"] == "n/a" and "cpu" in rows[n, b]["reason"].lower()
        assert rows[n, "flash_attn"]["status"] == "n/a" and rows[n, "flash_attn"]["reason"]
    assert "n/a: " in proc.stdout and "vs math" in proc.stdout    # progress lines and the table


def test_bad_backend_name_exits_2_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        attention_main([*TINY, "backends=[math,flash]"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'flash'" in err
    for name in ("sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math", "math", "flash_attn", "auto"):
        assert name in err


def test_wrong_key_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        attention_main(["seq_len=[17]"])
    assert exc.value.code == 2 and "seq_lens" in capsys.readouterr().err


def test_attention_ops_ran_sees_the_cpu_flash_kernel():
    import torch

    from vitlab.layers.attention import attention

    q = torch.randn(1, 2, 8, 16)
    ops = attention_ops_ran(lambda: attention(q, q, q, backend="sdpa_flash"))
    assert any("_scaled_dot_product_flash_attention" in op for op in ops), ops
    assert attention_ops_ran(lambda: attention(q, q, q, backend="math")) == []     # matmul + softmax only
