"""How closely a compressed network reproduces its original: argmax agreement and Dice on patches.

Why: without labels, the uncompressed model's own output is the reference. These are cheap,
patch-level numbers for training logs and tests; whole-volume agreement goes through nnU-Net's
predictor (``benchmarks/recovery_experiment.py``).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn


def mean_dice(pred: torch.Tensor, ref: torch.Tensor, num_classes: int) -> float:
    """Mean Dice over the foreground classes present in ``pred`` or ``ref`` (1.0 if none)."""
    scores = []
    for c in range(1, num_classes):
        p, r = pred == c, ref == c
        denom = int(p.sum()) + int(r.sum())
        if denom:
            scores.append(2.0 * int((p & r).sum()) / denom)
    return float(sum(scores) / len(scores)) if scores else 1.0


@torch.no_grad()
def patch_agreement(teacher: nn.Module, student: nn.Module, patches: torch.Tensor,
                    device: Optional[torch.device] = None, batch_size: int = 2) -> Dict[str, float]:
    """Voxel agreement and mean Dice of the student's argmax against the teacher's on ``patches``."""
    device = device or next(student.parameters()).device
    t_all, s_all = [], []
    was = (teacher.training, student.training)
    teacher.eval()
    student.eval()
    try:
        for i in range(0, len(patches), batch_size):
            x = patches[i:i + batch_size].to(device)
            t_all.append(teacher(x).argmax(1).cpu())
            s_all.append(student(x).argmax(1).cpu())
    finally:
        teacher.train(was[0])
        student.train(was[1])
    t, s = torch.cat(t_all), torch.cat(s_all)
    n_classes = int(max(t.max(), s.max())) + 1
    return {"voxel_agreement": float((t == s).float().mean()), "mean_dice": mean_dice(s, t, n_classes)}


@torch.no_grad()
def label_agreement(student: nn.Module, patches: torch.Tensor, teacher_labels: torch.Tensor,
                    device: Optional[torch.device] = None, batch_size: int = 1) -> Dict[str, float]:
    """``patch_agreement`` against the teacher's label maps computed beforehand (full precision)."""
    device = device or next(student.parameters()).device
    was = student.training
    student.eval()
    try:
        s = torch.cat([student(patches[i:i + batch_size].to(device)).argmax(1).cpu()
                       for i in range(0, len(patches), batch_size)])
    finally:
        student.train(was)
    t = teacher_labels.long()
    n_classes = int(max(t.max(), s.max())) + 1
    return {"voxel_agreement": float((t == s).float().mean()), "mean_dice": mean_dice(s, t, n_classes)}
