#!/usr/bin/env bash
# Train the FULL-width (width_scale 1.0) dataset-297 reference network on one GPU and export it as
# fp16 safetensors shards (at most 15 MB each) plus tuckerseg_export.json and train.log into $OUT.
# One device call: about 4 minutes of training (--time-budget) + start-up + export; timeout_s 420.
#
# The GPU machine has torch and numpy but not nnU-Net's dependencies, so prepare here first
# (preprocessed data + the pure-Python nnunetv2 / dynamic_network_architectures sources; ~5 MB):
#   .venv/bin/python -m TuckerSegLib.models.train_totalseg_layout --prepare-gpu .gpu_train --width-scale 1.0
# (.gpu_train/ is git-ignored; name it in the call's carry.) Then run there:
#   run(command="bash benchmarks/train_reference_gpu.sh", carry=[".gpu_train"], timeout_s=420)
# and rebuild the TotalSegmentator-layout folder here from the returned files:
#   .venv/bin/python -m TuckerSegLib.models.train_totalseg_layout --import-safetensors <files_at> --out /work/trained/ts297_w32
#   .venv/bin/python -m TuckerSegLib.models.train_totalseg_layout --evaluate --out /work/trained/ts297_w32 --width-scale 1.0
# Knobs (environment): BUDGET seconds of training (230), STEPS cap (4000), CROP (112x112x128 = the patch).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=${CARRY:-.gpu_train}
OUT=${OUT:-/tmp/ts297_gpu_export}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD:$PWD/$CARRY/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
test -f "$CARRY/bundle.npz" || { echo "no $CARRY/bundle.npz: run --prepare-gpu here and carry $CARRY" >&2; exit 2; }
python3 -m TuckerSegLib.models.train_totalseg_layout --bundle "$CARRY/bundle.npz" --device cuda --amp bf16 \
  --width-scale 1.0 --crop "${CROP:-112x112x128}" --steps "${STEPS:-4000}" --time-budget "${BUDGET:-230}" \
  --eval-every 200 --log-every 25 --seed 0 --out /tmp/ts297_w32 \
  --export-safetensors "$OUT" --export-dtype fp16 --max-file-mb 15 "$@" 2>&1 | tee "$OUT/train.log"
ls -la "$OUT"
