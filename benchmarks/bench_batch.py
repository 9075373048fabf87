"""Cohort throughput: ``tuckerseg batch`` vs shell loops over stock TotalSegmentator and ``tuckerseg segment``.

Why: researchers run thousands of CTs. A shell loop pays the imports, the model load and the
engine start for every case; ``tuckerseg batch`` pays them once per Ray worker. This times all
three as a user runs them (a new process per case for the loops, one command for the batch) on N
small CTs derived from ``example_ct`` (the CT, flips and crops), with test models in
TotalSegmentator's layout (random weights: times are representative, segmentations are not), and
prints cases/hour side by side.

    nice -n 10 python benchmarks/bench_batch.py --cases 8 --ratios 1.0 --engines auto openvino \
        --json benchmarks/results/bench_batch.json

Ratio 1.0 is the same network as stock (the same quality settings: ``--fast --ml``), so its
speed-up is the pipeline's alone; lower ratios add compression's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_cases(ct: Path, folder: Path, n: int) -> list:
    """``n`` CTs from one: the CT itself, flips along each axis, crops of 2/3 and 3/4."""
    import nibabel as nib
    import numpy as np

    img = nib.load(str(ct))
    a = np.asarray(img.dataobj)
    variants = [lambda x: x, lambda x: x[::-1], lambda x: x[:, ::-1], lambda x: x[:, :, ::-1],
                lambda x: x[:, :, : x.shape[2] * 2 // 3], lambda x: x[: x.shape[0] * 3 // 4],
                lambda x: x[:, : x.shape[1] * 3 // 4, ::-1], lambda x: x[::-1, ::-1]]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        data = variants[i % len(variants)](a)
        p = folder / f"case{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), img.affine, img.header), str(p))
        paths.append(p)
    return paths


def timed(cmds: list, env: dict) -> float:
    t0 = time.perf_counter()
    for cmd in cmds:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def agreement_with_stock(workdir: Path, outputs: list) -> float:
    """Mean over cases of the mean Dice (classes present, ``pooled_mean_dice``) against stock's output."""
    import nibabel as nib
    import numpy as np
    import torch

    from TuckerSegLib.pipeline.quality_target import pooled_mean_dice

    values = []
    for out in outputs:
        case = out.parent.name + ".nii.gz" if out.name == "segmentation.nii.gz" else out.name
        stock = workdir / "stock" / case
        a, b = (torch.from_numpy(np.asarray(nib.load(str(p)).dataobj).astype(np.int64)) for p in (stock, out))
        values.append(pooled_mean_dice(a, b, int(max(a.max(), b.max())) + 1))
    return round(float(np.mean(values)), 4)


