#!/usr/bin/env bash
# The issue-4 benchmark set, one JSON per benchmark in OUTDIR, then the markdown tables (scripts/bench_report.py).
#   bash scripts/run_benchmarks.sh gpu OUTDIR     # on an H100/H200: the targets of experiments/benchmarks/README.md
#   bash scripts/run_benchmarks.sh cpu OUTDIR     # CPU-sized versions (about 15 minutes on 2 cores)
# data=imagenet without the dataset on disk: the bench trains on a synthetic resident batch with ImageNet's shape
# (3 x 224 x 224, 1000 classes), so the timm reference is exactly vit_{small,base}_patch16_224.
set -euo pipefail
kind=${1:?usage: run_benchmarks.sh gpu|cpu OUTDIR}
out=${2:?usage: run_benchmarks.sh gpu|cpu OUTDIR}
mkdir -p "$out"
bench=${VITLAB_BENCH:-vitlab-bench}
IMAGENET=(data=imagenet data.root=/nonexistent/imagenet)

if [ "$kind" = gpu ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" || true
  # attention, bf16, ViT shapes, forward + backward: every backend against math
  $bench attention output_file="$out/attention.json"
  # ViT-B/16 and ViT-S/16 at 224 px, bf16-mixed: vitlab (compiled) vs timm (eager), plus eager and checkpointed rows
  for size in base small; do
    $bench train backbone=vit_$size "${IMAGENET[@]}" data.batch_size=256 trainer.precision=bf16-mixed \
      model.compile=true bench.warmup=8 bench.steps=30 bench.repeats=2 \
      'bench.variants=["model.compile=false", "model.activation_checkpointing=true"]' \
      output_file="$out/train_vit_$size.json"
  done
  # the same with timm compiled too (like for like)
  $bench train backbone=vit_base "${IMAGENET[@]}" data.batch_size=256 trainer.precision=bf16-mixed \
    model.compile=true bench.reference_compile=true bench.warmup=8 bench.steps=30 output_file="$out/train_vit_base_both_compiled.json"
  # the GPU-only tests (kernel parity, host-sync guard under CUDA)
  python -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/pytest_gpu.txt"
elif [ "$kind" = cpu ]; then
  $bench train backbone=vit_tiny data.batch_size=16 output_file="$out/train_contract.json"
  $bench train backbone=vit_tiny data.batch_size=16 trainer.precision=bf16-mixed output_file="$out/train_contract_bf16.json"
  $bench train backbone=vit_small "${IMAGENET[@]}" data.batch_size=16 bench.steps=5 \
    'bench.variants=["model.activation_checkpointing=true", "model.compile=true bench.warmup=3"]' \
    output_file="$out/train_vit_small.json"
  $bench attention batch_size=8 repeats=5 output_file="$out/attention.json"
else
  echo "run_benchmarks.sh: the first argument is gpu or cpu, got '$kind'" >&2
  exit 2
fi
python "$(dirname "$0")/bench_report.py" "$out" | tee "$out/report.md"
