"""Whole process, as users run it: stock TotalSegmentator, ``tuckerseg segment`` (cold and warm) and
the warm worker (``tuckerseg serve``), with the time breakdown and peak memory, side by side.

Why: per-patch and in-process speed-ups are not what a user feels. Each command here runs as a
new process, exactly as typed on a command line (the warm worker: one process, two requests on
two different CTs). Every ``tuckerseg`` setting runs cold first (an empty TuckerSeg cache: it
compresses, converts, times layer forms and measures quality curves as needed), then warm
(``--repeats`` fresh processes, minimum reported). The breakdown of a warm run comes from its own
result event: process start and imports (wall time not spent inside ``segment``), input check,
model load and engine preparation, and nnU-Net's prediction (preprocessing, network, export).
Peak memory is the PSS of the process and its workers. ``--exit-pairs N`` times N more warm runs
per setting in turns with the interpreter's ordinary exit, against the command's quick exit
(``cli.main.console_main``). ``--rounds N`` ends with N rounds in turns of stock and each
setting's warm run: on a machine whose speed drifts by tens of percent within an hour, the median
of those per-round ratios is the figure to quote (``--worker-rounds N`` the same for a fresh process
against the warm worker's request; ``--rounds-only --workdir W`` runs just those
again in an earlier run's folder, its caches warm and its searches ended; ``--cold-only --workdir W``
prepares such a folder: each setting's cold run and its searches, no stock and no warm runs). The
default (a quality target) measures its quality curve in a detached process after its cold run;
the warm runs start once that has ended.

    nice -n 5 python benchmarks/bench_whole_process.py --mode fast \\
        --json benchmarks/results/bench_whole_process_fast.json
    nice -n 5 python benchmarks/bench_whole_process.py --mode total --ct ../shared/data/example_ct_sm.nii.gz \\
        --repeats 1 --json benchmarks/results/bench_whole_process_total.json

Without ``--weights``, full-width test models with random weights in TotalSegmentator's layout are
built (times are representative, quality targets are not); ``--weights ROOT`` uses a trained
weights root (e.g. from ``python -m TuckerSegLib.models.train_totalseg_layout``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from bench_common import wait_for_background_search
from TuckerSegLib.evaluation.engine_bench import PeakRSS
from TuckerSegLib.progress import parse_event

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODES = {"fast": ([297], ["--fast"]), "total": ([291, 292, 293, 294, 295], [])}
SETTINGS = [  # (name, tuckerseg segment arguments)
    ("ratio 1.0 (PyTorch, stock voxel for voxel)", ["--ratio", "1.0"]),
    ("ratio 1.0, OpenVINO f32", ["--ratio", "1.0", "--engine", "openvino"]),
    ("default quality target 0.95", []),
    # what the default runs where no compressed network keeps 0.95 on this CPU (the original in
    # bf16), without its search: for `total` with random weights, whose curves mean nothing
    ("ratio 1.0, OpenVINO bf16", ["--ratio", "1.0", "--engine", "openvino", "--precision", "bf16"]),
    # the same with the sliding window's tiles one at a time on every core (as before map_tiles)
    ("ratio 1.0, OpenVINO bf16, one tile at a time", ["--ratio", "1.0", "--engine", "openvino", "--precision", "bf16"]),
    # the same as 3 with the training-only imports (torch._dynamo, scikit-learn, seaborn, pandas) not deferred
    ("ratio 1.0, OpenVINO bf16, training imports not deferred",
     ["--ratio", "1.0", "--engine", "openvino", "--precision", "bf16"]),
]
SETTING_ENV = {4: {"TUCKERSEG_TILE_STREAMS": "1"}, 5: {"TUCKERSEG_DEFER_IMPORTS": "0"}}  # environment of a setting's runs, beside the common one
SERVE_SETTING = 1  # the warm worker runs this setting by default (index into SETTINGS)


def run_process(cmd, env) -> dict:
    """Run one command as a new process: wall seconds, peak PSS (MB), its result event."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    with PeakRSS(interval=0.05, tree=True, pid=proc.pid) as mem:
        out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{err[-3000:]}")
    events = [e for e in map(parse_event, out.splitlines()) if e]
    result = next((e["result"] for e in events if e["type"] == "result"), None)
    return {"wall": wall, "peak_mb": mem.peak / 2 ** 20, "result": result}


