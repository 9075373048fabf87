"""What choosing a network for a quality target costs, once per model (cold cache), and again (warm).

    python benchmarks/bench_target_search.py MODEL_DIR --targets 0.95 0.90 --device cpu --json out.json

``MODEL_DIR`` is an nnU-Net model folder (e.g. a full-width dataset-297 folder from
``python -m TuckerSegLib.models.train_totalseg_layout``, or TotalSegmentator's own). Prints, per
target, the seconds of the search with an empty cache and with the curve already measured, the
points measured (MAC fraction, agreement, seconds per patch) and the choice. Targets from the issue:
full-width 3 mm network at most 5 minutes on 2 CPU cores and 1 minute on one GPU; each 1.5 mm part
model at most 10 minutes on CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from TuckerSegLib.devices import torch_device
from TuckerSegLib.pipeline.quality_target import choose_for_target, lower_precisions
from TuckerSegLib.progress import make_progress
from TuckerSegLib.specs import CompressionSpec, RunSpec


def _turns(seconds) -> str:
    return "" if seconds is None else f"; {seconds:.2f} s timed in turns"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--targets", type=float, nargs="+", default=[0.95, 0.90])
    p.add_argument("--policy", default="budget")
    p.add_argument("--device", default="cpu")
    p.add_argument("--validate-on", nargs="*", default=[])
    p.add_argument("--precisions", nargs="+", default=None,
                   help="precisions the target may choose (default: what `tuckerseg segment` allows here, "
                        "f32, plus bf16 on CPUs with native bf16 and int8 on CPUs with VNNI or AMX)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch_device(args.device)
    precisions = tuple(args.precisions or lower_precisions(RunSpec(), device))
    cache = Path(tempfile.mkdtemp(prefix="target-search-"))
    rows = []
    for target in args.targets:
        spec = CompressionSpec(min_agreement=target, policy=args.policy, validate_on=tuple(args.validate_on))
        t0 = time.perf_counter()
        choice = choose_for_target(args.model_dir, spec, device=device, cache_dir=cache,
                                   progress=make_progress("none"), precisions=precisions)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        choose_for_target(args.model_dir, spec, device=device, cache_dir=cache, progress=make_progress("none"),
                          precisions=precisions)
        again = time.perf_counter() - t0
        points = [{"macs_fraction": round(q.macs_fraction, 4), "agreement": q.agreement, "source": q.source,
                   "precision": q.precision, "seconds_per_patch": q.seconds_per_patch, "engine": q.engine,
                   "seconds_in_turns": q.seconds_in_turns, "by_source": q.by_source} for q in choice.curve.points]
        rows.append({"target": target, "seconds_first": round(first, 1), "seconds_again": round(again, 2),
                     "choice": choice.summary(target), "points": points,
                     "reference_seconds_per_patch": choice.curve.reference_seconds_per_patch})
        print(f"target {target:g}: {first:6.1f} s first (curve so far reused), {again:5.2f} s again -> "
              f"{choice.summary(target)}", flush=True)
        for q in points:
            print(f"    {100 * q['macs_fraction']:5.1f} % MACs {q['source']:>9} {q['precision']:>4}  agreement "
                  f"{q['agreement']:.3f}  {q['seconds_per_patch']:.2f} s/patch ({q['engine']})"
                  f"{_turns(q['seconds_in_turns'])}")
    result = {"command": "python benchmarks/bench_target_search.py " + " ".join(sys.argv[1:]),
              "model": str(args.model_dir), "device": str(device), "precisions": list(precisions),
              "validation": choice.validation, "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
