"""Does a network answer the same on a crop as on the whole patch? (why distillation trains on patches)

Why: nnU-Net's blocks normalise with InstanceNorm over the whole input, so the statistics a layer
sees depend on how much of the CT (and of the padding) the input holds. If the original network's
answers on a smaller crop differ from its answers on the same voxels inside a whole patch, a
student distilled on such crops learns another function than the one it replaces at inference
(where it always sees whole patches). This prints, per crop size, the original's argmax on the
crop against its argmax on the same voxels predicted in a whole patch: voxel agreement and mean
Dice over the foreground classes either finds, averaged over ``--patches`` patches.

Example (2 CPU cores, ~2 minutes)::

    python benchmarks/bench_crop_context.py --model /work/trained/ts297_w32/Dataset297_*/*__3d_fullres \\
        --ct /tmp/split/example_ct_train.nii.gz --crops 32x64x64 64x64x64 64x96x96 96x96x96
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from TuckerSegLib.compression.ct_patches import PatchSampler, preprocess
from TuckerSegLib.finetune.agreement import mean_dice
from TuckerSegLib.models.nnunet_folder import load_model_folder


def main(argv: Sequence[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="trained nnU-Net model folder")
    p.add_argument("--ct", type=Path, required=True, help="a CT (NIfTI)")
    p.add_argument("--crops", nargs="+", default=["32x64x64", "64x64x64", "64x96x96", "96x96x96"])
    p.add_argument("--patches", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model_folder(args.model)
    net = model.network.eval()
    cases = preprocess(model, [args.ct])
    patches = PatchSampler(cases, model.patch_size).fixed_patches(args.patches, seed=1)
    crops = [tuple(int(v) for v in c.split("x")) for c in args.crops]
    rows = {c: {"voxel": [], "mean_dice": [], "seconds": []} for c in crops}
    with torch.no_grad():
        for x in patches:
            x = x[None]
            full = net(x).argmax(1)
            for crop in crops:
                o = [(s - c) // 2 for s, c in zip(x.shape[2:], crop)]
                sl = tuple(slice(a, a + c) for a, c in zip(o, crop))
                t0 = time.perf_counter()
                on_crop = net(x[(slice(None), slice(None)) + sl]).argmax(1)
                rows[crop]["seconds"].append(time.perf_counter() - t0)
                ref = full[(slice(None),) + sl]
                rows[crop]["voxel"].append(float((on_crop == ref).float().mean()))
                rows[crop]["mean_dice"].append(mean_dice(on_crop, ref, model.num_classes))
    print(f"model {args.model}, patch {list(model.patch_size)}, CT {args.ct.name}, {len(patches)} patches, "
          f"{torch.get_num_threads()} threads")
    print("| crop | voxel agreement with whole-patch answers | mean Dice | forward s |")
    print("| --- | ---: | ---: | ---: |")
    out = []
    for crop, r in rows.items():
        row = {"crop": list(crop), **{k: round(sum(v) / len(v), 4) for k, v in r.items()}}
        out.append(row)
        print(f"| {'x'.join(map(str, crop))} | {row['voxel']:.3f} | {row['mean_dice']:.3f} | {row['seconds']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "rows": out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
