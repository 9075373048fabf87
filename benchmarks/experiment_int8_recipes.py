"""Which NNCF recipe keeps INT8 closest to f32 on a trained TotalSegmentator-layout network?

Why: plain INT8 of the trained full-width 3 mm network agreed only about 0.6 (mean Dice of the
argmax) with f32 on CT tiles it never saw, and NNCF's accuracy control, reverting 12 of 39 layer
groups, reached 0.86 after half an hour. Before spending more reverts, this compares recipes
one variable at a time, each quantised once with ``nncf.quantize`` (no accuracy control) on the
same calibration patches and scored on the same evaluation tiles against PyTorch f32, with the
seconds per patch beside each score (OpenVINO f32 and bf16 are printed as references).

    TOTALSEG_WEIGHTS_PATH=/work/trained/ts297_w32 python benchmarks/experiment_int8_recipes.py \
        --eval-ct parts/example_ct_unlabelled_z0-81.nii.gz --recipes base minmax quantile \
        --json benchmarks/results/experiment_int8_recipes_w32.json

``smooth-A`` recipes first move activation range into the weights (SmoothQuant with alpha A, folded
into the network: ``engines.int8.smoothed_model``) and quantise that network with the base recipe; the
library's INT8 uses ``smooth-0.5`` since it helped on both parts of the CT
(``experiment_int8_recipes_w32cpu_smoothing_*.json``).

The evaluation CT is never calibration data (checked).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def recipes() -> Dict[str, Callable[[], dict]]:
    """name -> keyword arguments for ``nncf.quantize`` on top of the base recipe (TuckerSeg's)."""
    import nncf
    from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters, OverflowFix,
                                                       QuantizationMode, QuantizationParameters)
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet as R

    def adv(**kw):
        return {"advanced_parameters": AdvancedQuantizationParameters(**kw)}

    return {
        "base": lambda: {},
        "fast-bias": lambda: {"fast_bias_correction": True},
        "no-bias": lambda: adv(disable_bias_correction=True),
        "minmax": lambda: adv(activations_range_estimator_params=R.MINMAX),
        "mean-minmax": lambda: adv(activations_range_estimator_params=R.MEAN_MINMAX),
        "histogram": lambda: adv(activations_range_estimator_params=R.HISTOGRAM),
        "mean-quantile": lambda: adv(activations_range_estimator_params=R.MEAN_QUANTILE),
        "no-outliers": lambda: adv(activations_range_estimator_params=R.MEAN_NO_OUTLIERS_MINMAX),
        "no-overflow-fix": lambda: adv(overflow_fix=OverflowFix.DISABLE),
        "performance": lambda: {"preset": nncf.QuantizationPreset.PERFORMANCE},
        "asym-weights": lambda: adv(overflow_fix=OverflowFix.DISABLE,
                                    weights_quantization_params=QuantizationParameters(mode=QuantizationMode.ASYMMETRIC)),
        "no-deconv": lambda: {"ignored_scope_types": ["ConvolutionBackpropData"]},
        # nnU-Net's decoder holds the encoder: its layers are named decoder.encoder.stages...
        "encoder-only": lambda: {"ignored_scope_patterns": [r".*decoder\.(stages|transpconvs|seg_layers).*"]},
        "decoder-only": lambda: {"ignored_scope_patterns": [r".*encoder\.stages.*"]},
    }


