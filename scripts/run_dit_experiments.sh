#!/usr/bin/env bash
# The evidence for the diffusion task (experiments/dit/README.md), CPU-sized: a ViT classifier on MNIST (the judge),
# then two class-conditional DiTs (DDPM as DiT, rectified flow), their samples scored per class by the judge.
#   bash scripts/run_dit_experiments.sh ../shared/data runs/dit
# The three trainings run side by side with one thread each (as measured, on 2 cores): about 75 minutes, then the
# scoring (about 10 minutes).
set -euo pipefail
D=$(realpath "${1:?usage: run_dit_experiments.sh SHARED_DATA OUT}")
OUT=$(mkdir -p "${2:?usage: run_dit_experiments.sh SHARED_DATA OUT}" && realpath "$2")
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MPLBACKEND=Agg
T=".venv/bin/vitlab-train trainer.enable_progress_bar=false data.root=$D/mnist"
S=".venv/bin/vitlab-sample eval_per_class=50 classifier=$OUT/classifier/checkpoints/best.ckpt"

dit() {     # $1: objective
  $T experiment=dit_mnist task.objective=$1 paths.output_dir=$OUT/$1 > $OUT/$1.log 2>&1
}
$T experiment=vit_mnist paths.output_dir=$OUT/classifier > $OUT/classifier.log 2>&1 & dit ddpm & dit flow & wait
for obj in ddpm flow; do
  for g in 1.0 4.0; do
    $S ckpt=$OUT/$obj/checkpoints/last.ckpt guidance=$g out=$OUT/$obj/samples_eval > $OUT/sample_${obj}_g$g.log 2>&1 &
  done
  wait
done
echo "done: $OUT"
