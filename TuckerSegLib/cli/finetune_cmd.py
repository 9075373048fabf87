"""``tuckerseg finetune``: distil a compressed model from its original on the user's own CTs."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from TuckerSegLib.errors import InputError
from TuckerSegLib.specs import POLICIES, CompressionSpec

HELP = "recover quality by distilling a compressed model from its original"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from TuckerSegLib.cli.compress_cmd import POLICY_HELP
    from TuckerSegLib.finetune.distill import DistillConfig

    d = DistillConfig()
    parser.add_argument("model", help="nnU-Net model folder, compressed-model folder (its original, "
                                      "named in the manifest, is the teacher) or TotalSegmentator "
                                      "dataset id (e.g. 291)")
    parser.add_argument("-i", "--input", nargs="+", type=Path, default=[], metavar="CT",
                        help="unlabelled CTs (NIfTI) to distil on; the original model labels them")
    parser.add_argument("--phantoms", type=int, default=0, metavar="N",
                        help="add N synthetic phantom CTs to the transfer set (default 0)")
    parser.add_argument("--augment", action="store_true",
                        help="zoom and intensity augmentation of the unlabelled training patches")
    parser.add_argument("-o", "--output", type=Path, required=True, help="compressed-model folder to write")
    parser.add_argument("--ratio", type=float, default=None,
                        help="compression ratio in (0, 1] (needed for an nnU-Net folder; meaning per --policy)")
    parser.add_argument("--policy", choices=POLICIES, default="budget", help=POLICY_HELP)
    parser.add_argument("--init", choices=("calibrated", "hosvd"), default="calibrated",
                        help="factors of the new student: data-aware from the CTs (default) or plain HOSVD")
    parser.add_argument("--recipe", choices=("fast", "classic"), default="fast",
                        help="fast (default): the original's answers computed once for a pool of "
                             "smaller crops and stored, bf16 on CUDA; classic: the "
                             "original runs on every step on whole patches, with stage-feature MSE")
    parser.add_argument("--steps", type=int, default=d.steps, help=f"at most this many training steps (default {d.steps})")
    parser.add_argument("--until-agreement", type=float, default=None, metavar="A",
                        help="stop once mean Dice against the original on the validation patches "
                             "reaches A (checked every --eval-every steps)")
    parser.add_argument("--max-minutes", type=float, default=None, metavar="M",
                        help="stop (saving a checkpoint) before M minutes of wall time, preparation "
                             "included; the learning rate's cosine then runs over the steps M affords")
    parser.add_argument("--eval-every", type=int, default=d.eval_every,
                        help=f"steps between held-out agreement checks (default {d.eval_every}); the best "
                             f"student checked is the one saved")
    parser.add_argument("--keep-last", action="store_true",
                        help="save the last step's student even where an earlier one (or the "
                             "compressed start) agreed better on the validation patches")
    parser.add_argument("--crop", default=None, metavar="ZxYxX",
                        help="training patch size, a multiple of the network's stride (default: the model's "
                             "patch; smaller crops change what InstanceNorm sees and teach another function)")
    parser.add_argument("--pool", type=int, default=d.pool,
                        help=f"training patches whose original answers are stored (fast recipe; default {d.pool})")
    parser.add_argument("--topk", type=int, default=d.topk,
                        help="classes stored per voxel (fast recipe; default 0: all up to 16, else 8)")
    parser.add_argument("--precision", choices=("auto", "f32", "bf16", "fp16"), default=d.precision,
                        help="student training precision (fast recipe; auto: bf16 on CUDA and on CPUs with "
                             "AMX, else f32; a reduced precision that overflows falls back to f32)")
    parser.add_argument("--train-params", choices=("all", "factors"), default=d.train_params,
                        help="train all weights (default) or only the factorised layers' factors and cores")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default=d.compile,
                        help="torch.compile the student (auto: on CUDA with the fast recipe; default off: its "
                             "compile time is paid inside --max-minutes and its gain is not measured yet)")
    parser.add_argument("--val-patches", type=int, default=4,
                        help="validation patches (model patch size) for the agreement read-out (default 4)")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate, cosine-decayed (default {d.lr:g})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help=f"patches per step (default {d.batch_size})")
    parser.add_argument("--temperature", type=float, default=d.temperature, help="softmax temperature of the soft targets")
    parser.add_argument("--feature-weight", type=float, default=d.feature_weight,
                        help=f"weight of the MSE on encoder/decoder stage outputs (classic recipe; default {d.feature_weight:g}; 0: off)")
    parser.add_argument("--pseudo-label-weight", type=float, default=d.pseudo_label_weight,
                        help=f"weight of nnU-Net's Dice+CE against the original model's labels "
                             f"(default {d.pseudo_label_weight:g}; 0: soft targets only)")
    parser.add_argument("--logit-weight", type=float, default=d.logit_weight, help="weight of the MSE on logits (classic recipe; default 0)")
    parser.add_argument("--labels", type=Path, default=None, metavar="DATASET_DIR",
                        help="nnU-Net raw dataset (imagesTr/, labelsTr/): add nnU-Net's Dice+CE loss on its labels "
                             "(classic recipe)")
    parser.add_argument("--val", nargs="+", type=Path, default=[], metavar="CT",
                        help="held-out CTs for the agreement read-out (default: patches of the training CTs)")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, gpu or cuda:N")
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="checkpoints folder (default: .<OUTPUT>.finetune-work beside the output)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the work folder")
    parser.add_argument("--seed", type=int, default=d.seed, help="patch sampling seed")
    parser.add_argument("--fold", default="0", help="fold of the original model (default 0)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def run(args: argparse.Namespace, progress) -> int:
    from TuckerSegLib.finetune.distill import DistillConfig
    from TuckerSegLib.finetune.workflow import finetune

    spec = CompressionSpec(ratio=args.ratio, policy=args.policy) if args.ratio is not None else None
    if args.steps < 1 or args.batch_size < 1 or args.checkpoint_every < 1 or args.eval_every < 1 or args.pool < 1:
        raise InputError("--steps, --batch-size, --checkpoint-every, --eval-every and --pool must be at least 1")
    if args.until_agreement is not None and not (0 < args.until_agreement <= 1):
        raise InputError("--until-agreement must be in (0, 1]")
    if args.until_agreement is not None and args.val_patches < 1:
        raise InputError("--until-agreement needs validation patches (--val-patches at least 1)")
    if args.max_minutes is not None and not (args.max_minutes > 0):
        raise InputError("--max-minutes must be positive")
    if args.topk < 0 or args.val_patches < 0:
        raise InputError("--topk and --val-patches must be 0 or more")
    crop = None
    if args.crop:
        try:
            crop = [int(v) for v in str(args.crop).lower().replace(",", "x").split("x") if v]
        except ValueError:
            raise InputError(f"--crop must look like 64x64x64, got {args.crop!r}") from None
    if not (args.lr > 0):
        raise InputError("--lr must be positive")
    config = DistillConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                           temperature=args.temperature, feature_weight=args.feature_weight,
                           logit_weight=args.logit_weight, pseudo_label_weight=args.pseudo_label_weight,
                           checkpoint_every=args.checkpoint_every,
                           seed=args.seed, recipe=args.recipe, pool=args.pool, topk=args.topk,
                           precision=args.precision, train_params=args.train_params, compile=args.compile,
                           until_agreement=args.until_agreement, max_minutes=args.max_minutes,
                           eval_every=args.eval_every, keep_best=not args.keep_last)
    fold = int(args.fold) if str(args.fold).isdigit() else args.fold
    summary = finetune(args.model, args.input, args.output, spec,
                       config=config, device=args.device, labels_dir=args.labels, resume=args.resume,
                       work_dir=args.work_dir, init=args.init, val_images=args.val, fold=fold,
                       progress=progress, phantoms=args.phantoms, augment=args.augment, crop=crop,
                       val_patches=args.val_patches)
    val = summary["validation"]
    progress.result({"output": str(args.output), "steps": summary["steps"],
                     "final_loss": summary["loss_curve"][-1] if summary["loss_curve"] else None,
                     "agreement_before": val["before"], "agreement_after": val["after"]})
    if args.json:
        print(json.dumps(summary))
    else:
        curve = summary["loss_curve"]
        why = {"steps": "", "agreement": " (stopped: agreement target reached)",
               "time": " (stopped: --max-minutes)"}[summary["stopped"]]
        rate = summary.get("steps_per_second")
        print(f"distilled {summary['steps']} steps ({summary['recipe']} recipe, {summary['precision']}) on "
              f"{summary['device']} in {summary['seconds']} s" + (f", {rate:.3f} steps/s" if rate else "")
              + why + (f"; loss {curve[0]:.4f} -> {curve[-1]:.4f}" if curve else "; no steps run"))
        ts = summary["transfer_set"]
        print(f"trained on: {len(ts['cts'])} CT(s), {ts['phantoms']} phantom(s), "
              f"{'augmented ' if ts['augmentation'] else ''}crops {'x'.join(map(str, ts['crop']))}")
        if val["before"] and val["after"]:
            where = "held-out CTs" if val["held_out"] else "training CTs, not held out"
            print(f"agreement with the original ({val['patches']} patches of {where}): mean Dice "
                  f"{val['before']['mean_dice']:.3f} -> {val['after']['mean_dice']:.3f}, voxels "
                  f"{val['before']['voxel_agreement']:.3f} -> {val['after']['voxel_agreement']:.3f}")
            if val.get("kept_step") is not None and val["kept_step"] != summary["steps"] and val.get("last"):
                print(f"kept the student of step {val['kept_step']}, the best measured (the last step's "
                      f"agreed {val['last']['mean_dice']:.3f})")
        print(f"wrote {args.output} (loss curve: {Path(args.output) / 'loss_curve.png'})")
    return 0
