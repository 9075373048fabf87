"""Two steps every quality-target point pays, each against the library's own way in one run:
the class argmax of a patch's logits (``network.labels.argmax_labels`` against ``torch.argmax``)
and the network's conversion to OpenVINO (``engines.openvino_engine.convert_static``, traced
without torch's ``check_trace``, against ``openvino.convert_model`` as documented), with the
outputs compared.

Why: on a 2-core CPU a search for a target on the full-width 3 mm network spent 22 s in argmax and
10 s in trace checks (cProfile of ``choose_for_target``, 276 s in all, validate-on a CT).

    python benchmarks/bench_search_steps.py --json benchmarks/results/bench_search_steps.json

The network is TotalSegmentator's dataset-297 architecture at full width (``--weights`` a trained
model folder, else random weights: conversion and argmax cost the same).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from bench_common import write_result


def _best(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def argmax_row(classes: int, patch, repeats: int) -> dict:
    from TuckerSegLib.network.labels import argmax_labels

    logits = torch.randn((1, classes, *patch), generator=torch.Generator().manual_seed(0))
    theirs_s, theirs = _best(lambda: logits.argmax(1), repeats)
    ours_s, ours = _best(lambda: argmax_labels(logits), repeats)
    return {"classes": classes, "patch": list(patch), "torch_argmax_seconds": round(theirs_s, 3),
            "tuckerseg_seconds": round(ours_s, 3), "identical": bool(torch.equal(theirs, ours))}


def conversion_row(network: torch.nn.Module, patch, repeats: int) -> dict:
    import openvino as ov

    from TuckerSegLib.engines.openvino_engine import convert_static

    shape = (1, 1, *patch)
    small = torch.zeros(1, 1, *[int(np.gcd(s, 64)) for s in patch])  # what convert_static traces at

    def theirs():
        with torch.no_grad():
            m = ov.convert_model(network, example_input=small)
        m.reshape({0: ov.PartialShape(list(shape))})
        return m

    theirs_s, a = _best(theirs, repeats)
    ours_s, b = _best(lambda: convert_static(network, shape), repeats)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    core = ov.Core()
    ya, yb = (np.asarray(core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]) for m in (a, b))
    return {"patch": list(patch), "openvino_convert_model_seconds": round(theirs_s, 3),
            "tuckerseg_seconds": round(ours_s, 3),
            "same_ops": [o.get_type_name() for o in a.get_ordered_ops()] == [o.get_type_name() for o in b.get_ordered_ops()],
            "identical_output": bool(np.array_equal(ya, yb))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, default=None, help="a trained dataset-297 model folder (optional)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    from TuckerSegLib.models.totalseg_archs import build_totalseg_network, patch_size

    if args.weights:
        from TuckerSegLib.models.nnunet_folder import load_model_folder
        network = load_model_folder(args.weights, 0).network.eval()
    else:
        network = build_totalseg_network(297).eval()
    patch = patch_size(297)
    arg = argmax_row(118, patch, args.repeats)
    conv = conversion_row(network, patch, args.repeats)
    print(f"class argmax of one {tuple(patch)} patch, {arg['classes']} classes: torch {arg['torch_argmax_seconds']:.3f} s, "
          f"TuckerSeg {arg['tuckerseg_seconds']:.3f} s, identical labels: {arg['identical']}")
    print(f"OpenVINO conversion of the full-width 297 network: convert_model {conv['openvino_convert_model_seconds']:.2f} s, "
          f"TuckerSeg {conv['tuckerseg_seconds']:.2f} s, same ops: {conv['same_ops']}, "
          f"identical f32 output: {conv['identical_output']}")
    if args.json:
        write_result(args.json, __file__, {
            "weights": str(args.weights) if args.weights else "random (dataset 297 architecture, full width)",
            "argmax": arg, "conversion": conv})
    return 0


if __name__ == "__main__":
    sys.exit(main())
