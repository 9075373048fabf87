"""One distillation step of the fast recipe, timed in turns: precision and loss forms side by side.

Why: on 2 CPU cores a whole-patch step of a 3 mm student takes tens of seconds, so what a step
costs decides how much a run can learn in the time users give it. This times the step the fast
recipe takes (the student's forward on a cached patch, the top-k KL against the stored teacher
answers plus nnU-Net's Dice + CE against the teacher's argmax, backward, gradient clipping, Adam)
in four forms, one after another in each round (this machine's speed drifts):

- f32, both losses written plainly and differentiated by autograd (nnU-Net's own Dice + CE
  module): the recipe before the closed forms,
- bf16 autocast with the closed-form KL (``losses.kd_loss_topk``) and nnU-Net's module: the
  recipe of the stop that added the closed-form KL,
- bf16 with both closed forms apart (``losses.dice_ce_loss``),
- bf16 with both in one chunked pass (``losses.fast_recipe_loss``) and the student and its
  input channels-last (``torch.channels_last_3d``): the recipe now on CPUs.

It prints per-round ratios against the first form, their medians, where each step's time went
(forward, loss, backward, clipping and Adam), and the gradient norms (finite or not: bf16
overflowed on one CPU kind).

    python benchmarks/bench_distill_step.py --model MODEL_FOLDER --ratio 0.5 \
        --ct ../shared/data/example_ct.nii.gz --rounds 3 --out benchmarks/results/bench_distill_step.json
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import write_result  # noqa: E402

from TuckerSegLib.compression.compress import compress_model  # noqa: E402
from TuckerSegLib.compression.ct_patches import PatchSampler, preprocess  # noqa: E402
from TuckerSegLib.devices import cpu_flags  # noqa: E402
from TuckerSegLib.finetune.losses import (dice_ce_loss, fast_recipe_loss, kd_loss_topk,  # noqa: E402
                                          kd_loss_topk_plain, nnunet_dice_ce)
from TuckerSegLib.finetune.teacher_cache import autocast, default_topk, topk_targets  # noqa: E402
from TuckerSegLib.models.nnunet_folder import load_model_folder  # noqa: E402
from TuckerSegLib.specs import CompressionSpec  # noqa: E402

_NNUNET = nnunet_dice_ce()


def _apart(kl_fn, dice_ce_fn):
    """The two losses apart, on one float32 copy of the output (as the recipe computed them)."""
    def loss(out, lp, idx):
        out = out.float()
        return kl_fn(out, lp, idx) + dice_ce_fn(out, idx[:, :1].long())
    return loss


# name: (precision, loss of (student output, top-k log-probabilities, top-k classes), channels-last)
FORMS = {"f32, plain losses": ("f32", _apart(kd_loss_topk_plain, _NNUNET), False),
         "bf16, closed-form KL": ("bf16", _apart(kd_loss_topk, _NNUNET), False),
         "bf16, both closed-form": ("bf16", _apart(kd_loss_topk, dice_ce_loss), False),
         "bf16, fused, channels-last": ("bf16", fast_recipe_loss, True)}
# where a step's time goes: backward includes the loss's own backward and the network's
PHASES = ("forward", "loss", "backward", "clip+adam")


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="nnU-Net model folder (the teacher)")
    parser.add_argument("--ratio", type=float, default=0.5, help="MAC fraction of the student (budget policy)")
    parser.add_argument("--ct", type=Path, default=None, help="CT the patch comes from (default: random input)")
    parser.add_argument("--crop", type=int, nargs=3, default=None, help="default: the model's patch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="JSON result")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = load_model_folder(args.model)
    crop = tuple(args.crop or teacher.patch_size)
    if args.ct is not None:
        x = PatchSampler(preprocess(teacher, [args.ct]), crop, seed=0).fixed_patches(1)
    else:
        x = torch.randn(1, 1, *crop, generator=torch.Generator().manual_seed(0))
    net = teacher.network.eval()
    with torch.no_grad():
        logits = net(x)
    t_logp, t_idx = topk_targets(logits, default_topk(logits.shape[1]))
    del logits
    student0 = compress_model(teacher, CompressionSpec(args.ratio, "budget")).network
    device = torch.device("cpu")

    def step(student, opt, precision, loss_fn, channels_last):
        """One step; returns its seconds, the time of each phase and the gradient norm."""
        t = [time.perf_counter()]
        xx = x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x
        with autocast(device, precision):
            out = student(xx)
        t.append(time.perf_counter())
        loss = loss_fn(out, t_logp, t_idx)
        t.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t.append(time.perf_counter())
        norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), 12.0))
        opt.step()
        t.append(time.perf_counter())
        return t[-1] - t[0], dict(zip(PHASES, (b - a for a, b in zip(t, t[1:])))), norm

    # each form trains its own copy from the same start: the same steps, only the form differs
    runs = {}
    for name in FORMS:
        student = copy.deepcopy(student0).train()
        if FORMS[name][2]:
            student.to(memory_format=torch.channels_last_3d)
        runs[name] = (student, torch.optim.Adam(student.parameters(), lr=1e-4))
    times = {name: [] for name in FORMS}
    phases = {name: {p: [] for p in PHASES} for name in FORMS}
    norms = {name: [] for name in FORMS}
    for name, form in FORMS.items():  # a first step each, untimed (allocations)
        step(*runs[name], *form)
    for r in range(args.rounds):
        for name, form in FORMS.items():
            dt, parts, norm = step(*runs[name], *form)
            times[name].append(dt)
            for p, v in parts.items():
                phases[name][p].append(v)
            norms[name].append(norm)
            print(f"round {r + 1} {name}: {dt:.2f} s (" + ", ".join(f"{p} {v:.2f}" for p, v in parts.items())
                  + f"), gradient norm {norm:.3g}", flush=True)
    first = next(iter(FORMS))
    ratios = {name: [a / b for a, b in zip(times[first], times[name])] for name in FORMS}
    print(f"\nstudent at {args.ratio:g} of the MACs, crop {'x'.join(map(str, crop))}, "
          f"{torch.get_num_threads()} threads, AMX: {'amx_bf16' in (cpu_flags() or ())}")
    for name in FORMS:
        print(f"{name:28s} median {statistics.median(times[name]):6.2f} s/step  "
              f"x{statistics.median(ratios[name]):.2f} vs {first}  gradient norms finite: "
              f"{all(math.isfinite(v) for v in norms[name])}")
        print(f"{'':28s} " + ", ".join(f"{p} {statistics.median(v):.2f}" for p, v in phases[name].items()))
    if args.out:
        write_result(args.out, __file__, {
            "model": str(args.model), "ratio": args.ratio, "crop": list(crop), "ct": str(args.ct),
            "amx_bf16": "amx_bf16" in (cpu_flags() or ()),
            "seconds": times, "phase_seconds": phases, "gradient_norms": norms,
            "median_ratio_vs_first": {n: statistics.median(v) for n, v in ratios.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