def breakdown(wall: float, result: dict) -> dict:
    """Where a run's wall time went, from its result event."""
    t = result.get("timings", {})
    load = sum(v for k, v in t.items() if k.endswith("_load"))
    predict = sum(v for k, v in t.items() if k.endswith("_predict"))
    return {"process start and imports": wall - result["seconds"], "input check": t.get("check", 0.0),
            "model load and engine": load, "nnU-Net predict (preprocess, network, export)": predict,
            "other TotalSegmentator steps": max(0.0, t.get("segment", 0.0) - load - predict)}


# What ``tuckerseg segment`` imports before its clock starts, in the order it needs them, each
# timed after the ones above it in one fresh process: the rows are what each step adds.
IMPORT_STEPS = [
    ("torch", "import torch"),
    ("nnU-Net's predictor (training-only imports deferred as segment defers them)",
     "from TuckerSegLib.pipeline.lazy_imports import defer_training_imports; defer_training_imports(); "
     "import nnunetv2.inference.predict_from_raw_data"),
    ("TotalSegmentator (its nnunet module imports nnU-Net's trainer)",
     "import totalsegmentator.python_api, totalsegmentator.nnunet"),
    ("TuckerSeg's pipeline and OpenVINO", "import TuckerSegLib.pipeline.segment, openvino"),
]
_STEPS_CODE = ("import json, time\nt = [time.perf_counter()]\n" + "".join(
    f"{code}\nt.append(time.perf_counter())\n" for _, code in IMPORT_STEPS)
    + "print(json.dumps([b - a for a, b in zip(t, t[1:])]))")


