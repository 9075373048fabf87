"""Quality targets on a trained TotalSegmentator-layout network, as users run them (whole process).

Runs, side by side in one run, on the held-out part of ``example_ct`` (never used for training,
validation or calibration): stock ``TotalSegmentator --fast``, ``tuckerseg segment --fast`` at
ratio 1.0, with the default quality target (0.95), with ``--min-agreement 0.90`` (phantoms only,
and with ``--validate-on`` the unlabelled part of the CT), and with a target nothing compressed
meets (0.999). Each configuration runs cold (empty TuckerSeg cache: with ``--quality-search now``
the quality curve is measured in that run and networks are compressed) and warm (second run), in a
fresh process each time. The row "default, curve measured in the background" is what the command
line does by default: its cold run runs the original network and leaves the curve to a detached
search; the benchmark waits for that search (its time is printed) before the warm run. Prints seconds,
speed-up against stock, MACs kept, the predicted agreement and the agreement measured on the
held-out CT against the ratio-1.0 output (mean Dice over the classes present, voxels pooled).

    python benchmarks/bench_quality_target.py --weights /work/trained/ts297_w16 --json out.json

``--weights`` is a TotalSegmentator weights root holding a trained dataset-297 folder (build one
with ``python -m TuckerSegLib.models.train_totalseg_layout``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from bench_common import wait_for_background_search
from TuckerSegLib.models.train_totalseg_layout import write_part
from TuckerSegLib.pipeline.quality_target import pooled_mean_dice
from TuckerSegLib.progress import parse_event

BIN = Path(sys.executable).parent
NOW = ["--quality-search", "now"]  # cold = the run that measures the curve
CONFIGS = [  # (name, tuckerseg segment arguments; None = stock TotalSegmentator)
    ("stock TotalSegmentator", None),
    ("ratio 1.0", ["--ratio", "1.0"]),
    ("default target 0.95", NOW),
    ("default, curve measured in the background", []),  # the command line's default
    ("target 0.90", ["--min-agreement", "0.90", *NOW]),
    ("target 0.90 + validate-on CT", ["--min-agreement", "0.90", "--validate-on", "{unlabelled}", *NOW]),
    ("target 0.999 (unmet)", ["--min-agreement", "0.999", *NOW]),
]


def _run(cmd, env) -> tuple:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stderr[-3000:]}")
    events = [e for e in map(parse_event, proc.stdout.splitlines()) if e]
    result = next((e["result"] for e in events if e["type"] == "result"), {})
    return seconds, result, [e["message"] for e in events if e["type"] == "log"]


def _labels(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(nib.load(str(path)).dataobj).astype(np.int64))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, required=True, help="TotalSegmentator weights root (trained 297)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--skip", nargs="*", default=[], metavar="CONFIG",
                   help="configurations to leave out, by name (stock and ratio 1.0 always run)")
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-quality-"))
    parts = work / "parts"
    heldout, _ = write_part("heldout", parts)
    unlabelled, _ = write_part("unlabelled", parts)
    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.json").write_text(json.dumps({"totalseg_id": "bench", "send_usage_stats": False,
                                                  "prediction_counter": 0, "statistics_disclaimer_shown": True}))
    env = dict(os.environ, TOTALSEG_HOME_DIR=str(home), TOTALSEG_WEIGHTS_PATH=str(args.weights),
               PYTHONUNBUFFERED="1")
    rows = []
    outputs = {}
    for name, extra in CONFIGS:
        if name in args.skip and name not in ("stock TotalSegmentator", "ratio 1.0"):
            continue
        cache = work / f"cache-{len(rows)}"
        row = {"config": name, "runs": []}
        for attempt in ("cold", "warm"):
            out = work / f"out-{len(rows)}-{attempt}.nii.gz"
            if extra is None:
                cmd = [str(BIN / "TotalSegmentator"), "-i", str(heldout), "-o", str(out), "--fast", "--ml",
                       "-d", "cpu", "-q"]
            else:
                cmd = [str(BIN / "tuckerseg"), "segment", "-i", str(heldout), "-o", str(out), "--fast",
                       "--device", "cpu", "--cache-dir", str(cache), "--progress", "json",
                       *[a.format(unlabelled=unlabelled) for a in extra]]
            seconds, result, logs = _run(cmd, env)
            row["runs"].append({"attempt": attempt, "seconds": round(seconds, 2)})
            if attempt == "cold" and extra is not None and "now" not in extra and "--ratio" not in extra:
                # a first run that left the curve to a detached search: the warm run comes after it
                row["background_search"] = wait_for_background_search(cache / "quality_search.log")
                print(f"{name:>30} background search: {row['background_search']}", flush=True)
            outputs[name] = out
            if result:
                row.update(macs_kept=round(result["macs"] / result["macs_original"], 4),
                           predicted_agreement=result.get("predicted_agreement"),
                           agreement_source=result.get("agreement_source"),
                           engines=sorted({f"{(m.get('engine') or {}).get('name', 'torch')} "
                                           f"{(m.get('engine') or {}).get('precision', 'f32')}"
                                           for m in result.get("models", [])}),
                           said=[m for m in logs if "quality target" in m or "original network" in m
                                 or "MACs, predicted" in m])
            print(f"{name:>30} {attempt}: {seconds:6.1f} s", flush=True)
        rows.append(row)
    reference = _labels(outputs["ratio 1.0"])
    stock = min(r["seconds"] for r in rows[0]["runs"])
    k = int(max(int(_labels(o).max()) for o in outputs.values())) + 1
    print(f"\n{'configuration':>30} {'cold s':>7} {'warm s':>7} {'vs stock':>8} {'MACs':>6} "
          f"{'predicted':>9} {'held-out':>8}  engine")
    for row in rows:
        row["agreement_heldout"] = round(pooled_mean_dice(reference, _labels(outputs[row["config"]]), k), 4)
        cold, warm = (r["seconds"] for r in row["runs"])
        row["speedup_warm_vs_stock"] = round(stock / warm, 2)
        pred = row.get("predicted_agreement")
        print(f"{row['config']:>30} {cold:7.1f} {warm:7.1f} {row['speedup_warm_vs_stock']:7.2f}x "
              f"{row.get('macs_kept', 1.0):6.3f} {('-' if pred is None else f'{pred:.3f}'):>9} "
              f"{row['agreement_heldout']:8.3f}  {', '.join(row.get('engines', [])) or 'stock'}")
    for row in rows:
        if "background_search" in row:
            print(f"{row['config']}: the first run ran the original network; the detached search then took "
                  f"{row['background_search']['waited_seconds']:.0f} s more ({row['background_search']['said']})")
    result = {"command": "python benchmarks/bench_quality_target.py " + " ".join(sys.argv[1:]),
              "weights": str(args.weights), "heldout": str(heldout), "validate_on": str(unlabelled),
              "cpu": os.cpu_count(), "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
