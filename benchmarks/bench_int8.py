"""INT8 (OpenVINO + NNCF, accuracy control) against f32, dense and Tucker-compressed, side by side.

Why: INT8 is only worth offering where it is both faster and faithful. This prints, in one run,
per 3 mm patch: seconds, speed-up against PyTorch f32 and argmax agreement (mean Dice over the
classes f32 finds, and voxels) with PyTorch f32 on the held-out CT, for torch f32, OpenVINO f32,
OpenVINO INT8 dense and OpenVINO f32/INT8 of Tucker-compressed networks; then whole-process
``tuckerseg segment --fast`` times (a new process each, cache warm) for the same configurations,
with the agreement of each output with the PyTorch f32 output.

The data split is explicit (``data_split``) and checked: INT8 is calibrated and validated on
phantom CTs (plus ``--calibrate`` CTs, never the evaluation CT); agreement is measured on the
held-out CT, which the calibration never sees.

    TOTALSEG_WEIGHTS_PATH=/work/trained/ts297_w16 nice -n 10 python benchmarks/bench_int8.py \
        --eval-ct heldout.nii.gz --ratios 0.85 --json benchmarks/results/bench_int8.json

Without ``TOTALSEG_WEIGHTS_PATH``, ``--random-full-width`` builds TotalSegmentator's full-width
3 mm network with random weights (timings representative, agreements not).
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
from typing import List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CT = REPO.parent / "shared" / "data" / "example_ct.nii.gz"


def data_split(eval_ct: Path, calibration_cts: Sequence[Path] = ()) -> dict:
    """What each part of the benchmark sees. Raises ValueError if the evaluation CT would be
    calibration data."""
    ev = Path(eval_ct).resolve()
    cal = [Path(c).resolve() for c in calibration_cts]
    if ev in cal:
        raise ValueError(f"the evaluation CT {eval_ct} must not be INT8 calibration data")
    return {"evaluation_ct": str(eval_ct), "calibration_cts": [str(c) for c in calibration_cts],
            "calibration": "phantom CTs (engines.int8_data seeds)" + (" + the calibration CTs" if cal else ""),
            "agreement_measured_on": "sliding-window tiles of the evaluation CT, against PyTorch f32",
            "held_out_from_training": "the trained network's held-out part (train_totalseg_layout "
                                      "HELDOUT_SLICES) when run on it"}


def _dice(labels, reference) -> float:
    from TuckerSegLib.engines.int8 import dice_counts, mean_dice
    return mean_dice([dice_counts(labels, reference)])


def per_patch(folder: Path, eval_ct: Path, split: dict, ratios: Sequence[float], policy: str,
              min_agreement: float, reps: int, cache: Path, max_tiles: int, log=print) -> List[dict]:
    import numpy as np
    import torch

    from TuckerSegLib.compression.cache import get_compressed_model
    from TuckerSegLib.compression.ct_patches import Case, PatchSampler, preprocess
    from TuckerSegLib.engines import prepare_network
    from TuckerSegLib.engines.int8_data import _tiles, model_int8_data
    from TuckerSegLib.engines.int8 import dice_counts, mean_dice
    from TuckerSegLib.engines.timing import repeat_seconds
    from TuckerSegLib.models.nnunet_folder import load_model_folder
    from TuckerSegLib.specs import CompressionSpec, RunSpec

    model = load_model_folder(folder, 0)
    patch = tuple(model.patch_size)
    vol = preprocess(model, [eval_ct])[0].data
    sampler = PatchSampler([Case("eval", vol)], patch)
    tiles = _tiles(torch.from_numpy(vol), patch)
    tiles = tiles[:: max(1, len(tiles) // max_tiles)][:max_tiles]
    xs = [torch.from_numpy(sampler.crop(0, c)[0])[None] for c in tiles]
    log(f"evaluation: {len(xs)} tile(s) of {eval_ct.name} (preprocessed {vol.shape[1:]}), patch {patch}")
    data = model_int8_data(model.plans, model.configuration, model.dataset_json, 1, patch,
                           cts=split["calibration_cts"], exclude=[split["evaluation_ct"]])
    assert split["evaluation_ct"] not in data.sources  # the split, checked where the data is made

    networks = [("dense", 1.0, model.network, 1.0)]
    for r in ratios:
        t0 = time.perf_counter()
        cm = get_compressed_model(folder, CompressionSpec(r, policy), fold=0, cache_dir=cache)
        macs = (cm.manifest or {}).get("report", {}).get("macs_ratio", r)
        networks.append((f"{policy} {r:g}", r, cm.network.eval(), macs))
        log(f"compressed {policy} {r:g} (MACs {macs:.3f}) in {time.perf_counter() - t0:.0f} s")

    # prepare every configuration first (converts, quantises or reads the cache), then time them
    # in interleaved rounds, so that load from other processes hits them alike; best round counts
    prepared = []
    configs = [("torch", "f32"), ("openvino", "f32"), ("openvino", "int8")]
    for name, ratio, net, macs in networks:
        for engine, prec in configs:
            if engine == "torch" and name != "dense":
                continue
            t0 = time.perf_counter()
            run = RunSpec(engine, prec, "as-is", int8_min_agreement=min_agreement)
            module, info = prepare_network(net, patch, 1, "cpu", run, cache, check_agreement=False,
                                           int8_data=data if prec == "int8" else None)
            prep = time.perf_counter() - t0
            with torch.inference_mode():
                outs = [module(x).argmax(1).numpy().astype(np.int16) for x in xs]
            prepared.append({"name": name, "ratio": ratio, "macs": macs, "engine": engine, "prec": prec,
                             "module": module, "info": info, "prep": prep, "outs": outs, "times": []})
            log(f"prepared {name} {engine} {prec} in {prep:.1f} s (cache hit {info.cache_hit})")
    for _ in range(reps):
        for item in prepared:
            with torch.inference_mode():
                item["times"] += repeat_seconds(lambda: item["module"](xs[0]), None, 1, 0)
    reference, torch_s = prepared[0]["outs"], min(prepared[0]["times"])
    rows = []
    for item in prepared:
        info, times = item["info"], item["times"]
        counts = [dice_counts(o, r) for o, r in zip(item["outs"], reference)]
        voxels = float(np.mean([(o == r).mean() for o, r in zip(item["outs"], reference)]))
        row = {"network": item["name"], "ratio": item["ratio"], "macs_ratio": item["macs"],
               "engine": item["engine"], "precision": item["prec"],
               "seconds": min(times), "all_seconds": times, "speedup_vs_torch_f32": torch_s / min(times),
               "agreement_dice": mean_dice(counts), "agreement_voxels": voxels,
               "prepare_seconds": item["prep"], "cache_hit": info.cache_hit,
               "int8_validation_agreement": (info.int8 or {}).get("agreement"),
               "int8_f32_layers": len((info.int8 or {}).get("f32_layers", [])) if info.int8 else None,
               "int8_quantised_layers": (info.int8 or {}).get("quantised_layers")}
        rows.append(row)
        log(f"{row['network']:>12} {row['engine']:>8} {row['precision']:<4} {row['seconds']:7.3f} s/patch "
            f"x{row['speedup_vs_torch_f32']:5.2f}  agreement dice {row['agreement_dice']:.4f} voxels {voxels:.4f}  "
            f"prep {row['prepare_seconds']:6.1f} s"
            + (f"  (int8 validation {row['int8_validation_agreement']:.4f}, "
               f"{row['int8_f32_layers']} conv f32, {row['int8_quantised_layers']} int8)" if info.int8 else ""))
    return rows


def whole_process(eval_ct: Path, runs: Sequence[dict], workdir: Path, cache: Path, env: dict,
                  repeats: int, log=print) -> List[dict]:
    """``tuckerseg segment --fast`` per configuration, each a new process; first run fills the cache."""
    import nibabel as nib
    import numpy as np

    out, ref = [], None
    for cfg in runs:
        args = [sys.executable, "-m", "TuckerSegLib", "segment", "-i", str(eval_ct), "--fast", "--no-download",
                "-q", "--ratio", f"{cfg['ratio']:g}", "--policy", cfg.get("policy", "budget"),
                "--engine", cfg["engine"], "--precision", cfg["precision"], "--layer-forms", "as-is",
                "--cache-dir", str(cache), "--int8-min-agreement", str(cfg.get("min_agreement", 0.99))]
        seg = workdir / f"seg_{cfg['label'].replace(' ', '_').replace(':', '_')}.nii.gz"
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            p = subprocess.run(args + ["-o", str(seg)], env=env, capture_output=True, text=True)
            if p.returncode:
                raise RuntimeError(f"{cfg['label']}: {p.stderr.strip().splitlines()[-1:]}")
            if i:
                times.append(time.perf_counter() - t0)
        labels = np.asarray(nib.load(str(seg)).dataobj).astype(np.int16)
        if ref is None:
            ref = labels
        row = {**cfg, "seconds": min(times), "all_seconds": times, "agreement_dice_vs_first": _dice(labels, ref),
               "agreement_voxels_vs_first": float((labels == ref).mean())}
        out.append(row)
        log(f"segment --fast {cfg['label']:<28} {row['seconds']:6.1f} s  agreement dice "
            f"{row['agreement_dice_vs_first']:.4f} voxels {row['agreement_voxels_vs_first']:.4f}")
    base = out[0]["seconds"]
    for row in out:
        row["speedup_vs_first"] = base / row["seconds"]
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval-ct", type=Path, default=None,
                   help="the held-out CT (default: the trained network's held-out part, else example_ct)")
    p.add_argument("--calibrate", type=Path, nargs="*", default=[], help="extra INT8 calibration CTs")
    p.add_argument("--ratios", type=float, nargs="*", default=[0.85])
    p.add_argument("--policy", default="budget")
    p.add_argument("--min-agreement", type=float, default=0.99)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-tiles", type=int, default=4)
    p.add_argument("--random-full-width", action="store_true",
                   help="no trained network: TotalSegmentator's full-width 3 mm network, random weights")
    p.add_argument("--whole-process", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--repeats", type=int, default=1, help="timed segment runs per configuration (after one warm-up)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "bench_int8.json")
    args = p.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tuckerseg-int8-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    weights = os.environ.get("TOTALSEG_WEIGHTS_PATH")
    from TuckerSegLib.models import totalseg_layout

    if args.random_full_width or not weights:
        home = workdir / "totalseg_home"
        home.mkdir(exist_ok=True)
        (home / "config.json").write_text(json.dumps({"totalseg_id": "bench", "send_usage_stats": False,
                                                       "prediction_counter": 0, "statistics_disclaimer_shown": True}))
        root = home / "nnunet" / "results"
        totalseg_layout.build_models(root, [297], width_scale=1.0)
        env["TOTALSEG_HOME_DIR"] = str(home)
        env.pop("TOTALSEG_WEIGHTS_PATH", None)
        network_kind = "TotalSegmentator 3 mm network at full width, RANDOM weights (agreements not meaningful)"
    else:
        root = Path(weights)
        network_kind = f"trained TotalSegmentator-layout network from {root}"
    folder = totalseg_layout.model_dir(root, 297)
    eval_ct = args.eval_ct
    if eval_ct is None:
        try:
            from TuckerSegLib.models.train_totalseg_layout import write_heldout_ct
            eval_ct = write_heldout_ct(workdir / "heldout")[0]
        except ImportError:
            eval_ct = DEFAULT_CT
    split = data_split(eval_ct, args.calibrate)
    cache = workdir / "cache"
    print(f"{network_kind}\nsplit: {json.dumps(split)}", flush=True)
    t0 = time.perf_counter()
    rows = per_patch(folder, eval_ct, split, args.ratios, args.policy, args.min_agreement, args.reps, cache,
                     args.max_tiles, log=lambda m: print(m, flush=True))
    import openvino
    import torch
    from TuckerSegLib.engines.int8 import cpu_int8_flags, nncf_version

    def write(e2e_rows):
        result = {"network": network_kind, "split": split, "command": "python benchmarks/bench_int8.py " + " ".join(
            sys.argv[1:] if argv is None else argv), "machine": platform.platform(), "cpu": platform.processor(),
            "cpu_int8_flags": cpu_int8_flags(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "openvino": openvino.__version__, "nncf": nncf_version(), "min_agreement": args.min_agreement,
            "per_patch": rows, "whole_process": e2e_rows, "seconds": time.perf_counter() - t0}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}", flush=True)

    write([])  # per-patch results first: the whole-process runs take long
    e2e = []
    if args.whole_process:
        runs = [{"label": "ratio 1 torch f32", "ratio": 1.0, "engine": "torch", "precision": "f32"},
                {"label": "ratio 1 openvino f32", "ratio": 1.0, "engine": "openvino", "precision": "f32"},
                {"label": "ratio 1 openvino int8", "ratio": 1.0, "engine": "openvino", "precision": "int8",
                 "min_agreement": args.min_agreement}]
        for r in args.ratios:
            runs.append({"label": f"{args.policy} {r:g} openvino int8", "ratio": r, "policy": args.policy,
                         "engine": "openvino", "precision": "int8", "min_agreement": args.min_agreement})
        e2e = whole_process(eval_ct, runs, workdir, cache, env, args.repeats,
                            log=lambda m: print(m, flush=True))
    write(e2e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
