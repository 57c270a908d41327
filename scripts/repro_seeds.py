#!/usr/bin/env python
"""Run one vitlab-train configuration over several seeds and summarise the metrics.

    python scripts/repro_seeds.py --seeds 0 1 2 --out runs/digits_seeds -- experiment=digits_vit

Each seed trains into OUT/seed<N>/; OUT/summary.json and OUT/summary.md hold
mean, std, min and max of every numeric metric in the runs' metrics.json.
This is how the numbers in experiments/*/README.md are produced.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--keys", nargs="*", default=["test/top1", "val/top1", "val/best_top1", "train/seconds"])
    ap.add_argument("overrides", nargs="*", help="vitlab-train overrides (after --)")
    args = ap.parse_args()

    runs = {}
    for seed in args.seeds:
        out = args.out / f"seed{seed}"
        cmd = [sys.executable, "-m", "vitlab.cli.train", *args.overrides, f"seed={seed}", f"paths.output_dir={out}",
               "trainer.enable_progress_bar=false"]
        print(f"[seed {seed}] {' '.join(cmd[2:])}", flush=True)
        t0 = time.time()
        p = subprocess.run(cmd)
        if p.returncode != 0:
            print(f"[seed {seed}] failed with exit code {p.returncode}", file=sys.stderr)
            return p.returncode
        runs[seed] = json.loads((out / "metrics.json").read_text())
        shown = ", ".join(f"{k} {runs[seed][k]:.4f}" for k in args.keys if k in runs[seed])
        print(f"[seed {seed}] {shown} ({time.time() - t0:.0f} s wall)", flush=True)

    summary = {}
    for key in args.keys:
        vals = [r[key] for r in runs.values() if key in r]
        if vals:
            summary[key] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals), "min": min(vals),
                            "max": max(vals), "values": vals}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps({"overrides": args.overrides, "seeds": args.seeds,
                                                       "metrics": summary}, indent=2))
    lines = ["| metric | mean | std | min | max |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['mean']:.4f} | {v['std']:.4f} | {v['min']:.4f} | {v['max']:.4f} |" for k, v in summary.items()]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
