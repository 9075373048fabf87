"""``tuckerseg info``: what a model folder (nnU-Net or compressed) costs, layer by layer."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "report params, MACs and ranks of an nnU-Net or compressed-model folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="nnU-Net trained-model folder or compressed-model folder")
    parser.add_argument("--fold", default="0", help="fold of an nnU-Net folder (default 0)")
    parser.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint file name")
    parser.add_argument("--json", action="store_true",
                        help='print one JSON object: {"original": {...}, "compressed": {...}, "layers": [...]}')


def run(args: argparse.Namespace, progress) -> int:
    from TuckerSegLib.compression.compress import compress_model
    from TuckerSegLib.specs import CompressionSpec
    from TuckerSegLib.models import open_model
    from TuckerSegLib.report import format_report

    fold = int(args.fold) if str(args.fold).isdigit() else args.fold
    model = open_model(args.path, fold, args.checkpoint)
    if model.manifest is not None:
        report = dict(model.manifest["report"])
        report["source"] = model.manifest["source"]
    else:  # an uncompressed model: report it as ratio 1.0 (every layer dense)
        report = compress_model(model, CompressionSpec(ratio=1.0), inplace=True).report
        report["policy"] = "none"
        report.pop("method", None)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0
