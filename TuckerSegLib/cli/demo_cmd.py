"""``tuckerseg demo``: the offline demo (phantom CT, built-in model, several ratios, report)."""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import List

from TuckerSegLib.errors import InputError
from TuckerSegLib.specs import check_ratio

HELP = "offline demo: phantom CT, compress the built-in model at a few ratios, segment, report"


def parse_ratios(text: str) -> List[float]:
    """``"1.0,0.5,0.3"`` -> [1.0, 0.5, 0.3] (each validated)."""
    parts = [p for p in str(text).replace(" ", "").split(",") if p]
    if not parts:
        raise InputError("--ratios needs at least one ratio, e.g. 1.0,0.5,0.3")
    return [check_ratio(p) for p in parts]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", type=Path, default=Path("tuckerseg-demo"),
                        help="output folder (default: ./tuckerseg-demo)")
    parser.add_argument("--ratios", default="1.0,0.5,0.3,0.15",
                        help="comma-separated ratios; with the budget policy a ratio is the "
                             "fraction of MACs kept (default: 1.0,0.5,0.3,0.15)")
    parser.add_argument("--policy", default="budget", choices=["budget", "uniform", "paper", "energy"],
                        help="rank policy (default: budget)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where compressed networks are cached (default: the user cache)")


def run(args: argparse.Namespace, progress) -> int:
    warnings.filterwarnings("ignore", message=".*torch.jit.interface.*")
    from TuckerSegLib.demo.run_demo import run_demo

    ratios = parse_ratios(args.ratios)
    summary = run_demo(args.output, ratios=ratios, policy=args.policy, device=args.device,
                       cache_dir=args.cache_dir, progress=progress)
    progress.result({k: summary[k] for k in ("rows", "outdir", "policy", "device")})
    if args.progress != "json":
        print(summary["table"])
        print(f"\nwrote {summary['outdir']}/: results.csv, results.json, slices.png, "
              f"ratio_vs_quality.png, phantom_ct.nii.gz, phantom_truth.nii.gz, segmentations/")
    return 0
