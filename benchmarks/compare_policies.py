"""Budget vs the study's rank rule on the demo model, at matched MACs.

Baselines, all at the study's rank factors:

- ``paper``: the study's rule as published (every conv, ``ceil(C x factor)``, no floor);
- ``study-code``: the rule as the study's code runs it (every conv, rank floor 16);
- ``uniform``: TuckerSeg's ``uniform`` policy, the rule with the code's floor of 16 on the layers
  worth factorising, ranks rounded to multiples of 8, layers kept dense where factorising would
  not save MACs (so it never reaches below about half the MACs of the demo model).

For each baseline run, its fraction of MACs kept is measured; the budget policy is then run at
that same fraction (its ratio is the fraction of MACs kept). Both are scored against the
uncompressed model's output (mean Dice over the 8 classes) on held-out phantoms; ``wins`` counts
the phantoms on which budget agrees better than the baseline.

    nice -n 10 python benchmarks/compare_policies.py [--factors 0.75,0.5,0.3,0.2] \\
        [--study-code-factors 0.75,0.5,0.3] [--paper-factors 0.5,0.3,0.2,0.1] [--phantoms 10] \\
        [-o out/compare_policies]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from TuckerSegLib.demo.demo_model import materialize_demo_model
from TuckerSegLib.compression.phantom import LABEL_NAMES, make_phantom
from TuckerSegLib.compression.compress import compress_network
from TuckerSegLib.compression.cache import get_compressed_network
from TuckerSegLib.specs import CompressionSpec
from TuckerSegLib.models.nnunet_folder import load_model_folder
from TuckerSegLib.network.cost import count_cost
from TuckerSegLib.evaluation.metrics import mean_score, per_class_scores
from TuckerSegLib.evaluation.plots import plot_ratio_curves
from TuckerSegLib.pipeline.nnunet_predict import load_predictor, predict_volume


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factors", default="0.75,0.5,0.3,0.2", help="uniform rank factors ('' = none)")
    ap.add_argument("--study-code-factors", default="0.75,0.5,0.3",
                    help="rank factors of the study code's rule, floor 16 on every conv ('' = none)")
    ap.add_argument("--paper-factors", default="0.5,0.3,0.2,0.1", help="paper rank factors ('' = none)")
    ap.add_argument("--phantoms", type=int, default=10)
    ap.add_argument("-o", "--output", type=Path, default=Path("out/compare_policies"))
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    runs = [(name, float(f)) for name, factors in (("uniform", args.factors),
                                                   ("study-code", args.study_code_factors),
                                                   ("paper", args.paper_factors))
            for f in factors.split(",") if f]
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="tuckerseg-cmp-"))
    folder = materialize_demo_model()
    predictor = load_predictor(folder, device="cpu")
    patch = predictor.configuration_manager.patch_size
    phantoms = [make_phantom(20_000 + i) for i in range(args.phantoms)]
    classes = list(range(1, len(LABEL_NAMES)))

    model = load_model_folder(folder)

    def run(policy: str, ratio: float):
        if policy == "study-code":  # not a TuckerSeg policy: the paper's rule with the code's floor
            net = compress_network(model.network, CompressionSpec(ratio, "paper", rank_min=16), patch_size=patch).network
        else:
            net, _ = get_compressed_network(folder, CompressionSpec(ratio, policy), cache_dir=cache)
        cost = count_cost(net, (1, 1, *patch)).as_dict()
        segs = [predict_volume(predictor, p.image, p.affine, network=net) for p in phantoms]
        return cost, segs

    base_cost, originals = run("budget", 1.0)
    rows = []
    for baseline, f in runs:
        for policy, ratio in ((baseline, f), ("budget", None)):
            if policy == "budget":
                ratio = min(1.0, rows[-1]["macs_fraction"])  # match the baseline run's MACs
            cost, segs = run(policy, ratio)
            vs_orig = [mean_score(per_class_scores(s, o, classes, p.spacing, with_nsd=False))
                       for s, o, p in zip(segs, originals, phantoms)]
            vs_truth = [mean_score(per_class_scores(s, p.labels, classes, p.spacing, with_nsd=False))
                        for s, p in zip(segs, phantoms)]
            rows.append({"policy": policy if policy != "budget" else f"budget vs {baseline}",
                         "baseline": baseline, "ratio": round(float(ratio), 4), "factor": f,
                         "params": cost["params"], "macs": cost["macs"],
                         "macs_fraction": cost["macs"] / base_cost["macs"],
                         "dice_vs_original": float(np.mean(vs_orig)),
                         "dice_vs_truth": float(np.mean(vs_truth)),
                         "dice_vs_original_per_phantom": [float(d) for d in vs_orig]})
            r = rows[-1]
            if policy == "budget":
                u = rows[-2]
                r["wins"] = int(sum(b > a for a, b in zip(u["dice_vs_original_per_phantom"], vs_orig)))
                r["losses"] = int(sum(b < a for a, b in zip(u["dice_vs_original_per_phantom"], vs_orig)))
            print(f"{r['policy']:>21} ratio {r['ratio']:.3f}  MACs kept {r['macs_fraction']:.3f}  "
                  f"params {r['params']:>8d}  Dice vs orig {r['dice_vs_original']:.4f}  "
                  f"vs truth {r['dice_vs_truth']:.4f}", flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "compare_policies.json").write_text(json.dumps(
        {"original": base_cost, "phantom_seeds": [20_000 + i for i in range(args.phantoms)],
         "rows": rows}, indent=2))
    plot_ratio_curves(rows, args.output / "compare_policies.png", x_key="macs_fraction",
                      quality_keys=("dice_vs_original",), time_key=None, group_key="policy",
                      title="demo model: budget vs the study's rule at matched MACs")
    print("\n| baseline | factor | MACs kept (baseline / budget) | Dice vs orig (baseline) | Dice vs orig (budget) "
          "| budget wins / losses (phantoms) | Dice vs truth (baseline) | Dice vs truth (budget) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for u, b in zip(rows[0::2], rows[1::2]):
        print(f"| {u['baseline']} | {u['factor']:.2f} | {u['macs_fraction']:.3f} / {b['macs_fraction']:.3f} | "
              f"{u['dice_vs_original']:.4f} | {b['dice_vs_original']:.4f} | {b['wins']} / {b['losses']} | "
              f"{u['dice_vs_truth']:.4f} | {b['dice_vs_truth']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
