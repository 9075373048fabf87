"""nnU-Net's CPU tile accumulation, tile Gaussian and trainer lookup, and an OpenVINO output copy,
against TuckerSeg's (``pipeline/nnunet_speedups``, ``models/nnunet_folder``), side by side in one
run, with the outputs compared.

Why: these two steps cost seconds of a warm ``--fast`` case on a small CPU around a network of a
few seconds; the whole-process benchmark (``bench_whole_process.py``) shows the sum, this one each
part. The network is replaced by a fixed random output (118 classes, the 3 mm patch), so only the
accumulation is timed; ``identical`` compares the float16 bits of both results. "first call" is
what a run pays (one case per process: a fresh process per measurement, so fresh memory pages);
"best" the minimum of ``--repeats`` calls in one process.

    python benchmarks/bench_nnunet_speedups.py --json benchmarks/results/bench_nnunet_speedups.json
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
from bench_common import write_result


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _setup(classes: int, patch, shape):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from TuckerSegLib.pipeline.nnunet_speedups import cpu_sliding_window

    output = torch.randn((1, classes, *patch), generator=torch.Generator().manual_seed(0)) * 4

    class Fixed(torch.nn.Module):  # a network whose output costs one copy
        def forward(self, x):
            return output.clone()

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                verbose=False, allow_tqdm=False)
    predictor.network = Fixed()
    predictor.label_manager = types.SimpleNamespace(num_segmentation_heads=classes)
    predictor.configuration_manager = types.SimpleNamespace(patch_size=list(patch))
    data = torch.randn((1, *shape), generator=torch.Generator().manual_seed(1))
    slicers = predictor._internal_get_sliding_window_slicers(shape)
    original = nnUNetPredictor._internal_predict_sliding_window_return_logits
    return predictor, data, slicers, original, cpu_sliding_window(original)


def first_call(which: str, shape) -> float:
    """Seconds of one accumulation (network copies subtracted) in a fresh process."""
    code = (f"import sys, time; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_nnunet_speedups as b; "
            f"p, d, s, o, t = b._setup(118, (112, 112, 128), {tuple(shape)!r}); f = o if {which!r} == 'nnunet' else t; "
            "t0 = time.perf_counter(); [p.network(None) for _ in s]; n = time.perf_counter() - t0; "
            "t0 = time.perf_counter(); f(p, d, s, False); print(time.perf_counter() - t0 - n)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def accumulation(classes: int, patch, shape, repeats: int) -> dict:
    predictor, data, slicers, original, ours = _setup(classes, patch, shape)
    first = {w: round(first_call(w, shape), 3) for w in ("nnunet", "tuckerseg")}
    network = _best(lambda: [predictor.network(None) for _ in slicers], repeats)
    theirs_s = _best(lambda: original(predictor, data, slicers, False), repeats)
    ours_s = _best(lambda: ours(predictor, data, slicers, False), repeats)
    a, b = original(predictor, data, slicers, False), ours(predictor, data, slicers, False)
    return {"classes": classes, "patch": list(patch), "image": list(shape), "tiles": len(slicers),
            "nnunet_first_call_seconds": first["nnunet"], "tuckerseg_first_call_seconds": first["tuckerseg"],
            "network_copy_seconds": round(network, 3), "nnunet_seconds": round(theirs_s, 3),
            "tuckerseg_seconds": round(ours_s, 3),
            "nnunet_accumulation_seconds": round(theirs_s - network, 3),
            "tuckerseg_accumulation_seconds": round(ours_s - network, 3),
            "identical": bool(torch.equal(a.view(torch.int16), b.view(torch.int16)))}


def gaussian(patch, repeats: int) -> dict:
    """nnU-Net's tile Gaussian (a filtered delta volume) against TuckerSeg's outer product."""
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    from TuckerSegLib.pipeline.nnunet_speedups import gaussian_weights

    theirs = compute_gaussian.__wrapped__  # both without their in-process caches
    ours = gaussian_weights.__wrapped__
    cpu = torch.device("cpu")
    theirs_s = _best(lambda: theirs(tuple(patch), 1. / 8, 10, torch.float16, cpu), repeats)
    ours_s = _best(lambda: ours(tuple(patch)), repeats)
    a, b = theirs(tuple(patch), 1. / 8, 10, torch.float16, cpu), ours(tuple(patch))
    return {"patch": list(patch), "nnunet_seconds": round(theirs_s, 4), "tuckerseg_seconds": round(ours_s, 4),
            "identical": bool(torch.equal(a.view(torch.int16), b.view(torch.int16)))}


def output_copy(classes: int, patch, repeats: int) -> dict:
    """An OpenVINO module's forward with the copy of its output against the borrowed output the
    CPU sliding window reads (a 1x1x1 convolution to ``classes`` channels: little else to time)."""
    import tempfile

    from TuckerSegLib.engines import prepare_network
    from TuckerSegLib.specs import RunSpec

    net = torch.nn.Conv3d(1, classes, 1).eval()
    with tempfile.TemporaryDirectory() as cache:
        module, _ = prepare_network(net, patch, 1, "cpu", RunSpec("openvino", "f32", "as-is"), Path(cache))
        x = torch.randn(1, 1, *patch)
        with torch.inference_mode():
            copied = _best(lambda: module(x), repeats)
            with module.borrowed_outputs():
                borrowed = _best(lambda: module(x), repeats)
                same = bool(torch.equal(module(x), net(x)) or torch.allclose(module(x), net(x), atol=1e-5))
    return {"classes": classes, "patch": list(patch), "copied_seconds": round(copied, 4),
            "borrowed_seconds": round(borrowed, 4), "same_values": same}


def trainer_lookup(name: str) -> dict:
    import totalsegmentator.nnunet  # noqa: F401  (as in a run: TotalSegmentator imports the trainer base)
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from TuckerSegLib.models.nnunet_folder import _trainer_class_by_source

    t0 = time.perf_counter()
    ours = _trainer_class_by_source(name)
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = recursive_find_trainer_class_by_name(name)  # imports every trainer module once
    theirs_s = time.perf_counter() - t0
    return {"trainer": name, "nnunet_seconds": round(theirs_s, 4), "tuckerseg_seconds": round(ours_s, 4),
            "same_class": ours is theirs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    rows = [accumulation(118, (112, 112, 128), (112, 112, 128), args.repeats),  # --fast on example_ct: one tile
            accumulation(118, (112, 112, 128), (130, 112, 140), args.repeats)]  # four overlapping tiles
    gauss = [gaussian((112, 112, 128), args.repeats), gaussian((128, 128, 128), args.repeats)]
    copy = output_copy(118, (112, 112, 128), args.repeats)
    lookup = trainer_lookup("nnUNetTrainer_4000epochs_NoMirroring")  # first: nnU-Net's search imports all
    for r in rows:
        print(f"accumulation, {r['tiles']} tile(s) of {r['classes']} classes (network output copies subtracted): "
              f"first call nnU-Net {r['nnunet_first_call_seconds']:.2f} s, TuckerSeg {r['tuckerseg_first_call_seconds']:.2f} s; "
              f"best of {args.repeats} nnU-Net {r['nnunet_accumulation_seconds']:.2f} s, TuckerSeg "
              f"{r['tuckerseg_accumulation_seconds']:.2f} s; identical float16 bits: {r['identical']}")
    for g in gauss:
        print(f"tile Gaussian {g['patch']}: nnU-Net {g['nnunet_seconds']:.3f} s, TuckerSeg {g['tuckerseg_seconds']:.3f} s; "
              f"identical float16 bits: {g['identical']}")
    print(f"OpenVINO output of {copy['classes']} classes {copy['patch']}: forward with its copy "
          f"{copy['copied_seconds']:.3f} s, borrowed (the CPU sliding window) {copy['borrowed_seconds']:.3f} s; "
          f"same values: {copy['same_values']}")
    print(f"trainer lookup {lookup['trainer']}: nnU-Net {lookup['nnunet_seconds']:.3f} s, TuckerSeg "
          f"{lookup['tuckerseg_seconds']:.4f} s, same class: {lookup['same_class']}")
    if args.json:
        write_result(args.json, __file__, {"accumulation": rows, "gaussian": gauss, "output_copy": copy,
                                            "trainer_lookup": lookup})
    return 0


if __name__ == "__main__":
    sys.exit(main())