def smoothed(network, alpha: float, cal, x, shape, reference):
    """The library's smoothed f32 model (``engines.int8.smoothed_model``) and its report, with the
    largest change of its OpenVINO f32 logits against PyTorch f32's ``reference`` on ``x``."""
    import numpy as np
    import torch

    from TuckerSegLib.engines.int8 import smoothed_model
    from TuckerSegLib.engines.openvino_engine import core

    model, report = smoothed_model(network, shape, [torch.from_numpy(c[0]) for c in cal], alpha)
    f32 = core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": "1"})
    report["openvino_f32_max_logit_change_vs_pytorch"] = float(np.abs(np.asarray(f32(x)[0]) - reference).max())
    return model, {"smoothing": report}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval-ct", type=Path, required=True, help="CT scored against f32 (never calibration data)")
    p.add_argument("--calibrate", type=Path, nargs="*", default=[], help="CTs added to the phantom calibration")
    p.add_argument("--recipes", nargs="+", default=["base"])
    p.add_argument("--calibration-patches", type=int, default=8)
    p.add_argument("--max-tiles", type=int, default=4)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/int8-recipes"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import nncf
    import numpy as np
    import torch
    import openvino as ov

    from TuckerSegLib.compression.ct_patches import Case, PatchSampler, preprocess
    from TuckerSegLib.engines.int8 import dice_counts, mean_dice, sensitive_layers
    from TuckerSegLib.engines.int8_data import _tiles, model_int8_data
    from TuckerSegLib.engines.openvino_engine import convert_to_ir, core
    from TuckerSegLib.engines.timing import repeat_seconds
    from TuckerSegLib.models.totalseg import model_folder
    from TuckerSegLib.models.nnunet_folder import load_model_folder

    for c in args.calibrate:
        if Path(c).resolve() == args.eval_ct.resolve():
            raise SystemExit("the evaluation CT must not be calibration data")
    folder = model_folder(297)
    model = load_model_folder(folder, 0)
    patch = tuple(model.patch_size)
    shape = (1, 1, *patch)
    args.workdir.mkdir(parents=True, exist_ok=True)
    ir = args.workdir / "f32" / "model.xml"
    if not ir.is_file():
        convert_to_ir(model.network.eval(), shape, ir.parent)

    vol = preprocess(model, [args.eval_ct])[0].data
    sampler = PatchSampler([Case("eval", vol)], patch)
    tiles = _tiles(torch.from_numpy(vol), patch)
    tiles = tiles[:: max(1, len(tiles) // args.max_tiles)][:args.max_tiles]
    xs = [np.ascontiguousarray(sampler.crop(0, c)[0][None], dtype=np.float32) for c in tiles]
    with torch.inference_mode():
        logits = [model.network.eval()(torch.from_numpy(x)) for x in xs]
    ref = [lg.argmax(1).numpy().astype(np.int16) for lg in logits]
    top2 = [lg.topk(2, dim=1).values for lg in logits]
    margins = [(t[:, 0] - t[:, 1]).numpy() for t in top2]  # f32's lead of its class over the next
    first_logits = logits[0].numpy()
    del logits, top2
    data = model_int8_data(model.plans, model.configuration, model.dataset_json, 1, patch,
                           cts=[str(c) for c in args.calibrate], exclude=[str(args.eval_ct)],
                           n_calibration=args.calibration_patches)
    cal = [p.numpy()[None].astype(np.float32) for p in data.calibration()]
    print(f"{len(xs)} evaluation tiles of {args.eval_ct.name}; {len(cal)} calibration patches "
          f"({data.description['calibration']})", flush=True)

    def score(compiled) -> dict:
        outs = [np.asarray(compiled(x)[0]).argmax(1).astype(np.int16) for x in xs]
        counts = [dice_counts(o, r) for o, r in zip(outs, ref)]
        secs = min(repeat_seconds(lambda: compiled(xs[0]), None, 2, 0))
        flipped = np.concatenate([m[o != r] for o, r, m in zip(outs, ref, margins)])
        return {"dice": mean_dice(counts), "voxels": float(np.mean([(o == r).mean() for o, r in zip(outs, ref)])),
                "seconds": secs, "flipped_voxels": int(flipped.size),
                "median_f32_margin_of_flipped": float(np.median(flipped)) if flipped.size else None}

    every = np.concatenate([m.ravel() for m in margins])
    print(f"f32 top-2 logit margin: median {np.median(every):.3f}, 1st percentile {np.percentile(every, 1):.4f}",
          flush=True)
    rows = []
    out = {"command": " ".join(sys.argv), "eval_ct": str(args.eval_ct),
           "calibration": data.description["calibration"], "weights": os.environ.get("TOTALSEG_WEIGHTS_PATH"),
           "nncf": nncf.__version__, "openvino": ov.__version__, "tiles": len(xs),
           "f32_margin_median": float(np.median(every)), "f32_margin_p1": float(np.percentile(every, 1)),
           "rows": rows}

    def line(r: dict) -> str:
        flip = r.get("median_f32_margin_of_flipped")
        return (f"{r['recipe']:<28} dice {r['dice']:.4f} voxels {r['voxels']:.4f} {r['seconds']:.2f} s/patch"
                + (f", flipped voxels' median f32 margin {flip:.3f}" if flip is not None else ""))

    f32 = core().read_model(str(ir))
    for prec in ("f32", "bf16"):
        r = score(core().compile_model(f32, "CPU", {"INFERENCE_PRECISION_HINT": prec, "NUM_STREAMS": "1"}))
        rows.append({"recipe": f"OpenVINO {prec} (reference)", **r})
        print(line(rows[-1]), flush=True)
    table = recipes()
    for name in args.recipes:
        extra = {}
        if name.startswith("smooth-"):  # SmoothQuant folded into the network (network.channel_scaling)
            source, extra = smoothed(model.network, float(name.split("-", 1)[1]), cal, xs[0], shape, first_logits)
            print(f"{name}: {extra}", flush=True)
            kw = {}
        else:
            source, kw = core().read_model(str(ir)), table[name]()
        ignored = sensitive_layers(source)
        names, types, patterns = list(ignored), kw.pop("ignored_scope_types", []), kw.pop("ignored_scope_patterns", [])
        base = {"preset": nncf.QuantizationPreset.MIXED, "target_device": nncf.TargetDevice.CPU,
                "subset_size": len(cal), "fast_bias_correction": False,
                "ignored_scope": nncf.IgnoredScope(names=names, types=types, patterns=patterns, validate=False)}
        base.update({k: v for k, v in kw.items() if v is not None})
        t0 = time.perf_counter()
        try:
            q = nncf.quantize(source, nncf.Dataset(cal), **base)
        except Exception as exc:  # a recipe NNCF refuses is a result too
            rows.append({"recipe": name, "error": f"{type(exc).__name__}: {exc}"})
            print(f"{name:<28} refused by NNCF: {exc}", flush=True)
            continue
        qsec = time.perf_counter() - t0
        r = score(core().compile_model(q, "CPU", {"NUM_STREAMS": "1"}))
        rows.append({"recipe": name, **r, "quantise_seconds": qsec, **extra})
        print(line(rows[-1]) + f" (quantised in {qsec:.0f} s)", flush=True)
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
