#!/usr/bin/env bash
# The evidence for the dense tasks (experiments/vitdet/README.md, experiments/segmentation/README.md), CPU-sized:
# ViTDet-style Faster R-CNN on BCCD and ViT + UPerNet on CamVid, from scratch, plus the trivial baselines.
#   bash scripts/run_dense_experiments.sh ../shared/data runs/dense
# Two queues run side by side with one thread each (2 cores): about 80 minutes (detection) and 55 (segmentation).
set -euo pipefail
D=$(realpath "${1:?usage: run_dense_experiments.sh SHARED_DATA OUT}")
OUT=$(mkdir -p "${2:?usage: run_dense_experiments.sh SHARED_DATA OUT}" && realpath "$2")
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MPLBACKEND=Agg
T=".venv/bin/vitlab-train trainer.enable_progress_bar=false data.num_workers=1"
E=".venv/bin/vitlab-eval trainer.enable_progress_bar=false split=val"
B=".venv/bin/python scripts/dense_baselines.py"

detection() {
  $B --out $OUT/baseline_bccd.json experiment=vitdet_bccd data.root=$D/bccd/BCCD > $OUT/baseline_bccd.log 2>&1
  $T experiment=vitdet_bccd data.root=$D/bccd/BCCD paths.output_dir=$OUT/vitdet_bccd > $OUT/vitdet_bccd.log 2>&1
  $E ckpt=$OUT/vitdet_bccd/checkpoints/best.ckpt metrics_file=$OUT/vitdet_bccd/eval_best.json
}
segmentation() {
  $B --out $OUT/baseline_camvid.json experiment=upernet_camvid data.root=$D/camvid > $OUT/baseline_camvid.log 2>&1
  $T experiment=upernet_camvid data.root=$D/camvid paths.output_dir=$OUT/upernet_camvid > $OUT/upernet_camvid.log 2>&1
  $E ckpt=$OUT/upernet_camvid/checkpoints/best.ckpt metrics_file=$OUT/upernet_camvid/eval_best.json
  # the linear head on the same backbone and budget, 12 epochs
  $T experiment=upernet_camvid data.root=$D/camvid task.head=linear trainer.max_epochs=12 \
    paths.output_dir=$OUT/linear_camvid > $OUT/linear_camvid.log 2>&1
}
detection & segmentation & wait
echo "done: $OUT"
