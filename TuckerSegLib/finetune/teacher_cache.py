"""The teacher's outputs, computed once per training patch and stored.

Why: in the classic recipe the uncompressed teacher runs on every step, and at 30 % of the MACs
its forward pass costs more than the student's. A distillation run visits a pool of patches many
times, so the pool's inputs and the teacher's answers are computed once, up front, and each step
only runs the student.

What is stored per voxel: the teacher's ``k`` most likely classes (indices) and their
log-probabilities at the distillation temperature (float16, or float32 with ``exact=True``).
With ``k`` equal to the number of classes that is the whole soft target; with fewer, the rest of
the probability mass is one more bucket (``kd_loss_topk``), which is exact KL divergence between
the two distributions coarsened to (top-k classes, everything else). The top-1 index is the
teacher's label map (pseudo labels). Held-out patches keep only the teacher's label map.

The pool is saved in the work folder (``teacher_cache/``, safetensors + JSON) so that a resumed
run continues on the very same patches without running the teacher again.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from TuckerSegLib.compression.ct_patches import ResumableRng
from TuckerSegLib.network.labels import argmax_labels

CACHE_DIR = "teacher_cache"
LOGP_FLOOR = -1e4  # stored log-probabilities are at least this (finite in float16)


def default_topk(num_classes: int) -> int:
    """Classes stored per voxel when not asked: all up to 16, else 8."""
    return num_classes if num_classes <= 16 else 8


def autocast(device: torch.device, precision: str):
    """Autocast context for ``precision`` (``f32``: none, ``bf16``/``fp16``: torch.autocast)."""
    if precision == "f32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def topk_targets(logits: torch.Tensor, k: int, temperature: float = 1.0,
                 dtype: torch.dtype = torch.float16) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(log-probabilities (B, k, ...), class indices (B, k, ...))`` of the ``k`` likeliest
    classes at ``temperature``, most likely first (index 0 is the teacher's argmax)."""
    logp = F.log_softmax(logits.float() / temperature, dim=1)
    k = min(int(k), logits.shape[1])
    values, indices = torch.topk(logp, k, dim=1, sorted=True)
    # a trained network's unlikely classes reach log-probabilities below float16's range (-inf,
    # whose zero probability times -inf is NaN in the loss); exp(-1e4) is 0 all the same
    values = values.clamp_min(LOGP_FLOOR)
    idx_dtype = torch.uint8 if logits.shape[1] <= 256 else torch.int16
    return values.to(dtype), indices.to(idx_dtype)


@dataclass
class TeacherCache(ResumableRng):
    """A pool of training inputs with the teacher's stored answers; draws batches resumably."""

    inputs: torch.Tensor  # (N, C, *crop) float32
    logp: torch.Tensor  # (N, k, *crop) float16/float32
    indices: torch.Tensor  # (N, k, *crop) uint8/int16
    temperature: float
    num_classes: int
    seconds: float = 0.0
    seed: int = 0
    rng: Optional[np.random.Generator] = None

    def __post_init__(self):
        if self.rng is None:
            self.rng = np.random.default_rng(self.seed)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def k(self) -> int:
        return int(self.logp.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.inputs, self.logp, self.indices))

    def draw(self, batch_size: int) -> np.ndarray:
        """Indices of the next batch (without repetition inside a batch)."""
        return self.rng.choice(len(self), size=min(batch_size, len(self)), replace=False)

    def batch(self, idx: np.ndarray, device: torch.device):
        i = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        return (self.inputs[i].to(device, non_blocking=True), self.logp[i].to(device, non_blocking=True),
                self.indices[i].to(device, non_blocking=True))

    # -- building ----------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def build(cls, teacher: nn.Module, sample: Callable[[int], torch.Tensor], count: int, k: int,
              temperature: float = 1.0, device: torch.device = torch.device("cpu"),
              precision: str = "f32", batch_size: int = 2, exact: bool = False, seed: int = 0,
              on_batch: Optional[Callable[[int, int], None]] = None) -> "TeacherCache":
        """Draw ``count`` inputs with ``sample(n)`` and store the teacher's top-``k`` answers
        (``k`` 0: ``default_topk``)."""
        t0 = time.perf_counter()
        was = teacher.training
        teacher.eval()
        xs, lps, ids = [], [], []
        num_classes = None
        try:
            done = 0
            while done < count:
                n = min(batch_size, count - done)
                x = sample(n)
                with autocast(device, precision):
                    logits = teacher(x.to(device))
                num_classes = int(logits.shape[1])
                k = k if k > 0 else default_topk(num_classes)
                lp, ix = topk_targets(logits, k, temperature, torch.float32 if exact else torch.float16)
                xs.append(x.cpu())
                lps.append(lp.cpu())
                ids.append(ix.cpu())
                done += n
                if on_batch is not None:
                    on_batch(done, count)
        finally:
            teacher.train(was)
        return cls(torch.cat(xs), torch.cat(lps), torch.cat(ids), float(temperature), num_classes,
                   seconds=time.perf_counter() - t0, seed=seed)

    # -- storage -----------------------------------------------------------------------------
    def save(self, folder: Path, signature: dict) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"inputs": self.inputs.contiguous(), "logp": self.logp.contiguous(),
                   "indices": self.indices.contiguous()}, str(folder / "pool.safetensors.tmp"))
        (folder / "pool.safetensors.tmp").replace(folder / "pool.safetensors")
        meta = {"signature": signature, "temperature": self.temperature,
                "num_classes": self.num_classes, "seconds": self.seconds, "seed": self.seed}
        (folder / "pool.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, folder: Path, signature: dict) -> Optional["TeacherCache"]:
        """The pool saved in ``folder`` if it was built with the same ``signature``, else None."""
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            meta = json.loads((folder / "pool.json").read_text())
            if meta.get("signature") != json.loads(json.dumps(signature)):
                return None
            t = load_file(str(folder / "pool.safetensors"))
        except (OSError, ValueError, json.JSONDecodeError):
            return None
        return cls(t["inputs"], t["logp"], t["indices"], meta["temperature"], meta["num_classes"],
                   seconds=meta.get("seconds", 0.0), seed=meta.get("seed", 0))


@torch.no_grad()
def teacher_labels(teacher: nn.Module, patches: torch.Tensor, device: torch.device,
                   batch_size: int = 1) -> torch.Tensor:
    """The teacher's label maps (uint8/int16) of held-out ``patches``, in full precision."""
    was = teacher.training
    teacher.eval()
    out = []
    try:
        for i in range(0, len(patches), batch_size):
            logits = teacher(patches[i:i + batch_size].to(device))
            out.append(argmax_labels(logits, 1, torch.int16).cpu())
    finally:
        teacher.train(was)
    return torch.cat(out)
