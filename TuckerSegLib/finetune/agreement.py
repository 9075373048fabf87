"""How closely a compressed network reproduces its original: argmax agreement and Dice on patches.

Why: without labels, the uncompressed model's own output is the reference. These are cheap,
patch-level numbers for training logs and tests; whole-volume agreement goes through nnU-Net's
predictor (``benchmarks/recovery_experiment.py``).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from TuckerSegLib.network.labels import argmax_labels


def mean_dice(pred: torch.Tensor, ref: torch.Tensor, num_classes: int) -> float:
    """Mean Dice over the foreground classes present in ``pred`` or ``ref`` (1.0 if none): the
    quality target's measure (``pipeline.quality_target.pooled_mean_dice``)."""
    from TuckerSegLib.pipeline.quality_target import pooled_mean_dice

    return pooled_mean_dice(ref, pred, num_classes)


@torch.no_grad()
def label_agreement(student: nn.Module, patches: torch.Tensor, teacher_labels: torch.Tensor,
                    device: Optional[torch.device] = None, batch_size: int = 1) -> Dict[str, float]:
    """Voxel agreement and mean Dice of the student's argmax against the teacher's label maps,
    computed beforehand (full precision)."""
    device = device or next(student.parameters()).device
    was = student.training
    student.eval()
    try:
        s = torch.cat([argmax_labels(student(patches[i:i + batch_size].to(device))).cpu()
                       for i in range(0, len(patches), batch_size)])
    finally:
        student.train(was)
    t = teacher_labels.long()
    n_classes = int(max(t.max(), s.max())) + 1
    return {"voxel_agreement": float((t == s).float().mean()), "mean_dice": mean_dice(s, t, n_classes)}
