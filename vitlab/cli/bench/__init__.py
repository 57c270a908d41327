"""vitlab-bench: throughput benchmarks, each reported as a ratio against a reference measured in the same run.

    vitlab-bench train backbone=vit_tiny data.batch_size=16 output_file=OUT.json     (vitlab/cli/bench/train.py)
    vitlab-bench attention seq_lens=[197,577] output_file=a.json                     (vitlab/cli/bench/attention.py)

    vitlab-bench data data=cifar10 data.root=../shared/data/cifar10-subset workers=[0,1,2] output_file=b.json
    vitlab-bench data data=imagefolder data.root=DIR data.img_size=224

Subcommands live in :data:`SUBCOMMANDS` (name -> module, one-line help); each module (``data``, ``train``,
``attention``) has ``main(argv)`` and imports the shared helpers from :mod:`vitlab.cli.bench.common`. A new
benchmark is a module here and a row there. ``data`` is described in :mod:`vitlab.cli.bench.data`.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

from vitlab.cli.bench.common import PROG

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("vitlab.cli.bench.train", "training images/s, memory, FLOPs and MFU of a config vs the equivalent timm "
                                        "model"),
    "attention": ("vitlab.cli.bench.attention", "attention kernels (fwd + bwd) on ViT shapes, each backend vs the "
                                                "math path"),
    "data": ("vitlab.cli.bench.data", "data loading + augmentation throughput: vitlab's pipelines vs references"),
}


def usage() -> str:
    width = max(len(n) for n in SUBCOMMANDS)
    lines = [f"usage: {PROG} <subcommand> [hydra overrides]", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", f"e.g. {PROG} train backbone=vit_tiny data.batch_size=16 output_file=train.json",
              f"     {PROG} attention seq_lens=[197,577] output_file=attention.json",
              f"     {PROG} data data=cifar10 data.root=DIR workers=[0,1,2] output_file=bench.json"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the profiler (memory, kernel names) would print a kineto error line per use on machines without a GPU
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    if argv and argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if not argv or argv[0] not in SUBCOMMANDS:
        problem = f"unknown subcommand {argv[0]!r}" if argv else "no subcommand given"
        print(f"{PROG}: error: {problem}; choose one of {', '.join(SUBCOMMANDS)}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    importlib.import_module(SUBCOMMANDS[argv[0]][0]).main(argv[1:])
