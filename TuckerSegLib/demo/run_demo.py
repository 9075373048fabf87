"""The offline demo: phantom CT -> demo model compressed at several ratios -> segment -> report.

Everything it needs ships with the package (the phantom generator and the demo model), so it runs
on a fresh machine without network access. Outputs (all written to a temporary folder first, then
moved into ``outdir``):

- ``phantom_ct.nii.gz``, ``phantom_truth.nii.gz``: the CT and its ground truth;
- ``segmentations/ratio_<r>.nii.gz``: one segmentation per ratio;
- ``results.csv`` / ``results.json``: ratio, params, MACs, time, Dice vs truth and vs ratio 1.0;
- ``slices.png``: slices with overlays (truth and every ratio);
- ``ratio_vs_quality.png``: quality and time against the fraction of MACs kept.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from TuckerSegLib.specs import CompressionSpec
from TuckerSegLib.progress import NullProgress, Progress

DEFAULT_RATIOS = (1.0, 0.5, 0.3, 0.15)
PHANTOM_SEED = 2024  # not among the training (0-39) or validation (10000-10003) phantoms
COLUMNS = ["ratio", "policy", "params", "macs", "macs_fraction", "seconds", "dice_vs_truth",
           "nsd_vs_truth", "dice_vs_original"]


def format_table(rows: List[dict]) -> str:
    """The results as an aligned text table."""
    head = ["ratio", "policy", "params", "GMACs", "MACs kept", "time s", "Dice truth",
            "NSD truth", "Dice vs 1.0"]
    lines = [head]
    for r in rows:
        lines.append([f"{r['ratio']:.2f}", r["policy"], f"{r['params'] / 1e6:.3f}M",
                      f"{r['macs'] / 1e9:.3f}", f"{r['macs_fraction']:.3f}", f"{r['seconds']:.2f}",
                      f"{r['dice_vs_truth']:.3f}", f"{r['nsd_vs_truth']:.3f}",
                      f"{r['dice_vs_original']:.3f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)


def write_csv(rows: List[dict], path: Path, columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow(r)


def run_demo(outdir: Path = Path("tuckerseg-demo"), ratios: Sequence[float] = DEFAULT_RATIOS,
             policy: str = "budget", device: str = "auto", cache_dir: Optional[Path] = None,
             progress: Optional[Progress] = None, seed: int = PHANTOM_SEED,
             tolerance_mm: float = 3.0) -> dict:
    """Run the demo; returns the summary also written to ``results.json``."""
    from TuckerSegLib.compression.cache import get_compressed_network
    from TuckerSegLib.demo.demo_model import materialize_demo_model
    from TuckerSegLib.compression.phantom import make_phantom, save_nifti
    from TuckerSegLib.network.cost import count_cost
    from TuckerSegLib.evaluation.metrics import mean_score, per_class_scores
    from TuckerSegLib.evaluation.plots import plot_ratio_curves, plot_slices
    from TuckerSegLib.devices import torch_device
    from TuckerSegLib.pipeline.nnunet_predict import load_predictor, predict_volume

    progress = progress or NullProgress()
    ratios = [CompressionSpec(r, policy).ratio for r in ratios]  # checks ratio and policy once
    # The uncompressed model is always run first: it is the reference for "Dice vs 1.0".
    ratios = [1.0] + [r for r in dict.fromkeys(ratios) if r != 1.0]
    dev = torch_device(device)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=outdir, prefix=".tmp-demo-"))
    try:
        progress.stage("phantom", "making a phantom CT")
        phantom = make_phantom(seed)
        ct_path = save_nifti(phantom.image, phantom.affine, work / "phantom_ct.nii.gz")
        save_nifti(phantom.labels, phantom.affine, work / "phantom_truth.nii.gz")
        classes = [c for c in phantom.label_names if c != 0]

        progress.stage("model", "preparing the demo model")
        folder = materialize_demo_model()
        predictor = load_predictor(folder, device=str(dev))
        patch = predictor.configuration_manager.patch_size
        (work / "segmentations").mkdir()
        rows, segs, per_class = [], {}, {}
        original_seg, original_macs = None, None
        n = len(ratios)
        for i, ratio in enumerate(ratios):
            progress.stage("segment", f"ratio {ratio:g}: compressing / loading")
            progress.update(i / n, f"ratio {ratio:g}")
            t0 = time.perf_counter()
            network, _manifest = get_compressed_network(folder, CompressionSpec(ratio, policy),
                                                        cache_dir=cache_dir)
            load_s = time.perf_counter() - t0
            cost = count_cost(network, (1, 1, *patch)).as_dict()
            progress.stage("segment", f"ratio {ratio:g}: segmenting")
            t0 = time.perf_counter()
            seg = predict_volume(predictor, ct_path, network=network)
            seconds = time.perf_counter() - t0
            if original_seg is None:
                original_seg, original_macs = seg, cost["macs"]
            vs_truth = per_class_scores(seg, phantom.labels, classes, phantom.spacing, tolerance_mm)
            vs_orig = per_class_scores(seg, original_seg, classes, phantom.spacing, tolerance_mm,
                                       with_nsd=False)
            name = f"ratio_{ratio:.2f}"
            save_nifti(seg.astype(np.uint8), phantom.affine, work / "segmentations" / f"{name}.nii.gz")
            segs[f"ratio {ratio:g}"] = seg
            per_class[name] = {phantom.label_names[c]: {"dice_vs_truth": vs_truth[c]["dice"],
                                                        "nsd_vs_truth": vs_truth[c]["nsd"],
                                                        "dice_vs_original": vs_orig[c]["dice"]}
                               for c in classes}
            rows.append({"ratio": ratio, "policy": policy, "params": cost["params"],
                         "macs": cost["macs"], "macs_fraction": cost["macs"] / original_macs,
                         "seconds": seconds, "load_seconds": load_s,
                         "dice_vs_truth": mean_score(vs_truth), "nsd_vs_truth": mean_score(vs_truth, "nsd"),
                         "dice_vs_original": mean_score(vs_orig)})
            progress.log(f"ratio {ratio:g}: Dice vs truth {rows[-1]['dice_vs_truth']:.3f}, "
                         f"vs original {rows[-1]['dice_vs_original']:.3f}, {seconds:.2f} s")
        progress.update(1.0, "writing report")
        summary = {"rows": rows, "per_class": per_class, "policy": policy, "device": str(dev),
                   "phantom_seed": seed, "nsd_tolerance_mm": tolerance_mm,
                   "model_folder": str(folder), "patch_size": list(patch),
                   "labels": {str(k): v for k, v in phantom.label_names.items()}}
        write_csv(rows, work / "results.csv", COLUMNS + ["load_seconds"])
        (work / "results.json").write_text(json.dumps(summary, indent=2))
        plot_slices(phantom.image, {"truth": phantom.labels, **segs}, phantom.spacing,
                    work / "slices.png", title=f"TuckerSeg demo ({policy} policy)")
        plot_ratio_curves(rows, work / "ratio_vs_quality.png",
                          title=f"demo model, {policy} policy, {dev}")
        # Publish: move each finished file into the output folder.
        for src in sorted(work.rglob("*")):
            if src.is_file():
                dst = outdir / src.relative_to(work)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary["outdir"] = str(outdir)
    summary["table"] = format_table(rows)
    return summary
