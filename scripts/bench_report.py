"""Markdown tables from the JSON files of `vitlab-bench train` and `vitlab-bench attention` in a folder.

    python scripts/bench_report.py OUTDIR          # e.g. after scripts/run_benchmarks.sh gpu OUTDIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def train_table(path: Path, r: dict) -> str:
    peak = r["peak_tflops"]
    lines = [f"### {path.stem}", "",
             f"`{r.get('command', '')}`", "",
             f"{r['device']}, torch {r['torch']}, batch {r['batch_size']}, img {r['img_size']}, {r['precision']}, "
             f"{r['loader']} data, median of {r['steps']} steps after {r['warmup']}; measured matmul peak: "
             + ", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in peak.items()) + f"; {r['date']}", "",
             "| run | images/s | step ms | data ms | peak MiB | GFLOP/img (train) | TFLOP/s | MFU (bf16 peak) | vs timm |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        mem = f"{row['peak_memory_mib']:,.0f}" if row.get("peak_memory_mib") is not None else "n/a"
        ratio = f"{row['ratio_vs_timm']:.2f}x" if row.get("ratio_vs_timm") is not None else ""
        lines.append(f"| {row['name']} | {row['images_per_s']:,.1f} | {row['step_ms']:.1f} | {row['data_ms']:.1f} | "
                     f"{mem} | {row['gflops_per_image_train']:.2f} | {row['achieved_tflops']:.3f} | "
                     f"{100 * row['mfu']:.1f}% | {ratio} |")
    return "\n".join(lines)


def attention_table(path: Path, r: dict) -> str:
    rows = r["rows"]
    backends = list(dict.fromkeys(x["backend"] for x in rows))
    lens = list(dict.fromkeys(x["seq_len"] for x in rows))
    by = {(x["seq_len"], x["backend"]): x for x in rows}
    lines = [f"### {path.stem}", "",
             f"{r['device']}, torch {r['torch']}, {r['dtype']}, batch {r['batch_size']}, {r['num_heads']} heads x "
             f"{r['head_dim']}; forward + backward ms (speed-up over math); {r['date']}", "",
             "| N | " + " | ".join(backends) + " |", "|---:|" + "---:|" * len(backends)]
    for n in lens:
        cells = []
        for b in backends:
            x = by.get((n, b))
            if x is None or x["status"] != "ok":
                cells.append("n/a")
            else:
                cells.append(f"{x['ms']:.2f} ({x['speedup_vs_math']:.2f}x)")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    parts = []
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        if "ratio_vs_timm" in r:
            parts.append(train_table(path, r))
        elif r.get("rows") and "seq_len" in r["rows"][0]:
            parts.append(attention_table(path, r))
    print("\n\n".join(parts) if parts else f"no vitlab-bench JSON files in {folder}")


if __name__ == "__main__":
    main()
