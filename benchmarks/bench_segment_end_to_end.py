"""End to end: stock TotalSegmentator vs ``tuckerseg segment`` at several ratios, one process.

Why: the per-patch speed-ups of compressed networks only matter if they survive TotalSegmentator's
whole pipeline (resampling, preprocessing workers, sliding window, export). This runs the real
pipeline on a real CT with full-width test models in TotalSegmentator's layout (random weights:
timings are representative, segmentations are not) and prints times, speed-ups, the MAC limit and
peak memory (PSS of this process and its workers) side by side; writes JSON and a PNG.

    nice -n 10 python benchmarks/bench_segment_end_to_end.py --ct ../shared/data/example_ct.nii.gz \
        --mode fast --ratios 1.0 0.5 0.3 0.1 --json bench_segment.json

Each ratio (and engine config, ``--configs openvino:f32 openvino:bf16``) first runs cold
(decomposes, converts, times layer forms and fills the cache); then stock and every run go
interleaved ``--repeats`` times from the cache; speed-up = min stock time / min time.
``--mode total`` uses the five 1.5 mm models (slow on CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from TuckerSegLib.cli.bench_cmd import _config  # ENGINE:PRECISION, as tuckerseg bench

MODES = {"fast": ([297], {"fast": True}), "fastest": ([298], {"fastest": True}),
         "total": ([291, 292, 293, 294, 295], {})}


def _setup_home(home: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "config.json"
    if not cfg.exists():
        cfg.write_text(json.dumps({"totalseg_id": "totalseg_bench", "send_usage_stats": False,
                                   "prediction_counter": 0, "statistics_disclaimer_shown": True}))
    os.environ["TOTALSEG_HOME_DIR"] = str(home)
    os.environ.pop("TOTALSEG_WEIGHTS_PATH", None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ct", type=Path, default=REPO.parent / "shared" / "data" / "example_ct.nii.gz")
    p.add_argument("--mode", choices=sorted(MODES), default="fast")
    p.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.5, 0.3, 0.1])
    p.add_argument("--policy", default="budget")
    p.add_argument("--configs", nargs="+", type=_config, default=[("auto", "auto")], metavar="ENGINE:PRECISION",
                   help="engine configs run at every ratio below 1 (ratio 1 runs auto:auto)")
    p.add_argument("--layer-forms", default="auto", choices=["auto", "as-is"])
    p.add_argument("--width-scale", type=float, default=1.0, help="1.0 = TotalSegmentator's widths")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keeps test models and cache between runs (default: a temporary folder)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per configuration (min is reported)")
    p.add_argument("--json", type=Path, default=None, help="write the results here (and a PNG beside it)")
    p.add_argument("--png", type=Path, default=None, help="plot (default: the JSON path with .png)")
    args = p.parse_args(argv)

    from TuckerSegLib.models import totalseg_layout
    from TuckerSegLib.evaluation.engine_bench import PeakRSS
    from TuckerSegLib import segment
    from totalsegmentator.python_api import totalsegmentator

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tuckerseg-bench-"))
    home = workdir / "totalseg_home"
    _setup_home(home)
    ids, mode_kwargs = MODES[args.mode]
    t0 = time.perf_counter()
    totalseg_layout.build_models(home / "nnunet" / "results", ids, width_scale=args.width_scale)
    print(f"test models ready ({time.perf_counter() - t0:.1f} s) in {home}", file=sys.stderr)
    out = workdir / "out"
    out.mkdir(exist_ok=True)
    cache = workdir / "cache"

    # Warm-up (imports, first allocations) on the small CT, not timed.
    small = args.ct.parent / "example_ct_sm.nii.gz"
    if small.exists():
        totalsegmentator(str(small), str(out / "warmup.nii.gz"), ml=True, device=args.device,
                         quiet=True, **mode_kwargs)

    runs = []  # (label, ratio, engine, precision)
    for ratio in args.ratios:
        for engine, precision in ([("auto", "auto")] if ratio >= 1.0 else args.configs):
            runs.append((f"r{ratio:g} {engine}:{precision}", ratio, engine, precision))

    def run_once(ratio, engine, precision, name):
        return segment(args.ct, out / name, ratio=ratio, policy=args.policy, device=args.device,
                       cache_dir=cache, engine=engine, precision=precision, layer_forms=args.layer_forms,
                       quiet=True, **mode_kwargs)

    # Cold runs first: each decomposes its networks once and fills the caches.
    cold = {}
    for label, ratio, engine, precision in runs:
        cold[label] = run_once(ratio, engine, precision, f"cold_{len(cold)}.nii.gz")
        print(f"cold {label}: {cold[label].seconds:.1f} s", file=sys.stderr)

    # Timed runs, interleaved (stock, then every run) and repeated: the minimum per run is
    # reported, so that load from other processes on a shared machine does not decide the result.
    times = {"stock": []}
    times.update({label: [] for label, *_ in runs})
    peak = {label: 0 for label in times}  # bytes, this process and its worker processes
    warm = {}
    for rep in range(args.repeats):
        t = time.perf_counter()
        with PeakRSS(interval=0.1, tree=True) as mem:
            totalsegmentator(str(args.ct), str(out / "stock.nii.gz"), ml=True, device=args.device,
                             quiet=True, **mode_kwargs)
        times["stock"].append(time.perf_counter() - t)
        peak["stock"] = max(peak["stock"], mem.peak)
        for i, (label, ratio, engine, precision) in enumerate(runs):
            with PeakRSS(interval=0.1, tree=True) as mem:
                r = run_once(ratio, engine, precision, f"run_{i}.nii.gz")
            times[label].append(r.seconds)
            peak[label] = max(peak[label], mem.peak)
            warm[label] = r
        print(f"repeat {rep + 1}: " + ", ".join(f"{k}: {v[-1]:.1f} s" for k, v in times.items()),
              file=sys.stderr)

    stock = min(times["stock"])
    rows = [{"run": "stock TotalSegmentator", "ratio": None, "seconds": stock,
             "all_seconds": times["stock"], "cold_seconds": None, "peak_rss_mb": peak["stock"] / 2 ** 20,
             "macs_ratio": 1.0}]
    for label, ratio, engine, precision in runs:
        w = warm[label]
        used = [m.get("engine") or {} for m in w.models]
        rows.append({"run": "tuckerseg " + " ".join(sorted({f"{u.get('name', 'torch')}:{u.get('precision', 'f32')}"
                                                             for u in used})),
                     "ratio": ratio, "requested": f"{engine}:{precision}", "seconds": min(times[label]),
                     "all_seconds": times[label], "cold_seconds": cold[label].seconds,
                     "params": w.params, "macs": w.macs, "params_original": w.params_original,
                     "macs_original": w.macs_original, "macs_ratio": w.macs / max(1, w.macs_original),
                     "peak_rss_mb": peak[label] / 2 ** 20,
                     "load_seconds": sum(m["load_seconds"] for m in w.models),
                     "predict_seconds": sum(m["predict_seconds"] for m in w.models)})

    header = (f"{'run':<30}{'ratio':>7}{'seconds':>10}{'median':>8}{'speed-up':>10}{'MAC lim':>9}{'cold s':>9}"
              f"{'params M':>10}{'GMACs/patch':>13}{'peak MB':>9}")
    print(f"\nTotalSegmentator --{args.mode if args.mode != 'total' else 'default'} on {args.ct.name}, "
          f"device {args.device}, width {args.width_scale:g}, policy {args.policy}, "
          f"min of {args.repeats} runs, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()})")
    print(header)
    print("-" * len(header))
    for r in rows:
        speed = stock / r["seconds"]
        r["speedup"] = speed
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:g}"
        cold = "-" if r["cold_seconds"] is None else f"{r['cold_seconds']:.1f}"
        params = f"{r['params'] / 1e6:.2f}" if "params" in r else "-"
        macs = f"{r['macs'] / 1e9:.1f}" if "macs" in r else "-"
        r["median_seconds"] = statistics.median(r["all_seconds"])
        print(f"{r['run']:<30}{ratio:>7}{r['seconds']:>10.1f}{r['median_seconds']:>8.1f}{speed:>9.2f}x"
              f"{1 / r['macs_ratio']:>8.2f}x{cold:>9}{params:>10}{macs:>13}{r['peak_rss_mb']:>9.0f}")
    result = {"ct": str(args.ct), "mode": args.mode, "device": args.device,
              "width_scale": args.width_scale, "policy": args.policy,
              "layer_forms": args.layer_forms, "command": " ".join(sys.argv),
              "cpus": os.cpu_count(), "repeats": args.repeats, "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.json or args.png:
        png = plot(result, args.png or args.json.with_suffix(".png"))
        print(f"wrote {', '.join(str(p) for p in (args.json, png) if p)}")
    return 0


def plot(result: dict, path: Path) -> Path:
    """Seconds per run (minimum, bar) with speed-up against stock and the MAC limit as labels."""
    from TuckerSegLib.evaluation.plots import pyplot, save_figure

    plt = pyplot()
    rows = result["rows"]
    stock = rows[0]["seconds"]
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 4.2))
    labels = [r["run"].replace("tuckerseg ", "") + ("" if r["ratio"] is None else f"\nratio {r['ratio']:g}")
              for r in rows]
    bars = ax.bar(range(len(rows)), [r["seconds"] for r in rows],
                  color=["grey"] + ["tab:blue"] * (len(rows) - 1))
    for bar, r in zip(bars, rows):
        ax.annotate(f"{stock / r['seconds']:.2f}x\n(MAC lim {1 / r['macs_ratio']:.1f}x)\n{r['peak_rss_mb']:.0f} MB",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("seconds (min of runs)")
    ax.set_ylim(0, stock * 1.35)
    ax.set_title(f"TotalSegmentator --{result['mode']} end to end on {Path(result['ct']).name}, "
                 f"{result['device']}, {result['cpus']} CPUs, policy {result['policy']}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, tight=False)


if __name__ == "__main__":
    sys.exit(main())
