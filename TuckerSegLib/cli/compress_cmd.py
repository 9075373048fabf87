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
    parser.add_argument("--ratio", type=float, default=None,
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
    parser.add_argument("--min-agreement", type=float, default=None, metavar="A",
                        help="instead of --ratio: the cheapest network whose agreement with the original, "
                             "measured on validation patches (phantom CTs plus --validate-on), is at least A; "
                             "prints the model's quality curve")
    parser.add_argument("--validate-on", nargs="+", default=[], metavar="CT",
                        help="your CTs (NIfTI) the quality target is also measured on; each point must then meet "
                             "the target on the phantoms and on each CT")
    parser.add_argument("--device", default="auto", help="device for the target's measurements (auto, cpu, gpu)")
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

    if (args.ratio is None) == (args.min_agreement is None):
        raise InputError("give one of --ratio or --min-agreement")
    spec = CompressionSpec(ratio=1.0 if args.ratio is None else args.ratio, policy=args.policy,
                           method=args.method, rank_multiple=args.rank_multiple, rank_min=args.rank_min,
                           min_agreement=args.min_agreement, validate_on=tuple(args.validate_on))
    fold = int(args.fold) if str(args.fold).isdigit() else args.fold
    if spec.is_target:
        if args.calibrate:
            raise InputError("--calibrate chooses factors for one ratio; use it with --ratio")
        from TuckerSegLib.devices import torch_device
        from TuckerSegLib.pipeline.quality_target import choose_for_target

        progress.stage("quality", f"quality target {spec.min_agreement:g}")
        choice = choose_for_target(args.model_dir, spec, fold, args.checkpoint, torch_device(args.device),
                                   progress=progress)
        for point in choice.curve.envelope():
            print(f"{100 * point.macs_fraction:5.1f} % MACs: agreement {point.agreement:.3f}"
                  + (f", {point.seconds_per_patch:.2f} s/patch ({point.engine})" if point.seconds_per_patch else ""))
        print(choice.summary(spec.min_agreement))
        if choice.fallback:
            progress.result({"output": None, "fallback": True, "predicted_agreement": 1.0})
            return 0
        if choice.compressed_folder is not None:
            raise InputError(f"the target is met by the distilled model {choice.compressed_folder}; use that folder")
        spec = choice.spec
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
