"""Recovery experiment: agreement with the uncompressed model at the MAC count of the study's rank
factor 0.3, for zero-shot uniform ranks, data-aware (calibrated) factors and distillation.

Why: issue 7 claims the order zero-shot < data-aware < distilled. This script measures it with the
real pieces: nnU-Net's preprocessing, our compression, calibration and distillation, and nnU-Net's
predictor on whole volumes. Agreement = mean Dice of the compressed model's segmentation against the
uncompressed model's, over the foreground classes either of them finds, on held-out CTs.

Cases:
- ``demo``: the trained demo model; unlabelled phantoms for calibration and distillation, other
  phantoms (unseen seeds) for evaluation.
- ``realct``: the same trained model on the real CT ``example_ct.nii.gz``: calibration and
  distillation on its upper 60 % of slices, evaluation on the held-out lower 40 %.
- ``--model FOLDER --train CT.. --eval CT..``: any nnU-Net model folder and CTs.

MAC target: the compressed/original MAC ratio of the ``paper`` preset at rank factor 0.3. The other
rows are compressed to that target: ``uniform`` (rank factor found by bisection, rank floor 1) and
``budget``; ranks are not rounded to multiples of 8 here (the demo network's 8- and 16-channel
layers would otherwise stay dense). Example (about 10 minutes of one CPU core)::

    nice python benchmarks/recovery_experiment.py --case demo realct --steps 500 --out recovery_out
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

from TuckerSegLib.compression.compress import CompressionData, compress_network
from TuckerSegLib.specs import CompressionSpec
from TuckerSegLib.evaluation.metrics import mean_score, per_class_scores
from TuckerSegLib.compression.calibration import collect_stats
from TuckerSegLib.finetune.distill import DistillConfig, distill
from TuckerSegLib.compression.ct_patches import PatchSampler, preprocess
from TuckerSegLib.models.nnunet_folder import load_model_folder
from TuckerSegLib.compression.probe_data import budget_inputs
from TuckerSegLib.pipeline.nnunet_predict import load_predictor, predict_volume

STUDY_RANK_FACTOR = 0.3
TRAIN_PHANTOMS = (500, 501, 502, 503)
EVAL_PHANTOMS = (20_000, 20_001)


# -- data -----------------------------------------------------------------------------------------

def phantom_cts(folder: Path, seeds: Sequence[int]) -> List[Path]:
    from TuckerSegLib.compression.phantom import make_phantom, write_phantom

    out = []
    for seed in seeds:
        path = folder / f"phantom_{seed}.nii.gz"
        if not path.exists():
            write_phantom(make_phantom(seed), path)
        out.append(path)
    return out


def split_ct(ct: Path, folder: Path, fraction: float = 0.6) -> tuple:
    """Upper ``fraction`` of the slices (last NIfTI axis) and the rest, as two NIfTI files."""
    import nibabel as nib

    img = nib.load(str(ct))
    data = np.asanyarray(img.dataobj)
    k = int(round(data.shape[2] * fraction))
    parts = []
    for name, sl, k0 in (("train", slice(0, k), 0), ("eval", slice(k, None), k)):
        affine = img.affine.copy()
        affine[:3, 3] += img.affine[:3, 2] * k0
        path = folder / f"{Path(ct).name.split('.')[0]}_{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data[:, :, sl]), affine, img.header), str(path))
        parts.append(path)
    return [parts[0]], [parts[1]]


# -- prediction and agreement ---------------------------------------------------------------------

def agreement(seg: np.ndarray, ref: np.ndarray, num_classes: int) -> float:
    """Mean Dice over the foreground classes present in either label map."""
    scores = per_class_scores(seg, ref, range(1, num_classes), spacing=(1, 1, 1), with_nsd=False)
    value = mean_score(scores, "dice", present_only=True)
    return 1.0 if value is None else value


# -- the experiment ------------------------------------------------------------------------------

def uniform_at(network, target: float, patch) -> tuple:
    """The uniform rank factor (floor 1, no rounding) whose MAC ratio is closest to ``target``."""
    lo, hi, below, above = 0.01, 1.0, None, None
    for _ in range(14):
        mid = (lo + hi) / 2
        res = compress_network(network, CompressionSpec(mid, "uniform", rank_min=1, rank_multiple=1), patch_size=patch)
        if res.report["macs_ratio"] <= target:
            lo, below = mid, (mid, res)
        else:
            hi, above = mid, (mid, res)
    # ranks move in steps: take whichever side lands closer to the target
    options = [o for o in (below, above) if o is not None]
    return min(options, key=lambda o: abs(o[1].report["macs_ratio"] - target))


def run_case(name: str, model_dir: Path, train: List[Path], evaluate: List[Path], steps: int,
             log=print) -> dict:
    torch.manual_seed(0)
    model = load_model_folder(model_dir)
    net, patch = model.network, model.patch_size
    t0 = time.perf_counter()
    paper = compress_network(net, CompressionSpec(STUDY_RANK_FACTOR, "paper"), patch_size=patch)
    target = paper.report["macs_ratio"]
    log(f"[{name}] MAC target = paper preset at {STUDY_RANK_FACTOR}: {100 * target:.1f} % of "
        f"{model.patch_size} patch MACs")
    cases = preprocess(model, train)
    patches = PatchSampler(cases, patch, seed=1).sample(max(8, 2 * len(cases)))[0]
    stats = collect_stats(net, patches, sources=[p.name for p in train])
    u_ratio, uniform = uniform_at(net, target, patch)
    variants = {
        f"paper {STUDY_RANK_FACTOR} (study rule), zero-shot": paper,
        f"uniform (rank factor {u_ratio:.3f}), zero-shot": uniform,
        "budget, weight-energy HOSVD, zero-shot": compress_network(net, CompressionSpec(target, "budget", rank_multiple=1), patch_size=patch),
        "budget, probe-sensitivity HOSVD, zero-shot": compress_network(
            net, CompressionSpec(target, "budget", rank_multiple=1), patch_size=patch, data=budget_inputs(model)),
        "uniform ranks, data-aware factors": compress_network(net, CompressionSpec(u_ratio, "uniform", rank_min=1, rank_multiple=1), patch_size=patch, data=CompressionData(calibration=stats)),
        "budget, data-aware ranks + factors": compress_network(net, CompressionSpec(target, "budget", rank_multiple=1), patch_size=patch, data=CompressionData(calibration=stats)),
    }
    # distil the student with the zero-shot uniform row's ranks, so that the three rows
    # "uniform zero-shot -> data-aware factors -> distilled" differ only in how weights were found
    start_key = "uniform ranks, data-aware factors"
    with tempfile.TemporaryDirectory() as work:
        config = DistillConfig(steps=steps, lr=1e-3, batch_size=2, checkpoint_every=max(steps, 1),
                               recipe="classic")
        student = copy.deepcopy(variants[start_key].network)
        td = time.perf_counter()
        res = distill(net, student, PatchSampler(cases, patch, seed=2), config, Path(work))
        distill_seconds = time.perf_counter() - td
    variants[f"uniform ranks, distilled {steps} steps (from data-aware)"] = type(paper)(
        res.network, variants[start_key].layer_ranks, variants[start_key].report)

    predictor = load_predictor(model_dir, device="cpu")
    refs = [predict_volume(predictor, ct, network=copy.deepcopy(net)) for ct in evaluate]
    rows = []
    for label, result in variants.items():
        scores = [agreement(predict_volume(predictor, ct, network=result.network), ref, model.num_classes)
                  for ct, ref in zip(evaluate, refs)]
        rows.append({"method": label, "macs_ratio": result.report["macs_ratio"],
                     "params_ratio": result.report["params_ratio"], "mean_dice": float(np.mean(scores)),
                     "per_ct": scores})
        log(f"[{name}] {label:<52} MACs {100 * result.report['macs_ratio']:5.1f} %  "
            f"mean Dice vs original {np.mean(scores):.3f}")
    return {"case": name, "model": str(model_dir), "train": [p.name for p in train],
            "eval": [p.name for p in evaluate], "mac_target": target, "rows": rows,
            "distill": {"steps": steps, "seconds": round(distill_seconds, 1),
                        "loss_first": res.loss_curve[0], "loss_last": res.loss_curve[-1],
                        "loss_curve": res.loss_curve},
            "seconds": round(time.perf_counter() - t0, 1)}


def write_outputs(results: List[dict], out: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = [f"Command: `{command}`", ""]
    for r in results:
        lines += [f"### {r['case']}: {r['model']}", "",
                  f"MAC target {100 * r['mac_target']:.1f} % (paper preset, rank factor {STUDY_RANK_FACTOR}); "
                  f"calibration/distillation CTs: {', '.join(r['train'])}; evaluation CTs: {', '.join(r['eval'])}; "
                  f"distillation {r['distill']['steps']} steps in {r['distill']['seconds']} s "
                  f"(loss {r['distill']['loss_first']:.4f} -> {r['distill']['loss_last']:.4f})", "",
                  "| method | MACs kept | params kept | mean Dice vs uncompressed |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {row['method']} | {100 * row['macs_ratio']:.1f} % | {100 * row['params_ratio']:.1f} % | "
                  f"{row['mean_dice']:.3f} |" for row in r["rows"]]
        lines.append("")
    (out / "results.md").write_text("\n".join(lines))
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.2), dpi=110, squeeze=False)
    for ax, r in zip(axes[0], results):
        labels = [row["method"].replace(", ", ",\n", 1) for row in r["rows"]]
        values = [row["mean_dice"] for row in r["rows"]]
        colours = ["#4c9be8" if "data-aware" in row["method"] and "distilled" not in row["method"]
                   else "#2ca25f" if "distilled" in row["method"] else "#b0b0b0" for row in r["rows"]]
        ax.barh(range(len(values)), values, color=colours)
        for i, v in enumerate(values):
            inside = v > 0.85  # label inside the bar where it would run off the axis
            ax.text(v - 0.01 if inside else v + 0.01, i, f"{v:.3f}", va="center",
                    ha="right" if inside else "left", color="white" if inside else "black")
        ax.set_yticks(range(len(values)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.0)
        ax.set_xlabel("mean Dice vs uncompressed model")
        ax.set_title(f"{r['case']}: {100 * r['mac_target']:.0f} % of MACs (paper 0.3)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "recovery.png")
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", nargs="+", default=["demo", "realct"], choices=["demo", "realct", "custom"])
    parser.add_argument("--model", type=Path, help="nnU-Net model folder (default: the demo model)")
    parser.add_argument("--train", nargs="+", type=Path, default=[], help="CTs for calibration/distillation (custom)")
    parser.add_argument("--eval", nargs="+", type=Path, default=[], help="held-out CTs (custom)")
    data = Path(os.environ.get("TUCKERSEG_TEST_DATA", REPO.parent / "shared" / "data"))
    parser.add_argument("--ct", type=Path, default=data / "example_ct.nii.gz",
                        help="real CT for the realct case (default: $TUCKERSEG_TEST_DATA/example_ct.nii.gz)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("recovery_out"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        from TuckerSegLib.demo.demo_model import materialize_demo_model

        model = materialize_demo_model()
    results = []
    for case in args.case:
        if case == "demo":
            train = phantom_cts(args.out, TRAIN_PHANTOMS)
            evaluate = phantom_cts(args.out, EVAL_PHANTOMS)
        elif case == "realct":
            train, evaluate = split_ct(args.ct, args.out)
        else:
            train, evaluate = args.train, args.eval
        results.append(run_case(case, Path(model), train, evaluate, args.steps))
    command = "python benchmarks/recovery_experiment.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_outputs(results, args.out, command)
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
