"""How far a low-precision engine's output is from f32: argmax agreement and logit differences.

Why: bf16/fp16 change segmentations (OpenVINO bf16 agreed with f32 on 98.4 % of voxels of a
random-weight network on a 2-core AMD EPYC). Lower precision is only used when asked for, and then its
agreement is measured once per compiled model and reported; the result is cached beside it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from TuckerSegLib.storage import merge_json, read_json


@dataclass
class Agreement:
    argmax_agreement: float  # fraction of voxels whose argmax class is the same
    max_abs_diff: float
    mean_abs_diff: float
    voxels: int

    def as_dict(self) -> dict:
        return asdict(self)


def compare_logits(test: torch.Tensor, reference: torch.Tensor) -> Agreement:
    """Agreement of two logit tensors ``(N, K, *spatial)``."""
    test, reference = test.detach().float().cpu(), reference.detach().float().cpu()
    same = (test.argmax(1) == reference.argmax(1)).float()
    diff = (test - reference).abs()
    return Agreement(float(same.mean()), float(diff.max()), float(diff.mean()), int(same.numel()))


def cached(path: Optional[Path], key: str) -> Optional[Agreement]:
    """The agreement stored under ``key``, or None."""
    entry = read_json(path).get(key)
    try:
        return Agreement(**entry) if entry else None
    except TypeError:
        return None


def store(path: Optional[Path], key: str, agreement: Agreement) -> None:
    merge_json(path, {key: agreement.as_dict()})
