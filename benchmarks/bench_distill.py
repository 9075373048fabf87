"""Distillation benchmark: the fast recipe against the classic one, side by side, on held-out data.

Why: issue 14 asks whether distillation recovers a trained TotalSegmentator-layout network at 30 %
and 50 % of the MACs within minutes on the machines users have. Both recipes start from the same
compressed student (``budget`` policy, ``--ratio`` = fraction of the MACs kept, data-aware
factors from the training part) and get the same wall-time cap; the benchmark prints agreement
before and after, wall time, steps and steps per second.

Data: ``example_ct`` split along its last NIfTI axis as ``TuckerSegLib.models.train_totalseg_layout``
splits it (slices 0..101 = its unlabelled and training parts, which distillation may use; slices
102..111 = its held-out part, only evaluated). Labels are never used. The fast recipe may add
phantom CTs (``--phantoms``) and augmentation (``--augment``).

Agreement = mean Dice of the student's argmax against the uncompressed network's, over the
foreground classes either finds, float32:
- ``training region``: on ``--val-patches`` patches of the training part not drawn for training
  (where the student was fitted),
- ``patch``: on ``--val-patches`` patches of the held-out part (what ``--until-agreement`` checks),
- ``volume``: the held-out part predicted alone by nnU-Net's predictor,
- ``in_context``: the whole CT predicted by nnU-Net's predictor, scored on the held-out slices only.

Example (2 CPU cores, reduced-width trained network, ~2 x 2 x 20 minutes)::

    nice -n 10 python benchmarks/bench_distill.py --model /work/trained/ts297_w16/Dataset297_*/* \\
        --ratios 0.3 0.5 --recipes classic fast --minutes 20 --out distill_out
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch

from TuckerSegLib.compression.calibration import collect_stats
from TuckerSegLib.compression.compress import CompressionData, compress_model
from TuckerSegLib.compression.ct_patches import PatchSampler, preprocess
from TuckerSegLib.finetune.agreement import label_agreement, mean_dice
from TuckerSegLib.finetune.distill import DistillConfig
from TuckerSegLib.finetune.teacher_cache import teacher_labels
from TuckerSegLib.finetune.workflow import finetune
from TuckerSegLib.models.compressed_file import load_compressed, save_compressed
from TuckerSegLib.models.nnunet_folder import load_model_folder
from TuckerSegLib.pipeline.nnunet_predict import load_predictor, predict_volume
from TuckerSegLib.progress import Progress
from TuckerSegLib.specs import CompressionSpec

REPO = Path(__file__).resolve().parents[1]
# The split of example_ct (last NIfTI axis), as train_totalseg_layout defines it.
try:  # the training module defines the split; import it where it exists
    from TuckerSegLib.models.train_totalseg_layout import HELDOUT_SLICES, TRAIN_SLICES, UNLABELLED_SLICES
except ImportError:  # pragma: no cover - same numbers, for checkouts without that module
    TRAIN_SLICES, HELDOUT_SLICES, UNLABELLED_SLICES = range(82, 102), range(102, 112), range(0, 82)


def split_example_ct(ct: Path, folder: Path) -> tuple:
    """``(train NIfTI, held-out NIfTI, held-out slice range)``: train = unlabelled + training slices."""
    import nibabel as nib

    img = nib.load(str(ct))
    data = np.asanyarray(img.dataobj)
    assert UNLABELLED_SLICES.stop == TRAIN_SLICES.start and TRAIN_SLICES.stop == HELDOUT_SLICES.start
    parts = {}
    for name, sl in (("train", range(UNLABELLED_SLICES.start, TRAIN_SLICES.stop)), ("heldout", HELDOUT_SLICES)):
        affine = img.affine.copy()
        affine[:3, 3] += img.affine[:3, 2] * sl.start
        path = folder / f"example_ct_{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data[:, :, sl.start:sl.stop]), affine, img.header), str(path))
        parts[name] = path
    return parts["train"], parts["heldout"], HELDOUT_SLICES


class _Log(Progress):
    """Progress lines on stdout, at most one per ``every`` seconds for updates."""

    def __init__(self, tag: str, every: float = 30.0):
        self.tag, self.every, self.last = tag, every, 0.0

    def stage(self, stage, message=""):
        print(f"[{self.tag}] {message or stage}", flush=True)

    def update(self, fraction, message="", stage=""):
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            print(f"[{self.tag}] {message}", flush=True)

    def log(self, message):
        print(f"[{self.tag}] {message}", flush=True)


def volume_agreements(predictor, network, refs: dict, heldout: Path, whole: Path, slices: range,
                      num_classes: int) -> dict:
    net = copy.deepcopy(network).float().eval()
    seg_h = predict_volume(predictor, heldout, network=net)
    seg_w = predict_volume(predictor, whole, network=net)
    ref_w = refs["whole"][:, :, slices.start:slices.stop]
    return {"volume": mean_dice(torch.from_numpy(seg_h.astype(np.int64)), torch.from_numpy(refs["heldout"].astype(np.int64)), num_classes),
            "in_context": mean_dice(torch.from_numpy(seg_w[:, :, slices.start:slices.stop].astype(np.int64)),
                                    torch.from_numpy(ref_w.astype(np.int64)), num_classes)}


def original_outputs(predictor, network, heldout: Path, whole: Path) -> dict:
    """The uncompressed network's label maps of the held-out part alone and of the whole CT."""
    return {"heldout": predict_volume(predictor, heldout, network=copy.deepcopy(network)),
            "whole": predict_volume(predictor, whole, network=copy.deepcopy(network))}


