"""``tuckerseg segment``: TotalSegmentator with compressed networks, flags named like TotalSegmentator's."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from TuckerSegLib.progress import JsonProgress, Progress
from TuckerSegLib.specs import (DEFAULT_MIN_AGREEMENT, ENGINES, INT8_MIN_AGREEMENT, LAYER_FORMS, POLICIES,
                                PRECISION_CHOICES, SEARCH_MODES, RunSpec, check_mode, compression_spec)

HELP = "segment a CT with compressed TotalSegmentator models"


def add_quality_arguments(p, quality_search: Optional[str] = "background") -> None:
    """``--min-agreement``, ``--ratio``, ``--validate-on``, ``--policy`` (segment and batch alike),
    and ``--quality-search`` with ``quality_search`` as its default (None: no such flag; batch
    measures a curve before its first case, for all cases)."""
    p.add_argument("--min-agreement", type=float, default=None, metavar="A",
                   help=f"quality target (the default, A = {DEFAULT_MIN_AGREEMENT:g}): each network is the cheapest "
                        "whose mean Dice agreement with the original, measured once per model on validation "
                        "patches (built-in phantom CTs, plus --validate-on), is at least A; the original runs "
                        "where nothing below 90 %% of the MACs does. With --precision auto on a CPU with native "
                        "bf16, that network and the original are also measured in bf16, and the fastest here "
                        "whose own agreement is at least A runs")
    p.add_argument("--ratio", type=float, default=None,
                   help="experts: compress at this ratio instead of a quality target, in (0, 1]; 1.0 = stock "
                        "TotalSegmentator's networks; its meaning depends on --policy")
    p.add_argument("--validate-on", nargs="+", default=[], metavar="CT",
                   help="your CTs (NIfTI) that the quality target is also measured on (never the CT you evaluate); "
                        "each point must then meet the target on the phantoms and on each CT")
    p.add_argument("--policy", default="budget", choices=POLICIES,
                   help="how ranks are chosen (default budget: ratio = fraction of MACs kept)")
    if quality_search is None:
        return
    p.add_argument("--quality-search", default=quality_search, choices=SEARCH_MODES,
                   help=f"when a quality target's curve is not measured on this machine yet (default "
                        f"{quality_search}): now = measure it before this run (minutes, once per model); "
                        "background = run the original network now (stock's output) and measure the curve in "
                        "a detached low-priority process; later runs use it")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--input", required=True, metavar="CT",
                   help="CT image: a .nii/.nii.gz file or a DICOM folder")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output: a .nii.gz file (one multilabel file), else a folder with one file per class")
    add_quality_arguments(p)
    p.add_argument("-ta", "--task", default="total", help="TotalSegmentator task (default total)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("-f", "--fast", action="store_true", help="3 mm model (dataset 297)")
    mode.add_argument("-ff", "--fastest", action="store_true", help="6 mm model (dataset 298)")
    p.add_argument("-rs", "--roi_subset", "--roi-subset", dest="roi_subset", nargs="+", metavar="NAME",
                   help="segment only these structures (TotalSegmentator class names)")
    p.add_argument("-ml", "--ml", action="store_true", default=None,
                   help="one multilabel file instead of one file per class (the default when OUT is "
                        "named .nii or .nii.gz)")
    p.add_argument("-d", "--device", default="auto",
                   help="auto (cuda, else mps, else cpu), cpu, gpu, gpu:N or mps (default auto)")
    p.add_argument("-s", "--statistics", action="store_true",
                   help="volume and mean intensity per structure (statistics.json)")
    p.add_argument("-bs", "--body_seg", "--body-seg", dest="body_seg", action="store_true",
                   help="crop to the body first (TotalSegmentator's rough body model)")
    p.add_argument("-nr", "--nr_thr_resamp", "--nr-thr-resamp", dest="nr_thr_resamp", type=int, default=1,
                   help="threads for resampling (default 1)")
    p.add_argument("-ns", "--nr_thr_saving", "--nr-thr-saving", dest="nr_thr_saving", type=int, default=6,
                   help="threads for saving one file per class (default 6)")
    p.add_argument("--cache-dir", default=None,
                   help="where compressed networks are cached (default: TuckerSeg's cache folder)")
    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help="inference engine: auto (default: the fastest exact engine, timed on this "
                        "machine: OpenVINO or PyTorch on CPU, PyTorch on CUDA/MPS; PyTorch at --ratio 1.0, "
                        "which keeps stock output voxel for voxel), torch, openvino")
    p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                   help="auto (default) = stock TotalSegmentator's precision on the device (f32 on "
                        "CPU, fp16 autocast on CUDA), or bf16 where a quality target measured it faster here "
                        "and meeting the target; bf16/fp16 are faster, their argmax agreement "
                        "with f32 is measured and reported; int8 (OpenVINO, CPUs with VNNI or AMX): "
                        "quantised once per model with NNCF on phantom CTs (and --int8-calibrate CTs), "
                        "layers kept in f32 until --int8-min-agreement is met; cached beside the model")
    p.add_argument("--int8-min-agreement", type=float, default=INT8_MIN_AGREEMENT, metavar="A",
                   help=f"with --precision int8: argmax agreement with f32 (mean Dice on validation "
                        f"patches) that INT8 must keep, in (0, 1] (default {INT8_MIN_AGREEMENT:g})")
    p.add_argument("--int8-calibrate", nargs="+", default=[], metavar="CT",
                   help="with --precision int8: your own CTs (NIfTI) added to the phantoms as "
                        "calibration and validation data")
    p.add_argument("--layer-forms", default="auto", choices=LAYER_FORMS,
                   help="auto (default): time each factorised layer's equivalent forms (factorised, "
                        "padded ranks, fused, dense) on this device once (cached) and run the fastest, "
                        "so that no ratio is slower than stock; as-is: run the factorised layers as they are")
    p.add_argument("--no-download", action="store_true",
                   help="never download missing TotalSegmentator weights")
    p.add_argument("-q", "--quiet", action="store_true", help="less output from TotalSegmentator")
    p.add_argument("--compressed-model", nargs="+", default=[], metavar="DIR",
                   help="compressed-model folder(s) (e.g. from tuckerseg finetune) to use for the "
                        "models they were made from, instead of compressing those at --ratio")


def run(args: argparse.Namespace, progress: Progress) -> int:
    from TuckerSegLib.pipeline.segment import segment

    # With JSON events on stdout, TotalSegmentator's own prints go to stderr (quiet mode).
    quiet = bool(args.quiet or isinstance(progress, JsonProgress))
    compression = compression_spec(args.ratio, args.min_agreement, args.policy, args.validate_on, args.quality_search)
    run_spec = RunSpec(engine=args.engine, precision=args.precision, layer_forms=args.layer_forms,
                       device=args.device, int8_min_agreement=args.int8_min_agreement,
                       int8_calibration=tuple(args.int8_calibrate))
    result = segment(args.input, args.output, compression, run_spec, task=args.task,
                     mode=check_mode(args.fast, args.fastest), roi_subset=args.roi_subset, ml=args.ml,
                     cache_dir=args.cache_dir, progress=progress, allow_download=not args.no_download, quiet=quiet,
                     compressed_models=args.compressed_model, keep_warm=not args.one_shot,
                     statistics=args.statistics, body_seg=args.body_seg,
                     nr_thr_resamp=args.nr_thr_resamp, nr_thr_saving=args.nr_thr_saving)
    if not isinstance(progress, JsonProgress):
        print(f"tuckerseg segment: {result.summary()}", file=sys.stderr)
    return 0
