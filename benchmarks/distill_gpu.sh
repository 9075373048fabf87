#!/usr/bin/env bash
# Distil the full-width 3 mm TotalSegmentator-layout network (dataset 297) at 30 % and 50 % of
# the MACs on one GPU (H100/H200), fast recipe against classic, each run capped; prints agreement
# before/after on the held-out part of example_ct, wall time and steps/s (benchmarks/bench_distill.py).
# About 8 minutes: 2 ratios x (budget compression + 2 x MINUTES of distillation + predictions).
#
# Needs TuckerSeg and its dependencies (nnunetv2, nibabel, SimpleITK) importable, example_ct.nii.gz
# in $TUCKERSEG_TEST_DATA, and the trained full-width weights as a model folder, e.g. rebuilt from
# exported safetensors shards:
#   python -m TuckerSegLib.models.train_totalseg_layout --import-safetensors SHARDS --out ROOT
# Usage: bash benchmarks/distill_gpu.sh ROOT [more bench_distill.py args; later ones win]
# Not yet run on a GPU (see README, "Recover quality at high compression").
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:?usage: distill_gpu.sh WEIGHTS_ROOT [bench_distill args]}
shift
MODEL=$(ls -d "$ROOT"/Dataset297_*/*__nnUNetPlans__3d_fullres | head -n 1)
OUT=${OUT:-benchmarks/results/distill_gpu}
MINUTES=${MINUTES:-1.5}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} python3 benchmarks/bench_distill.py \
  --model "$MODEL" --device cuda --ratios 0.3 0.5 --recipes fast classic --minutes "$MINUTES" \
  --batch-size 2 --pool 128 --val-patches 2 --eval-every 50 --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
