"""Experiment: refit each factorised layer on the compressed network's own inputs (not yet in the library).

Why: data-aware factors (``compression.calibration``) are fitted layer by layer on the original
network's activations, so every layer's error reaches the next one uncorrected. Here, after
compression, the original and the compressed network run on the same calibration patches. For
each factorised layer, the original's input ``x_t`` is regressed on the compressed network's input
``x_s`` (channels only, centred per instance where an InstanceNorm follows):
``A = I + (C_ts - C_ss)(C_ss + rho I)^-1``, which shrinks to the identity (no correction) as the
ridge ``rho`` (``--ridge`` times the mean eigenvalue of ``C_ss``) grows. The layer's kernel becomes
``W A`` and is factorised again at the same ranks, whitened by ``C_ss``; the MACs do not change.
Layers with fewer than ``--min-samples`` voxels per input channel keep their factors.

Prints mean Dice agreement with the original (nnU-Net's predictor) on the held-out slab of
``example_ct`` predicted alone and inside the whole CT, before and after each round.

``--start data-aware`` (default) compensates the data-aware factors of the calibration patches;
``--start default`` the compression a quality target measures (``budget`` policy, HOSVD factors,
phantom probe, no refinement rounds). Results on the trained full-width 297 network
(``benchmarks/results/experiment_error_compensation_w32_*.json``): from data-aware factors at 50 %
of the MACs one round helps (slab alone 0.574 -> 0.597, in the whole CT 0.564 -> 0.641) and a
second loses it; from the default compression at 80 % it hurts (0.762 -> 0.664 and 0.870 -> 0.717),
so it is not part of the library.

    python benchmarks/experiment_error_compensation.py --model /work/trained/ts297_w32/Dataset297_*/*__3d_fullres \\
        --ratio 0.5 --rounds 1 --ridge 0.1
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, Sequence

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_distill import (calibration_patches, compress_calibrated, original_outputs,  # noqa: E402
                           split_example_ct, volume_agreements)

from TuckerSegLib.compression.calibration import (CalibrationStats, LayerStats,  # noqa: E402
                                                  _followed_by_instance_norm)
from TuckerSegLib.compression.cache import get_compressed_model  # noqa: E402
from TuckerSegLib.compression.ct_patches import preprocess  # noqa: E402
from TuckerSegLib.models.compressed_file import CompressionResult  # noqa: E402
from TuckerSegLib.specs import CompressionSpec  # noqa: E402
from TuckerSegLib.models.nnunet_folder import load_model_folder  # noqa: E402
from TuckerSegLib.network.surgery import factorised_layers, find_sites  # noqa: E402
from TuckerSegLib.network.tucker_conv import TuckerConv, conv_layout_weight  # noqa: E402
from TuckerSegLib.pipeline.nnunet_predict import load_predictor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _flat(t: torch.Tensor, centred: bool) -> torch.Tensor:
    x = t.detach().flatten(2).float()
    return x - x.mean(2, keepdim=True) if centred else x


def _gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ncv,ndv->cd", a, b).double() / a.shape[2]


@torch.no_grad()
def compensate(teacher: nn.Module, student: nn.Module, patches: torch.Tensor, ridge: float,
               min_samples: int) -> Dict[str, int]:
    """One round: refit every factorised layer of ``student`` (in place); returns counts."""
    sites = {s.name: s for s in find_sites(teacher)}
    layers = factorised_layers(student)
    centred = {n: _followed_by_instance_norm(teacher, sites[n]) for n in layers}
    acc = {n: {"ss": 0, "ts": 0, "oo": 0, "inst": 0, "vox": 0} for n in layers}
    for p in patches:
        saved = {}

        def t_hook(m, i, o, n):
            saved[n] = _flat(i[0], centred[n])
            y = _flat(o, centred[n])
            acc[n]["oo"] = acc[n]["oo"] + _gram(y, y)

        def s_hook(m, i, o, n):
            xs, xt = _flat(i[0], centred[n]), saved.pop(n)
            a = acc[n]
            a["ss"] = a["ss"] + _gram(xs, xs)
            a["ts"] = a["ts"] + _gram(xt, xs)
            a["inst"] += xs.shape[0]
            a["vox"] += xs.shape[0] * xs.shape[2]

        hooks = [sites[n].module.register_forward_hook(lambda m, i, o, n=n: t_hook(m, i, o, n)) for n in layers]
        teacher(p[None])
        for h in hooks:
            h.remove()
        hooks = [m.register_forward_hook(lambda m, i, o, n=n: s_hook(m, i, o, n)) for n, m in layers.items()]
        student(p[None])
        for h in hooks:
            h.remove()
    refitted = 0
    for n, module in layers.items():
        a = acc[n]
        c_ss, c_ts, c_oo = (a[k].numpy() / a["inst"] for k in ("ss", "ts", "oo"))
        if a["vox"] < min_samples * c_ss.shape[0]:
            continue
        eye = np.eye(len(c_ss))
        rho = ridge * max(float(np.mean(np.clip(np.linalg.eigvalsh(c_ss), 0, None))), 1e-12)
        mix = eye + (c_ts - c_ss) @ np.linalg.inv(c_ss + rho * eye)
        conv = copy.deepcopy(sites[n].module)
        w = np.einsum("oi...,ij->oj...", conv_layout_weight(conv).detach().double().numpy(), mix)
        w = torch.from_numpy(w).to(conv.weight.dtype)
        conv.weight.data.copy_(w.transpose(0, 1) if isinstance(conv, nn.modules.conv._ConvTransposeNd) else w)
        factors = CalibrationStats({n: LayerStats(c_ss, c_oo, centred[n], a["inst"])}).factorise(n, conv, module.ranks)
        module.load_state_dict(TuckerConv.from_factors(conv, factors).state_dict())
        refitted += 1
    return {"layers": len(layers), "refitted": refitted}


def main(argv: Sequence[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="trained nnU-Net model folder")
    data = Path(os.environ.get("TUCKERSEG_TEST_DATA", REPO.parent / "shared" / "data"))
    p.add_argument("--ct", type=Path, default=data / "example_ct.nii.gz")
    p.add_argument("--ratio", type=float, default=0.5, help="MAC fraction (budget policy)")
    p.add_argument("--start", choices=["data-aware", "default"], default="data-aware",
                   help="the factors compensated: data-aware (calibration patches) or the quality target's default")
    p.add_argument("--patches", type=int, default=4, help="calibration patches of the training part")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--ridge", type=float, default=0.1)
    p.add_argument("--min-samples", type=int, default=20, help="voxels per input channel needed to refit")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("error_compensation_out"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    train_ct, heldout_ct, slices = split_example_ct(args.ct, args.out)
    teacher = load_model_folder(args.model)
    predictor = load_predictor(args.model, device="cpu")
    refs = original_outputs(predictor, teacher.network, heldout_ct, args.ct)
    cases = preprocess(teacher, [train_ct])
    if args.start == "default":
        patches = calibration_patches(teacher, cases, args.patches)
        compressed = get_compressed_model(args.model, CompressionSpec(args.ratio, refine=False),
                                          cache_dir=args.out / "cache")
        result = CompressionResult(compressed.network, {}, compressed.manifest["report"])
    else:
        result, patches = compress_calibrated(teacher, cases, args.ratio, train_ct.name, args.patches)
    student = result.network.eval()
    n = teacher.num_classes
    rows = [{"round": 0, **volume_agreements(predictor, student, refs, heldout_ct, args.ct, slices, n)}]
    print(f"{100 * result.report['macs_ratio']:.1f} % of MACs; {args.start} factors: held-out slab alone "
          f"{rows[0]['volume']:.3f}, in the whole CT {rows[0]['in_context']:.3f}", flush=True)
    for r in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        counts = compensate(teacher.network.eval(), student, patches, args.ridge, args.min_samples)
        row = {"round": r, "seconds": round(time.perf_counter() - t0, 1), **counts,
               **volume_agreements(predictor, student, refs, heldout_ct, args.ct, slices, n)}
        rows.append(row)
        print(f"round {r}: refitted {counts['refitted']} of {counts['layers']} layers in {row['seconds']} s; "
              f"held-out slab alone {row['volume']:.3f}, in the whole CT {row['in_context']:.3f}", flush=True)
    (args.out / "results.json").write_text(json.dumps(
        {"command": " ".join(sys.argv), "start": args.start, "macs_ratio": result.report["macs_ratio"], "ridge": args.ridge,
         "patches": args.patches, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