def calibration_patches(teacher, cases, patches: int = 4) -> torch.Tensor:
    """The seeded patches of ``cases`` that data-aware factors are calibrated on."""
    return PatchSampler(cases, teacher.patch_size, seed=20_000).sample(patches)[0]


def compress_calibrated(teacher, cases, ratio: float, source: str, patches: int = 4):
    """``(compression result, calibration patches)``: budget policy, data-aware factors from
    ``patches`` patches of ``cases`` (the starting student of every distillation run)."""
    x = calibration_patches(teacher, cases, patches)
    stats = collect_stats(teacher.network, x, sources=[source])
    return compress_model(teacher, CompressionSpec(ratio, "budget"), CompressionData(calibration=stats)), x


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="trained nnU-Net model folder (the teacher)")
    data = Path(os.environ.get("TUCKERSEG_TEST_DATA", REPO.parent / "shared" / "data"))
    parser.add_argument("--ct", type=Path, default=data / "example_ct.nii.gz")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5], help="MAC fractions (budget policy)")
    parser.add_argument("--recipes", nargs="+", default=["classic", "fast"], choices=["classic", "fast"])
    parser.add_argument("--minutes", type=float, default=20.0, help="wall-time cap per run (--max-minutes)")
    parser.add_argument("--steps", type=int, default=100_000, help="step limit per run (the cap usually ends it)")
    parser.add_argument("--until-agreement", type=float, default=None, help="early stop target (patch level)")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--val-patches", type=int, default=2)
    parser.add_argument("--phantoms", type=int, nargs="+", default=[0],
                        help="phantom CTs added to the transfer set (fast recipe); several values: one run each")
    parser.add_argument("--augment", action="store_true")
    parser.add_argument("--crop", type=int, nargs=3, default=None, help="fast recipe crop (default: the model's patch)")
    parser.add_argument("--pool", type=int, default=DistillConfig.pool)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--classic-batch-size", type=int, default=None,
                        help="batch of the classic recipe (default --batch-size; its whole-patch batch of 2 "
                             "needs about 15 GB of host memory at base width 16)")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--train-params", default="all", choices=["all", "factors"])
    parser.add_argument("--compile", default="off", choices=["auto", "on", "off"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("distill_out"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    train_ct, heldout_ct, slices = split_example_ct(args.ct, args.out)
    teacher = load_model_folder(args.model)
    n_classes = teacher.num_classes
    predictor = load_predictor(args.model, device=args.device)
    refs = original_outputs(predictor, teacher.network, heldout_ct, args.ct)
    print(f"teacher {args.model} ({n_classes} outputs, patch {teacher.patch_size}); train {train_ct.name}, "
          f"held out {heldout_ct.name} (slices {slices.start}..{slices.stop - 1})", flush=True)
    cases = preprocess(teacher, [train_ct])
    # Patches of the training part, not drawn for training: where distillation fits (against the
    # held-out slab, another body region, where it must generalise).
    fit_patches = PatchSampler(cases, teacher.patch_size).fixed_patches(args.val_patches, seed=30_000)
    fit_labels = teacher_labels(teacher.network, fit_patches, torch.device("cpu"))
    rows: List[dict] = []
    for ratio in args.ratios:
        t0 = time.perf_counter()
        result, _ = compress_calibrated(teacher, cases, ratio, train_ct.name)
        start = args.out / f"compressed_{ratio:g}"
        save_compressed(start, teacher, result)
        print(f"ratio {ratio:g}: {100 * result.report['macs_ratio']:.1f} % of MACs, "
              f"{100 * result.report['params_ratio']:.1f} % of params, compressed in {time.perf_counter() - t0:.0f} s",
              flush=True)
        zero = volume_agreements(predictor, result.network, refs, heldout_ct, args.ct, slices, n_classes)
        print(f"ratio {ratio:g}: zero-shot volume agreement {zero['volume']:.3f}, in context {zero['in_context']:.3f}",
              flush=True)
        fit_before = label_agreement(result.network, fit_patches, fit_labels)["mean_dice"]
        for recipe, phantoms in [(r, n) for r in args.recipes for n in (args.phantoms if r == "fast" else [0])]:
            batch = args.classic_batch_size if (recipe == "classic" and args.classic_batch_size) else args.batch_size
            config = DistillConfig(steps=args.steps, lr=args.lr, batch_size=batch, recipe=recipe,
                                   pool=args.pool, precision=args.precision, train_params=args.train_params,
                                   compile=args.compile, max_minutes=args.minutes,
                                   until_agreement=args.until_agreement, eval_every=args.eval_every,
                                   checkpoint_every=1_000_000)
            out = args.out / f"distilled_{ratio:g}_{recipe}_p{phantoms}"
            tag = f"{ratio:g} {recipe}" + (f" +{phantoms} phantoms" if phantoms else "")
            cpu0, t1 = time.process_time(), time.perf_counter()
            summary = finetune(start, [train_ct], out, config=config, device=args.device,
                               val_images=[heldout_ct], val_patches=args.val_patches,
                               work_dir=args.out / f".work_{ratio:g}_{recipe}_p{phantoms}",
                               phantoms=phantoms,
                               augment=args.augment and recipe == "fast",
                               crop=args.crop if recipe == "fast" else None, progress=_Log(tag))
            wall, cpu = time.perf_counter() - t1, time.process_time() - cpu0
            student = load_compressed(out).network
            after = volume_agreements(predictor, student, refs, heldout_ct, args.ct, slices, n_classes)
            fit_after = label_agreement(student.float().eval(), fit_patches, fit_labels)["mean_dice"]
            val = summary["validation"]
            row = {"ratio": ratio, "macs_ratio": result.report["macs_ratio"], "recipe": recipe,
                   "steps": summary["steps"], "stopped": summary["stopped"], "wall_s": round(wall, 1),
                   "train_s": summary["train_seconds"], "cpu_s": round(cpu, 1),
                   "steps_per_s": summary["steps_per_second"], "precision": summary["precision"],
                   "batch": batch, "cpu_s_per_step": (load_compressed(out).manifest["report"]["finetune"]
                                                       .get("cpu_seconds_per_step")),
                   "transfer_set": summary["transfer_set"],
                   "patch_before": val["before"]["mean_dice"], "patch_after": val["after"]["mean_dice"],
                   "volume_before": zero["volume"], "volume_after": after["volume"],
                   "in_context_before": zero["in_context"], "in_context_after": after["in_context"],
                   "train_region_before": fit_before, "train_region_after": fit_after, "phantoms": phantoms,
                   "loss_first": summary["loss_curve"][0], "loss_last": summary["loss_curve"][-1],
                   "agreement_curve": summary["agreement_curve"]}
            rows.append(row)
            print(f"[{tag}] {row['steps']} steps in {wall:.0f} s wall ({row['steps_per_s']} steps/s, "
                  f"stopped: {row['stopped']}); agreement patch {row['patch_before']:.3f} -> {row['patch_after']:.3f}, "
                  f"volume {row['volume_before']:.3f} -> {row['volume_after']:.3f}, in context "
                  f"{row['in_context_before']:.3f} -> {row['in_context_after']:.3f}", flush=True)
            (args.out / "results.json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    lines = [f"Command: `python benchmarks/bench_distill.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
             f"total {time.perf_counter() - t_all:.0f} s", "",
             "| MACs kept | recipe | phantoms | batch | steps | stopped | wall s | steps/s | CPU s/step | "
             "training region before -> after | patch before -> after | volume before -> after | "
             "in context before -> after |",
             "| ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {100 * r['macs_ratio']:.1f} % | {r['recipe']} ({r['precision']}) | {r['phantoms']} | {r['batch']} | "
                     f"{r['steps']} | {r['stopped']} | {r['wall_s']:.0f} | {r['steps_per_s']} | {r['cpu_s_per_step']} | "
                     f"{r['train_region_before']:.3f} -> {r['train_region_after']:.3f} | "
                     f"{r['patch_before']:.3f} -> {r['patch_after']:.3f} | "
                     f"{r['volume_before']:.3f} -> {r['volume_after']:.3f} | "
                     f"{r['in_context_before']:.3f} -> {r['in_context_after']:.3f} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
