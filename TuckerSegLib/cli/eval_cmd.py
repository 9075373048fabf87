"""``tuckerseg eval``: per-class Dice/NSD of compressed models vs references and the original."""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from TuckerSegLib.cli.demo_cmd import parse_ratios
from TuckerSegLib.errors import InputError

HELP = "compare compressed models against references and the uncompressed model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="an nnU-Net trained-model folder, or a TotalSegmentator task (e.g. total)")
    parser.add_argument("--fast", action="store_true", help="TotalSegmentator task: 3 mm model")
    parser.add_argument("--fastest", action="store_true", help="TotalSegmentator task: 6 mm model")
    parser.add_argument("-i", "--input", nargs="+", type=Path, required=True, help="CT NIfTI file(s)")
    parser.add_argument("--ref", nargs="+", type=Path, default=None,
                        help="reference segmentation(s), one per CT, same order")
    parser.add_argument("--ref-classmap", choices=["same", "total"], default="same",
                        help="label ids of the references: same as the model (default) or "
                             "TotalSegmentator's total map (model classes matched by name)")
    parser.add_argument("--ratios", default="1.0,0.5,0.3", help="comma-separated ratios (default 1.0,0.5,0.3)")
    parser.add_argument("--policies", default="budget", help="comma-separated policies (default budget)")
    parser.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    parser.add_argument("-o", "--output", type=Path, default=Path("tuckerseg-eval"),
                        help="output folder (default ./tuckerseg-eval)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--cache-dir", type=Path, default=None, help="compressed-network cache folder")


def run(args: argparse.Namespace, progress) -> int:
    warnings.filterwarnings("ignore", message=".*torch.jit.interface.*")
    from TuckerSegLib.evaluation.evaluate import evaluate, format_statistics

    policies = [p for p in args.policies.replace(" ", "").split(",") if p]
    if not policies:
        raise InputError("--policies needs at least one policy, e.g. budget,uniform")
    if args.tolerance < 0:
        raise InputError(f"--tolerance must be >= 0 mm, got {args.tolerance:g}")
    result = evaluate(args.model, args.input, args.ref, ratios=parse_ratios(args.ratios),
                      policies=policies, outdir=args.output, device=args.device,
                      tolerance_mm=args.tolerance, fast=args.fast, fastest=args.fastest,
                      ref_classmap=args.ref_classmap, cache_dir=args.cache_dir, progress=progress)
    progress.result({"outdir": str(args.output), "statistics": result["statistics"]})
    if args.progress != "json":
        print(format_statistics(result))
        print(f"\nwrote {args.output}/: summary.csv, per_class.csv, results.json, "
              f"agreement_vs_ratio.png, heatmap_*.png")
    return 0
