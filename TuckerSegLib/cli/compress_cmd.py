"""``tuckerseg compress``: an nnU-Net model folder -> a compressed-model folder."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from TuckerSegLib.errors import InputError
from TuckerSegLib.specs import METHODS, POLICIES, RANK_MULTIPLE, CompressionSpec

HELP = "compress an nnU-Net model folder at a ratio into a compressed-model folder"

POLICY_HELP = ("budget (default): ratio = fraction of the network's MACs kept, ranks spent where "
               "they cost least output error (measured on a probe input; small models also on whole phantom CTs); uniform: the study's rank = ceil(C*ratio) (min 16, rounded "
               "up to multiples of 8) on spatial layers; energy: ratio = fraction of singular-value "
               "energy kept per layer; paper: the study's rule exactly, on every conv layer")


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ratio", type=float, required=True,
                        help="compression ratio in (0, 1]; 1.0 = the original network; its meaning "
                             "depends on --policy")
    parser.add_argument("--policy", choices=POLICIES, default="budget", help=POLICY_HELP)
    parser.add_argument("--method", choices=METHODS, default="hosvd",
                        help="factorisation: truncated HOSVD (default, fast) or HOOI (tensorly)")
    parser.add_argument("--rank-multiple", type=int, default=RANK_MULTIPLE,
                        help=f"round ranks to multiples of this (default {RANK_MULTIPLE}; not for paper)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path,
                        help="nnU-Net trained-model folder (plans.json, dataset.json, fold_N/checkpoint_final.pth)")
    add_policy_arguments(parser)
    parser.add_argument("-o", "--output", type=Path, required=True, help="compressed-model folder to write")
    parser.add_argument("--fold", default="0", help="fold to compress (default 0)")
    parser.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint file name")
    parser.add_argument("--rank-min", type=int, default=None,
                        help="rank floor (default: 0 for paper, 16 for uniform, 1 otherwise)")
    parser.add_argument("--calibrate", nargs="+", type=Path, default=None, metavar="CT",
                        help="data-aware factors: activation statistics of the original network on "
                             "these CTs (NIfTI) choose the factors and, for budget/energy, the ranks")
    parser.add_argument("--calibration-patches", type=int, default=4, metavar="N",
                        help="random patches per calibration CT (default 4)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


def run(args: argparse.Namespace, progress) -> int:
    from TuckerSegLib.compression.compress import CompressionData, compress_model
    from TuckerSegLib.models.compressed_file import save_compressed
    from TuckerSegLib.models.nnunet_folder import load_model_folder
    from TuckerSegLib.report import format_report

    spec = CompressionSpec(ratio=args.ratio, policy=args.policy, method=args.method,
                           rank_multiple=args.rank_multiple, rank_min=args.rank_min)
    fold = int(args.fold) if str(args.fold).isdigit() else args.fold
    out = Path(args.output)
    if out.exists() and not (out / "manifest.json").is_file():
        if not out.is_dir() or any(out.iterdir()):
            raise InputError(f"output {out} exists and is not a compressed-model folder; not overwriting it")
    progress.stage("load", f"loading {args.model_dir}")
    model = load_model_folder(args.model_dir, fold, args.checkpoint)
    data = None  # the policy's default measurements
    if args.calibrate and not spec.is_original:
        from TuckerSegLib.compression.calibration import calibrate

        data = CompressionData(calibration=calibrate(model, args.calibrate, patches_per_ct=args.calibration_patches,
                                                     progress=progress))
    progress.stage("compress", f"compressing ({spec.policy}, ratio {spec.ratio:g})")
    result = compress_model(model, spec, data, progress=progress, inplace=True)
    progress.stage("save", f"writing {out}")
    save_compressed(out, model, result)
    progress.result({"output": str(out), "original": result.report["original"],
                     "compressed": result.report["compressed"]})
    if args.json:
        print(json.dumps(result.report))
    else:
        print(format_report(result.report, layers=False))
        print(f"wrote {out}")
    return 0
