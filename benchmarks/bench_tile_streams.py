"""OpenVINO on the CPU: the sliding window's tiles one at a time on every core, against several at
once on a share of the cores each (``OpenVINOModule.map_tiles``), side by side, in turns, with the
agreement of each with stock's PyTorch f32 beside its time.

Why: ``total`` spends most of its time in the five 1.5 mm networks, six tiles each on
``example_ct_sm``; a tile in flight per core keeps the cores busier than one tile on all cores.
The tiles are the quality target's validation patches (phantoms preprocessed by nnU-Net, as a
run's tiles are), repeated to ``--tiles``. Without ``--weights``, a full-width test model with
random weights in TotalSegmentator's layout is built in a temporary folder.

    python benchmarks/bench_tile_streams.py --dataset 291 --tiles 6 --rounds 3 \\
        --json benchmarks/results/bench_tile_streams_291.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_common import write_result


def _labels(outputs) -> torch.Tensor:
    return torch.cat([o.argmax(1).to(torch.uint8) for o in outputs])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, help="TotalSegmentator weights root (trained networks)")
    parser.add_argument("--dataset", type=int, default=291, help="dataset id (291-295: total's parts)")
    parser.add_argument("--precisions", nargs="+", default=["f32", "bf16"])
    parser.add_argument("--tiles", type=int, default=6, help="tiles per measurement (total's parts: 6 on "
                                                              "example_ct_sm)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from TuckerSegLib.engines.base import predict_tiles
    from TuckerSegLib.models.nnunet_folder import load_model_folder
    from TuckerSegLib.models.totalseg import model_folder
    from TuckerSegLib.models.totalseg_layout import build_model
    from TuckerSegLib.pipeline.quality_target import ValidationPatches, _module, pooled_mean_dice

    tmp = tempfile.TemporaryDirectory(prefix="tuckerseg-bench-streams-")
    if args.weights:
        folder = model_folder(args.dataset, root=args.weights)
    else:
        folder = build_model(Path(tmp.name) / "weights", args.dataset, width_scale=1.0)
    model = load_model_folder(folder)
    patches = ValidationPatches(model).patches
    tiles = [patches[i % len(patches)][None] for i in range(args.tiles)]
    k = int(model.num_classes)
    with torch.inference_mode():
        t0 = time.perf_counter()
        reference = _labels([model.network(t) for t in tiles])
        stock_seconds = (time.perf_counter() - t0) / len(tiles)
    rows = []
    for precision in args.precisions:
        module, engine = _module(model.network, model, torch.device("cpu"), precision, Path(tmp.name) / "cache",
                                 "openvino")
        ways = {"one at a time": lambda: [module(t) for t in tiles],
                f"{module.tile_streams} at a time": lambda: list(predict_tiles(module, iter(tiles), len(tiles)))}
        seconds = {name: [] for name in ways}
        labels = {}
        with torch.inference_mode():
            for name, way in ways.items():  # warm-up: compiles each form once
                labels[name] = _labels(way())
            for _ in range(args.rounds):
                for name, way in ways.items():
                    t0 = time.perf_counter()
                    way()
                    seconds[name].append(time.perf_counter() - t0)
        one, many = ways
        ratios = [a / b for a, b in zip(seconds[one], seconds[many])]
        row = {"precision": precision, "engine": engine, "tile_streams": module.tile_streams,
               "seconds_per_tile": {n: round(statistics.median(s) / len(tiles), 3) for n, s in seconds.items()},
               "rounds_seconds": {n: [round(x, 3) for x in s] for n, s in seconds.items()},
               "speedup_median": round(statistics.median(ratios), 3),
               "agreement_with_pytorch_f32": {n: round(pooled_mean_dice(reference, lab, k), 4)
                                              for n, lab in labels.items()},
               "voxels_same_between_the_two": round(float((labels[one] == labels[many]).float().mean()), 4)}
        rows.append(row)
        print(f"{precision}: one tile at a time {row['seconds_per_tile'][one]:.2f} s/tile, "
              f"{module.tile_streams} at a time {row['seconds_per_tile'][many]:.2f} s/tile: "
              f"{row['speedup_median']:.2f}x (median of {args.rounds} rounds in turns); agreement with "
              f"PyTorch f32 {row['agreement_with_pytorch_f32'][one]:.4f} / {row['agreement_with_pytorch_f32'][many]:.4f}; "
              f"same voxels {row['voxels_same_between_the_two']:.4f}", flush=True)
    print(f"PyTorch f32 (stock): {stock_seconds:.2f} s/tile, once")
    if args.json:
        write_result(args.json, __file__, {
            "network": f"dataset {args.dataset}, " + (f"trained weights {args.weights}" if args.weights
                                                      else "full-width test model, random weights"),
            "tiles": args.tiles, "patch_size": list(model.patch_size), "rounds": args.rounds,
            "pytorch_f32_seconds_per_tile": round(stock_seconds, 3), "rows": rows})
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
