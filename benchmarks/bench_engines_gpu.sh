#!/usr/bin/env bash
# GPU per-patch benchmark (one short run; fits a 10-minute device call on an H100/H200).
# Stock = PyTorch eager with fp16 autocast (what nnU-Net/TotalSegmentator do on CUDA), dense.
# TuckerSeg = torch engine fp16 with measured layer forms; eager or torch.compile (CUDA graphs), in
# standard or channels-last layout, whichever measured fastest.
# The dense network comes first, then the ratios in the order given, each logged as it finishes.
# Usage: bash benchmarks/bench_engines_gpu.sh [extra tuckerseg bench args; later ones win]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export TUCKERSEG_TORCH_COMPILE=${TUCKERSEG_TORCH_COMPILE:-1}
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} python3 benchmarks/bench_engines.py --progress none --device cuda \
  --archs 1.5mm --policies paper --ratios 0.3 0.5 0.1 \
  --configs torch:fp16 --layer-forms auto --reps 10 --warmup 3 \
  --cache-dir "${CACHE:-/tmp/tuckerseg-gpu-cache}" --json "$OUT/bench_engines_gpu.json" "$@"