def import_seconds(env) -> dict:
    """Seconds each of ``IMPORT_STEPS`` adds in a fresh process (the faster of two processes by
    their total) and the whole process's wall time, start and exit included."""
    best = None
    for _ in range(2):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", _STEPS_CODE], env=env, check=True, capture_output=True,
                             text=True).stdout
        wall = time.perf_counter() - t0
        if best is None or wall < best["process"]:
            best = {"process": wall, "steps": dict(zip((n for n, _ in IMPORT_STEPS), json.loads(out)))}
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ct", type=Path, default=REPO.parent / "shared" / "data" / "example_ct.nii.gz")
    p.add_argument("--mode", choices=sorted(MODES), default="fast")
    p.add_argument("--weights", type=Path, default=None, help="trained TotalSegmentator weights root")
    p.add_argument("--repeats", type=int, default=2, help="warm runs per setting (minimum reported)")
    p.add_argument("--settings", type=int, nargs="+", default=list(range(len(SETTINGS))),
                   help="indices into the settings list: " + "; ".join(f"{i}: {n}" for i, (n, _) in enumerate(SETTINGS)))
    p.add_argument("--exit-pairs", type=int, default=0, metavar="N",
                   help="per setting, N warm runs more in turns with the interpreter's ordinary exit "
                        "(python -c main()), against the tuckerseg command's quick exit")
    p.add_argument("--rounds", type=int, default=0, metavar="N",
                   help="at the end, N rounds in turns of stock then each setting's warm run, so that "
                        "each ratio compares runs made in the same machine state (medians reported)")
    p.add_argument("--worker-rounds", type=int, default=0, metavar="N",
                   help="at the end, N rounds in turns of a fresh process and the warm worker's request on the "
                        "second CT (the worker started once, warmed by one request; medians reported)")
    p.add_argument("--rounds-only", action="store_true",
                   help="with --workdir of an earlier run (its caches warm, its searches ended): only the --rounds")
    p.add_argument("--cold-only", action="store_true",
                   help="with --workdir: only each setting's cold run, waiting for its searches (no stock, no "
                        "warm runs); a later --rounds-only in that folder compares the warm runs with stock")
    p.add_argument("--serve-setting", type=int, default=SERVE_SETTING, metavar="I",
                   help=f"the setting the warm worker runs, if among --settings (default {SERVE_SETTING}; "
                        "2 is what the Slicer module runs)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.rounds_only and not (args.workdir and args.rounds):
        p.error("--rounds-only needs the --workdir of an earlier run and --rounds N")
    if args.cold_only and (args.rounds_only or not args.workdir):
        p.error("--cold-only needs --workdir (for a later --rounds-only) and excludes --rounds-only")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-whole-"))
    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.json").write_text(json.dumps({"totalseg_id": "bench", "send_usage_stats": False,
                                                  "prediction_counter": 0, "statistics_disclaimer_shown": True}))
    env = dict(os.environ, TOTALSEG_HOME_DIR=str(home), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    ids, mode_flags = MODES[args.mode]
    if args.weights:
        env["TOTALSEG_WEIGHTS_PATH"] = str(args.weights)
    else:
        from TuckerSegLib.models.totalseg_layout import build_models

        env.pop("TOTALSEG_WEIGHTS_PATH", None)
        build_models(home / "nnunet" / "results", ids, width_scale=1.0)
    img = nib.load(str(args.ct))
    other = work / "other_ct.nii.gz"  # a second CT for the warm worker's second request
    nib.save(nib.Nifti1Image(np.ascontiguousarray(np.asarray(img.dataobj)[::-1]), img.affine, img.header), other)
    cases = [args.ct, other]

    rows = []

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    imports = import_seconds(env)
    log(f"imports of a fresh process: {imports['process']:.1f} s")
    stock_cmd = [BIN / "TotalSegmentator", "-i", args.ct, "-o", work / "stock.nii.gz", *mode_flags, "--ml",
                 "-d", "cpu", "-q"]
    if not (args.rounds_only or args.cold_only):
        stock = [run_process(stock_cmd, env) for _ in range(1 + args.repeats)]
        rows.append({"run": "stock TotalSegmentator", "cold_seconds": stock[0]["wall"],
                     "warm_seconds": min(r["wall"] for r in stock[1:]),
                     "peak_mb": max(r["peak_mb"] for r in stock)})
        log(f"stock: {[round(r['wall'], 1) for r in stock]}")

    warm_cmds = []  # (run, command) of each setting's warm run, for --rounds
    worker_cmds = None  # the warm worker's setting: its name, warm-up and turn commands
    common_env = env
    for index in args.settings:
        name, extra = SETTINGS[index]
        cache = work / f"cache-{index}"
        env = dict(common_env, **SETTING_ENV.get(index, {}))

        def cmd(ct, out):
            return [sys.executable, "-m", "TuckerSegLib", "segment", "-i", ct, "-o", out, *mode_flags,
                    "--device", "cpu", "--cache-dir", cache, "--progress", "json", *extra]

        warm_cmds.append((f"tuckerseg segment, {name}", cmd(args.ct, work / f"round-{index}.nii.gz"), env))
        if index == args.serve_setting:
            worker_cmds = (name, cmd(args.ct, work / "worker-warmup.nii.gz")[4:],
                           cmd(other, work / "fresh-turns.nii.gz"), cmd(other, work / "worker-turns.nii.gz")[4:], env)
        if args.rounds_only:
            continue
        cold = run_process(cmd(args.ct, work / f"cold-{index}.nii.gz"), env)
        search = None
        if not any(a in extra for a in ("--ratio", "--quality-search")):
            # the default left the quality curve to a detached search: warm runs come after it
            search = wait_for_background_search(cache / "quality_search.log")
            log(f"{name}: background search {search}")
        if args.cold_only:
            rows.append({"run": f"tuckerseg segment, {name}", "args": extra, "cold_seconds": cold["wall"],
                         "peak_mb": cold["peak_mb"], "background_search": search})
            log(f"{name}: cold {cold['wall']:.1f} s")
            continue
        warm = [run_process(cmd(args.ct, work / f"warm-{index}.nii.gz"), env) for _ in range(args.repeats)]
        best = min(warm, key=lambda r: r["wall"])
        res = best["result"]
        rows.append({"run": f"tuckerseg segment, {name}", "args": extra, "cold_seconds": cold["wall"],
                     "warm_seconds": best["wall"], "peak_mb": max(r["peak_mb"] for r in [cold, *warm]),
                     "breakdown": {k: round(v, 2) for k, v in breakdown(best["wall"], res).items()},
                     "macs_kept": round(res["macs"] / max(1, res["macs_original"]), 4),
                     "predicted_agreement": res.get("predicted_agreement"),
                     "agreement_source": res.get("agreement_source"),
                     "engines": sorted({f"{(m.get('engine') or {}).get('name', 'torch')} "
                                        f"{(m.get('engine') or {}).get('precision', 'f32')}" for m in res["models"]}),
                     "background_search": search})
        log(f"{name}: cold {cold['wall']:.1f} s, warm {[round(r['wall'], 1) for r in warm]}")

        if args.exit_pairs:  # the quick exit against the interpreter's ordinary teardown, in turns
            ordinary = [sys.executable, "-c", "import sys; from TuckerSegLib.cli.main import main; sys.exit(main())"]
            pairs = []
            for _ in range(args.exit_pairs):
                quick = run_process(cmd(args.ct, work / f"quick-{index}.nii.gz"), env)["wall"]
                slow = run_process(ordinary + cmd(args.ct, work / f"ordinary-{index}.nii.gz")[3:], env)["wall"]
                pairs.append((quick, slow))
            rows[-1]["exit_pairs"] = [[round(q, 2), round(o, 2)] for q, o in pairs]
            log(f"{name}: quick exit / ordinary exit, in turns: {rows[-1]['exit_pairs']}")

        if index == args.serve_setting:  # the warm worker: one process, two requests on two CTs
            from TuckerSegLib.serve import ServeClient

            fresh_other = run_process(cmd(other, work / f"fresh-other-{index}.nii.gz"), env)
            t0 = time.perf_counter()
            with ServeClient(env=env) as client:
                with PeakRSS(interval=0.05, tree=True, pid=client.pid) as mem:
                    ready = time.perf_counter() - t0
                    seconds = []
                    for i, ct in enumerate(cases):
                        t1 = time.perf_counter()
                        client.segment(cmd(ct, work / f"serve-{i}.nii.gz")[4:])
                        seconds.append(time.perf_counter() - t1)
            rows.append({"run": f"tuckerseg serve, {name}", "args": extra, "start_seconds": ready,
                         "first_request_seconds": seconds[0], "second_request_seconds": seconds[1],
                         "fresh_process_seconds_same_ct": fresh_other["wall"],
                         "second_request_vs_fresh_process": fresh_other["wall"] / seconds[1],
                         "peak_mb": mem.peak / 2 ** 20})
            log(f"serve: ready {ready:.1f} s, requests {[round(s, 1) for s in seconds]}, "
                f"fresh process on the second CT {fresh_other['wall']:.1f} s")

    worker_rounds = []  # (fresh process, the warm worker's request) on the second CT, in turns
    if args.worker_rounds and worker_cmds:
        from TuckerSegLib.serve import ServeClient

        name, warmup, fresh_cmd, request, env = worker_cmds
        with ServeClient(env=env) as client:
            client.segment(warmup)
            for _ in range(args.worker_rounds):
                fresh = run_process(fresh_cmd, env)["wall"]
                t1 = time.perf_counter()
                client.segment(request)
                worker_rounds.append((fresh, time.perf_counter() - t1))
                log(f"worker round in turns (fresh process, request): {[round(t, 1) for t in worker_rounds[-1]]}")

    rounds = []  # stock, then each setting's warm run, in turns: the same machine state for each
    for _ in range(args.rounds):
        rounds.append([run_process(stock_cmd, common_env)["wall"],
                       *(run_process(c, e)["wall"] for _, c, e in warm_cmds)])
        log(f"round in turns (stock, then each setting): {[round(t, 1) for t in rounds[-1]]}")

    stock_warm = rows[0]["warm_seconds"] if rows and not args.cold_only else None
    print(f"\nTotalSegmentator {' '.join(mode_flags) or '(total, 1.5 mm)'} on {args.ct.name}, "
          f"{'trained weights ' + str(args.weights) if args.weights else 'test models (random weights)'}, "
          f"{os.cpu_count()} CPUs, a fresh process that only imports what `segment` runs: "
          f"{imports['process']:.1f} s")
    for name, seconds in imports["steps"].items():
        print(f"  import {name:71s} {seconds:5.2f} s")
    print(f"{'run':58s} {'cold s':>7s} {'warm s':>7s} {'vs stock':>8s} {'peak MB':>8s}")
    for r in rows:
        if args.cold_only:
            print(f"{r['run']:58s} {r['cold_seconds']:7.1f} {'-':>7s} {'-':>8s} {r['peak_mb']:8.0f}")
        elif "warm_seconds" in r:
            r["speedup_warm_vs_stock"] = round(stock_warm / r["warm_seconds"], 2)
            print(f"{r['run']:58s} {r['cold_seconds']:7.1f} {r['warm_seconds']:7.1f} "
                  f"{r['speedup_warm_vs_stock']:7.2f}x {r['peak_mb']:8.0f}")
        else:
            r["second_request_vs_stock"] = round(stock_warm / r["second_request_seconds"], 2)
            print(f"{r['run'] + ' (start / 1st / 2nd request)':58s} {r['start_seconds']:7.1f} "
                  f"{r['first_request_seconds']:7.1f} {r['second_request_vs_stock']:7.2f}x {r['peak_mb']:8.0f}")
            print(f"{'  2nd request vs a fresh process on the same CT':58s} "
                  f"{r['fresh_process_seconds_same_ct']:7.1f} {r['second_request_seconds']:7.1f} "
                  f"{r['second_request_vs_fresh_process']:7.2f}x")
    if rounds:
        print(f"\nin turns, {len(rounds)} rounds of stock then each setting (median of the per-round ratios):")
        for i, (run, _, _) in enumerate(warm_cmds):
            ratios = [r[0] / r[1 + i] for r in rounds]
            print(f"  {run:56s} {float(np.median([r[1 + i] for r in rounds])):7.1f} s  "
                  f"{float(np.median(ratios)):5.2f}x stock (rounds {', '.join(f'{x:.2f}' for x in ratios)})")
        print(f"  {'stock TotalSegmentator':56s} {float(np.median([r[0] for r in rounds])):7.1f} s")
    if worker_rounds:
        ratios = [f / w for f, w in worker_rounds]
        print(f"\nin turns, {len(worker_rounds)} rounds of a fresh process then the warm worker's request "
              f"({worker_cmds[0]}, second CT): fresh {float(np.median([f for f, _ in worker_rounds])):.1f} s, "
              f"request {float(np.median([w for _, w in worker_rounds])):.1f} s, {float(np.median(ratios)):.2f}x "
              f"(rounds {', '.join(f'{x:.2f}' for x in ratios)})")
    for r in rows:
        if r.get("exit_pairs"):
            quick, slow = (min(x) for x in zip(*r["exit_pairs"]))
            print(f"\n{r['run']}: quick exit {quick:.1f} s, ordinary exit {slow:.1f} s (best of "
                  f"{len(r['exit_pairs'])} in turns; {slow - quick:.1f} s of interpreter teardown saved)")
        if r.get("background_search"):
            print(f"\n{r['run']}: the cold run ran the original network and left the quality curve to a "
                  f"detached search, which took {r['background_search']['waited_seconds']:.0f} s more "
                  f"({r['background_search']['said']}); warm runs came after it")
        if "breakdown" in r:
            print(f"\nbreakdown, warm: {r['run']}")
            for k, v in r["breakdown"].items():
                print(f"  {k:50s} {v:6.2f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": "python benchmarks/bench_whole_process.py " + " ".join(sys.argv[1:]),
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
            "ct": args.ct.name, "mode": args.mode, "weights": str(args.weights) if args.weights else None,
            "imports_seconds": round(imports["process"], 2),
            "import_steps_seconds": {k: round(v, 2) for k, v in imports["steps"].items()}, "rows": rows,
            "rounds_in_turns": {"runs": ["stock TotalSegmentator", *(n for n, _, _ in warm_cmds)],
                                "seconds": [[round(t, 2) for t in r] for r in rounds]},
            "worker_rounds_in_turns": {"setting": worker_cmds[0] if worker_cmds else None,
                                       "fresh_and_request_seconds": [[round(t, 2) for t in r] for r in worker_rounds]}},
            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
