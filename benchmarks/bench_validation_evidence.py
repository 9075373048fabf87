"""What does a network find on the quality target's validation patches? (abdomen vs torso phantoms)

Why: a quality target judges a compression only on data where the original labels enough
foreground (``quality_curve.MIN_REFERENCE_FOREGROUND``): two empty label maps agree perfectly.
The built-in phantoms held only an abdomen (no ribs, heart or back muscles), so the ribs,
cardiac and muscle parts of ``total`` found little there to be judged on. This prints, per
model, what the original network labels (as stock runs it, PyTorch f32) on the centred patch of
each validation phantom, drawn as before (abdomen) and with the thorax and back (torso, the
default now), and optionally on a CT: the foreground fraction, whether that source would count,
and the classes found most.

Example (2 CPU cores, about a minute per 3 mm model)::

    python benchmarks/bench_validation_evidence.py --models ROOT/Dataset297_*/*__3d_fullres \\
        --ct ../shared/data/example_ct.nii.gz --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from TuckerSegLib.compression.quality_curve import MIN_REFERENCE_FOREGROUND, QualityCurve
from TuckerSegLib.models.nnunet_folder import load_model_folder
from TuckerSegLib.pipeline.quality_target import REFERENCE_ENGINE, ValidationPatches, _run

# the structures the torso phantoms add, as parts of TotalSegmentator's class names
TORSO_GROUPS = ("rib", "costal", "sternum", "heart", "spinal_cord", "autochthon")


def _found(labels: torch.Tensor, foreground: float, judged: bool, names: Dict[int, str], top: int,
           groups: Sequence[str]) -> dict:
    """The source's foreground fraction and whether it counts (as the quality target has them), the
    ``top`` classes by voxels and the voxels of each group of classes (names containing it), in
    percent of all voxels."""
    counts = torch.bincount(labels.reshape(-1).long(), minlength=max(names) + 1).double()
    total = float(counts.sum())
    order = [int(c) for c in torch.argsort(counts[1:], descending=True)[:top] + 1 if counts[c] > 0]
    return {"foreground": foreground, "counts": judged,
            "classes_found": int((counts[1:] > 0).sum()),
            "top": {names.get(c, str(c)): round(100 * float(counts[c]) / total, 4) for c in order},
            "groups": {g: round(100 * sum(float(counts[c]) for c, n in names.items() if c and g in n) / total, 4)
                       for g in groups}}


def measure(folder: Path, ct: Sequence[str], top: int, groups: Sequence[str]) -> dict:
    model = load_model_folder(folder)
    out = {}
    for anatomy in ("abdomen", "torso"):
        data = ValidationPatches(model, tuple(ct) if anatomy == "torso" else (), torso=anatomy == "torso")
        labels, _, _ = _run(model.network, model, data.patches, torch.device("cpu"), engine=REFERENCE_ENGINE)
        foreground = data.foreground(labels)
        judged = QualityCurve(data.description, reference_foreground=foreground).judged_sources()
        for name, rows in data.sources:
            out[f"{anatomy} phantoms" if name == "phantoms" else name] = _found(
                labels[rows], foreground[name], name in judged, model.label_names, top, groups)
    return out


def main(argv: Sequence[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", type=Path, nargs="+", required=True, help="nnU-Net model folders")
    p.add_argument("--ct", nargs="*", default=[], help="CTs (NIfTI) measured beside the phantoms")
    p.add_argument("--top", type=int, default=6, help="classes listed per source")
    p.add_argument("--groups", nargs="*", default=list(TORSO_GROUPS),
                   help="class-name parts whose voxels are summed per source (default: what the torso adds)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    results: List[dict] = []
    print(f"a source counts where the original labels at least {100 * MIN_REFERENCE_FOREGROUND:g} % of its "
          f"voxels as foreground (validation patches, original network on {REFERENCE_ENGINE})")
    for folder in args.models:
        row = {"model": folder.parent.name if folder.name.startswith("nnUNet") else folder.name,
               "folder": str(folder), "sources": measure(folder, args.ct, args.top, args.groups)}
        results.append(row)
        print(f"\n{row['model']}")
        for source, r in row["sources"].items():
            top = ", ".join(f"{k} {v:.2f}" for k, v in r["top"].items())
            print(f"  {source:<22} foreground {100 * r['foreground']:7.3f} %  {'counts' if r['counts'] else 'too little':<10}"
                  f" {r['classes_found']:3d} classes; most (% of voxels): {top}")
            print(f"  {'':<22} " + ", ".join(f"{g} {v:.3f}" for g, v in r["groups"].items()))
    if args.json:
        args.json.write_text(json.dumps({"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                                         "min_reference_foreground": MIN_REFERENCE_FOREGROUND,
                                         "models": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
