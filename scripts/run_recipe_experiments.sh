#!/usr/bin/env bash
# The CIFAR-10 evidence for the recipes (experiments/{mae,dino,deit_distill,sam}/README.md), on the shared
# CIFAR-10 subset, CPU-sized: a 0.45M-parameter ViT (width 96, 4 blocks, patch 4).
#   bash scripts/run_recipe_experiments.sh ../shared/data/cifar10-subset runs/recipes
# Two queues run side by side with one thread each (2 cores): about 100 minutes in all.
set -euo pipefail
D=$(realpath "${1:?usage: run_recipe_experiments.sh CIFAR_ROOT OUT}")
OUT=$(mkdir -p "${2:?usage: run_recipe_experiments.sh CIFAR_ROOT OUT}" && realpath "$2")
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MPLBACKEND=Agg
T=".venv/bin/vitlab-train data.root=$D trainer.enable_progress_bar=false"
E=".venv/bin/vitlab-eval trainer.enable_progress_bar=false"

queue_a() {   # the supervised baseline (scratch), then SAM on the same budget
  for s in 0 1; do $T experiment=cifar10_small seed=$s paths.output_dir=$OUT/scratch_s$s > $OUT/scratch_s$s.log 2>&1; done
  for s in 0 1; do $T experiment=sam_cifar10 seed=$s paths.output_dir=$OUT/sam_s$s > $OUT/sam_s$s.log 2>&1; done
  # control for experiments/mae: the fine-tuning's layer-wise lr decay from a random init
  $T experiment=cifar10_small seed=0 optim.layer_decay=0.75 paths.output_dir=$OUT/scratch_ld_s0 > $OUT/scratch_ld_s0.log 2>&1
}
queue_b() {   # MAE pretraining -> fine-tuning; DINO; distillation from the MAE-fine-tuned model
  $T experiment=mae_cifar10 seed=0 paths.output_dir=$OUT/mae_pre > $OUT/mae_pre.log 2>&1
  for s in 0 1; do
    $T experiment=cifar10_small seed=$s weights=$OUT/mae_pre/checkpoints/last.ckpt optim.layer_decay=0.75 \
      paths.output_dir=$OUT/mae_ft_s$s > $OUT/mae_ft_s$s.log 2>&1
  done
  $T experiment=dino_cifar10 seed=0 paths.output_dir=$OUT/dino > $OUT/dino.log 2>&1
  $T experiment=dino_cifar10 seed=0 optim.lr=5e-4 data.batch_size=64 recipe.momentum_teacher=0.996 trainer.max_epochs=24 \
    sched.warmup_epochs=3 callbacks.knn_monitor.every_n_epochs=3 paths.output_dir=$OUT/dino24 > $OUT/dino24.log 2>&1
  for p in knn linear; do
    for run in dino mae_pre; do $E ckpt=$OUT/$run/checkpoints/last.ckpt protocol=$p metrics_file=$OUT/$run/$p.json; done
  done
  for s in 0 1; do
    $T experiment=distill_cifar10 seed=$s recipe.teacher=$OUT/mae_ft_s0/checkpoints/last.ckpt \
      paths.output_dir=$OUT/distill_s$s > $OUT/distill_s$s.log 2>&1
  done
}
# the kNN / linear reference of an untrained network: one DINO step
$T experiment=dino_cifar10 trainer.max_epochs=1 trainer.limit_train_batches=1 callbacks.knn_monitor.every_n_epochs=0 \
  run_test=false paths.output_dir=$OUT/init > $OUT/init.log 2>&1
for p in knn linear; do $E ckpt=$OUT/init/checkpoints/last.ckpt protocol=$p metrics_file=$OUT/init/$p.json; done
queue_a & queue_b & wait
echo "done: $OUT (metrics.json, history.json, curves.png per run)"
