"""``tuckerseg bench``: time stock TotalSegmentator networks against TuckerSeg engines and ratios."""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

from TuckerSegLib.errors import InputError
from TuckerSegLib.specs import INT8_MIN_AGREEMENT, LAYER_FORMS, RunSpec, check_agreement

HELP = "time stock vs compressed networks per patch and end to end"


def _config(text: str):
    """``ENGINE:PRECISION`` -> ``(engine, precision)``, validated by ``RunSpec``."""
    engine, _, precision = text.partition(":")
    try:
        run = RunSpec(engine, precision or "auto")
    except InputError as exc:
        raise argparse.ArgumentTypeError(f"expected ENGINE:PRECISION (e.g. openvino:bf16): {exc}") from None
    return run.engine, run.precision


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--archs", nargs="+", default=["1.5mm", "3mm"], choices=["1.5mm", "3mm", "tiny"],
                        help="TotalSegmentator architectures to time per patch (default both)")
    parser.add_argument("--ratios", nargs="+", type=float, default=[1.0, 0.5, 0.3, 0.1])
    parser.add_argument("--policies", nargs="+", default=["paper", "budget"],
                        help="rank policies (paper = the study's rank factor; budget = MACs kept)")
    parser.add_argument("--configs", nargs="+", type=_config, default=None, metavar="ENGINE:PRECISION",
                        help="engines and precisions to time (default: torch:f32 openvino:f32 "
                             "openvino:bf16 on CPU, torch:fp16 torch:f32 on CUDA; openvino:int8 = NNCF "
                             "INT8 with accuracy control, CPUs with VNNI or AMX)")
    parser.add_argument("--int8-min-agreement", type=float, default=INT8_MIN_AGREEMENT, metavar="A",
                        help="openvino:int8: keep layers in f32 until the agreement with f32 reaches A "
                             f"(default {INT8_MIN_AGREEMENT:g}); every row reports its agreement with "
                             "torch f32 beside its time")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps")
    parser.add_argument("--layer-forms", choices=LAYER_FORMS, default="as-is",
                        help="auto: per-layer measured forms (factorised / fused / dense) on this device")
    parser.add_argument("--reps", type=int, default=2, help="timed runs per configuration (best is reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="keeps converted engine models between runs (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=Path("bench_engines.json"), help="results file")
    parser.add_argument("--png", type=Path, default=None, help="plot (default: the JSON path with .png)")
    parser.add_argument("--end-to-end", type=Path, default=None, metavar="CT",
                        help="also run the whole pipeline on this CT (from a checkout: runs "
                             "benchmarks/bench_segment_end_to_end.py with the first policy, these ratios, "
                             "configs and --reps)")
    parser.add_argument("--per-patch", action=argparse.BooleanOptionalAction, default=True,
                        help="run the per-patch benchmark (default on)")


def end_to_end_available() -> str:
    """'' when the end-to-end benchmark can run, else why not."""
    if importlib.util.find_spec("TuckerSegLib.pipeline") is None or \
            importlib.util.find_spec("TuckerSegLib.pipeline.segment") is None:
        return "the segment pipeline (TuckerSegLib.pipeline.segment) is not in this installation"
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_segment_end_to_end.py"
    if not script.is_file():
        return f"{script} is missing"
    return ""


def run(args: argparse.Namespace, progress) -> int:
    import tempfile

    from TuckerSegLib.evaluation.engine_bench import format_table, plot, run_patch_bench, write_json

    if args.reps < 1:
        raise InputError("--reps must be at least 1")
    for r in args.ratios:
        if not 0 < r <= 1:
            raise InputError(f"ratios must be in (0, 1], got {r:g}")
    if args.end_to_end is not None and not args.end_to_end.is_file():
        raise InputError(f"CT not found: {args.end_to_end}")
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="tuckerseg-bench-"))
    if args.per_patch:
        result = run_patch_bench(args.archs, args.ratios, args.policies, args.configs, args.device,
                                 args.reps, args.warmup, cache, args.layer_forms, progress,
                                 log=lambda m: print(m, file=sys.stderr, flush=True),
                                 int8_min_agreement=check_agreement(args.int8_min_agreement))
        result["command"] = "tuckerseg bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:])
        write_json(result, args.json)
        png = plot(result, args.png or args.json.with_suffix(".png"))
        print(format_table(result))
        print(f"wrote {args.json} and {png}")
        progress.result({"json": str(args.json), "png": str(png)})
    if args.end_to_end is not None:
        why = end_to_end_available()
        if why:
            print(f"end-to-end benchmark skipped: {why}")
            return 0
        script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_segment_end_to_end.py"
        # the pipeline's own layer forms (measured, as `tuckerseg segment` uses them); first policy
        cmd = [sys.executable, str(script), "--ct", str(args.end_to_end), "--device", args.device,
               "--ratios", *[f"{r:g}" for r in args.ratios], "--policy", args.policies[0],
               "--repeats", str(args.reps),
               "--json", str(args.json.with_name(args.json.stem + "_end_to_end.json"))]
        if args.configs:
            cmd += ["--configs", *[f"{e}:{p}" for e, p in args.configs]]
        if args.cache_dir is not None:
            cmd += ["--workdir", str(args.cache_dir / "end_to_end")]
        print("end to end: " + " ".join(cmd), file=sys.stderr)
        return subprocess.call(cmd)
    return 0
