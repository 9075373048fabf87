"""Write nnU-Net models in exactly TotalSegmentator's folder layout, with random (seeded) weights.

Why: TotalSegmentator's weights cannot be downloaded on CI machines, but its whole pipeline must
run in tests and benchmarks. These models use TotalSegmentator's dataset ids, folder names,
trainer names, old-format plans and real class maps, and the real network classes (built by
nnU-Net from the plans); only the weights are random and the widths configurable:
``width_scale=1.0`` gives the full TotalSegmentator networks (for benchmarks), ``0.125`` gives
4..40 features (fast tests).

Random networks give argmax maps without background, dominated by a few classes. To make label
maps non-trivial, the final 1x1x1 head is re-initialised so that class k wins where one decoder
feature f is nearest to its centre c_k (logit_k = 2 c_k f - c_k^2 orders classes like
-(f - c_k)^2): background (centre 0) and several real classes then win in different ranges of f,
which follows the image content. All other classes get a bias of -100.

Usage: ``python -m TuckerSegLib.models.totalseg_layout ROOT [--ids 297 ...] [--width-scale 0.125]``
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch

from TuckerSegLib.models.nnunet_folder import build_network
from TuckerSegLib.models.totalseg_archs import DATASET_FOLDERS, TRAINERS, totalseg_plans

PLANS = "nnUNetPlans"
CONFIGURATION = "3d_fullres"


def model_dir(root: Path, dataset_id: int) -> Path:
    """``<root>/DatasetXXX_.../<trainer>__nnUNetPlans__3d_fullres`` as TotalSegmentator expects."""
    return Path(root) / DATASET_FOLDERS[dataset_id] / f"{TRAINERS[dataset_id]}__{PLANS}__{CONFIGURATION}"


@torch.no_grad()
def _shape_head(network: torch.nn.Module, generator: torch.Generator, n_winning: int) -> None:
    """Make ``n_winning`` classes (background included) win in different ranges of one feature."""
    head = network.decoder.seg_layers[-1]
    n_classes, n_feat = head.weight.shape[:2]
    head.weight.zero_()
    head.bias.zero_()
    # Which classes get a range: background plus an evenly spread, seeded choice of the others.
    others = torch.randperm(n_classes - 1, generator=generator)[: max(0, n_winning - 1)] + 1
    winners = [0] + sorted(int(c) for c in others)
    centres = torch.linspace(0.0, 2.5, len(winners))
    feature = int(torch.randint(0, n_feat, (1,), generator=generator))
    for c, centre in zip(winners, centres):
        head.weight[c, feature] = 2.0 * centre
        head.bias[c] = -(centre ** 2)
    # Classes that never win get a clearly lower logit.
    for c in range(n_classes):
        if c not in winners:
            head.bias[c] = -100.0


def build_model(root: Path, dataset_id: int, width_scale: float = 0.125, seed: int = 0,
                n_winning: int = 8, overwrite: bool = False) -> Path:
    """Write one model folder (plans.json, dataset.json, fold_0/checkpoint_final.pth)."""
    folder = model_dir(root, dataset_id)
    ckpt = folder / "fold_0" / "checkpoint_final.pth"
    if ckpt.exists() and not overwrite:
        return folder
    plans, dataset_json = totalseg_plans(dataset_id, width_scale)
    torch.manual_seed(seed * 1000 + dataset_id)
    network = build_network(plans, dataset_json, CONFIGURATION, TRAINERS[dataset_id])
    gen = torch.Generator().manual_seed(seed * 1000 + dataset_id + 1)
    if n_winning > 0:
        _shape_head(network, gen, n_winning)
    return write_model_folder(root, dataset_id, plans, dataset_json, network.state_dict())


def write_model_folder(root: Path, dataset_id: int, plans: dict, dataset_json: dict,
                       network_weights: Dict[str, torch.Tensor], current_epoch: int = 0) -> Path:
    """Write plans.json, dataset.json and fold_0/checkpoint_final.pth (the keys nnU-Net's predictor
    and TuckerSeg read) under ``model_dir(root, dataset_id)``; the checkpoint is replaced atomically.

    Why one writer: random test models and trained ones must be indistinguishable in form.
    """
    folder = model_dir(root, dataset_id)
    ckpt = folder / "fold_0" / "checkpoint_final.pth"
    trainer = TRAINERS[dataset_id]
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    checkpoint = {
        "network_weights": network_weights,
        "trainer_name": trainer,
        "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": 0,
                      "dataset_json": dataset_json},
        "inference_allowed_mirroring_axes": None,  # the NoMirroring trainers store None
        "current_epoch": int(current_epoch),
    }
    tmp = ckpt.with_suffix(".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(ckpt)
    return folder


def build_models(root: Path, dataset_ids: Iterable[int], width_scale: float = 0.125, seed: int = 0,
                 n_winning: int = 8, overwrite: bool = False) -> List[Path]:
    """Write several model folders under ``root`` (a TotalSegmentator weights folder)."""
    return [build_model(root, i, width_scale, seed, n_winning, overwrite) for i in dataset_ids]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="weights root (e.g. $TOTALSEG_WEIGHTS_PATH)")
    parser.add_argument("--ids", type=int, nargs="+", default=[297],
                        help="dataset ids (291-295, 297, 298); default 297")
    parser.add_argument("--width-scale", type=float, default=0.125,
                        help="feature width factor; 1.0 = full TotalSegmentator widths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-winning", type=int, default=8,
                        help="classes that win somewhere in the label map (0: leave head random)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    for folder in build_models(args.root, args.ids, args.width_scale, args.seed, args.n_winning,
                               args.overwrite):
        print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
