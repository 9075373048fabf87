"""How far a low-precision engine's output is from f32: argmax agreement and logit differences.

Why: bf16/fp16 change segmentations (OpenVINO bf16 agreed with f32 on 98.4 % of voxels of a
random-weight network, NOTES 4). Lower precision is only used when asked for, and then its
agreement is measured once per compiled model and reported; the result is cached beside it.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch


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
    if path is None or not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text()).get(key)
        return Agreement(**entry) if entry else None
    except (ValueError, TypeError):
        return None


def store(path: Optional[Path], key: str, agreement: Agreement) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        data = {}
    data[key] = agreement.as_dict()
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