def run_variant(args, cases, workdir: Path, env: dict, ratio: float, engine: str, report) -> None:
    """A shell loop of ``tuckerseg segment`` and one ``tuckerseg batch`` at one setting."""
    common = ["--fast", "--ml", "--device", "cpu", "--ratio", str(ratio), "--policy", args.policy,
              "--engine", engine]
    label = f"ratio {ratio:g}" + ("" if engine == "auto" else f", {engine}")
    tag = f"{ratio}-{engine}"
    # cold run at this setting first (fills the compression and engine caches), not timed
    warm = workdir / f"warm-{tag}"
    warm.mkdir(exist_ok=True)
    timed([[sys.executable, "-m", "TuckerSegLib", "segment", "-i", str(cases[0]), "-o",
            str(warm / "seg.nii.gz"), *common, "--progress", "none"]], env)
    out = workdir / f"segment-{tag}"
    out.mkdir(exist_ok=True)
    report(f"tuckerseg segment loop, {label}",
           timed([[sys.executable, "-m", "TuckerSegLib", "segment", "-i", str(c), "-o",
                   str(out / c.name), *common, "--progress", "none"] for c in cases], env))
    out = workdir / f"batch-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    extra = ["--workers", str(args.workers)] if args.workers else []
    report(f"tuckerseg batch, {label}",
           timed([[sys.executable, "-m", "TuckerSegLib", "batch", str(workdir / "cases"), "-o", str(out),
                   *common, "--progress", "none", *extra]], env))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == len(cases), summary
    if not args.skip_stock:  # the same quality settings: agreement with stock, case by case
        loop = [workdir / f"segment-{tag}" / c.name for c in cases]
        batch = [out / "cases" / c.name.replace(".nii.gz", "") / "segmentation.nii.gz" for c in cases]
        for name, outputs in ((f"tuckerseg segment loop, {label}", loop), (f"tuckerseg batch, {label}", batch)):
            report.agreement(name, agreement_with_stock(workdir, outputs))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ct", type=Path, default=REPO.parent / "shared" / "data" / "example_ct.nii.gz")
    p.add_argument("--cases", type=int, default=6)
    p.add_argument("--ratios", type=float, nargs="+", default=[1.0])
    p.add_argument("--policy", default="budget")
    p.add_argument("--engines", nargs="+", default=["auto"],
                   help="run each ratio with each engine (auto at ratio 1.0 = PyTorch, voxel for voxel "
                        "stock; openvino = the same network and precision on OpenVINO)")
    p.add_argument("--width-scale", type=float, default=1.0, help="1.0 = TotalSegmentator's widths")
    p.add_argument("--weights", type=Path, default=None,
                   help="a trained TotalSegmentator weights root (e.g. from train_totalseg_layout) instead of "
                        "test models with random weights: the agreement with stock is then meaningful")
    p.add_argument("--workers", type=int, default=None, help="tuckerseg batch --workers (default: auto)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--skip-stock", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    from TuckerSegLib.models.totalseg_layout import build_models

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tuckerseg-bench-batch-"))
    home = workdir / "totalseg_home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.json").write_text(json.dumps({"totalseg_id": "bench", "send_usage_stats": False,
                                                  "prediction_counter": 0,
                                                  "statistics_disclaimer_shown": True}))
    env = dict(os.environ, TOTALSEG_HOME_DIR=str(home), PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    env.pop("TOTALSEG_WEIGHTS_PATH", None)
    if args.weights:
        env["TOTALSEG_WEIGHTS_PATH"] = str(args.weights)
    else:
        build_models(home / "nnunet" / "results", [297], width_scale=args.width_scale)
    cases = make_cases(args.ct, workdir / "cases", args.cases)
    bindir = Path(sys.executable).parent
    results = []

    def report(name: str, seconds: float) -> None:
        per_hour = len(cases) / seconds * 3600
        results.append({"method": name, "seconds": round(seconds, 1),
                        "seconds_per_case": round(seconds / len(cases), 2),
                        "cases_per_hour": round(per_hour, 1)})
        print(f"  {name}: {seconds:.1f} s, {per_hour:.0f} cases/hour", file=sys.stderr, flush=True)

    def agreement(name: str, value: float) -> None:
        next(r for r in results if r["method"] == name)["agreement_with_stock"] = value

    report.agreement = agreement

    print(f"{len(cases)} cases in {workdir}", file=sys.stderr)
    if not args.skip_stock:
        out = workdir / "stock"
        out.mkdir(exist_ok=True)
        report("stock TotalSegmentator loop",
               timed([[str(bindir / "TotalSegmentator"), "-i", str(c), "-o", str(out / c.name), "--fast",
                       "--ml", "-d", "cpu", "-q"] for c in cases], env))
    for ratio in args.ratios:
        for engine in args.engines:
            run_variant(args, cases, workdir, env, ratio, engine, report)

    stock = next((r["seconds"] for r in results if r["method"].startswith("stock")), None)
    print(f"\n{'method':42s} {'total s':>8s} {'s/case':>7s} {'cases/h':>8s} {'vs stock':>8s} {'Dice vs stock':>13s}")
    for r in results:
        r["speedup_vs_stock"] = round(stock / r["seconds"], 2) if stock else None
        sp = f"{r['speedup_vs_stock']:.2f}x" if stock else "-"
        agree = r.get("agreement_with_stock", 1.0 if r["method"].startswith("stock") else None)
        print(f"{r['method']:42s} {r['seconds']:8.1f} {r['seconds_per_case']:7.2f} "
              f"{r['cases_per_hour']:8.0f} {sp:>8s} {('-' if agree is None else f'{agree:.4f}'):>13s}")
    if args.json:
        import torch

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "python": platform.python_version(), "torch": torch.__version__},
            "command": "python benchmarks/bench_batch.py " + " ".join(sys.argv[1:]),
            "ct": str(args.ct.name), "cases": len(cases), "width_scale": args.width_scale,
            "weights": str(args.weights) if args.weights else "test models, random weights",
            "mode": "--fast --ml, cpu", "policy": args.policy, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
