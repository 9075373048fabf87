"""One way to time a forward pass, so that every engine and layer choice is measured alike.

Why: choices between engines, layouts and layer forms compare timings taken minutes apart on a
noisy machine; they must all warm up the same way, synchronise the GPU the same way, and keep
the same statistic (each repetition is returned; callers take the best or the median).
"""
from __future__ import annotations

import time
from typing import Callable, List, Optional

import torch


def synchronize(device: Optional[torch.device]) -> None:
    """Wait for queued GPU work (a no-op on CPU), so that wall time covers the computation."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def repeat_seconds(fn: Callable[[], object], device: Optional[torch.device] = None, reps: int = 3,
                   warmup: int = 1) -> List[float]:
    """Seconds of each of ``reps`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def best_seconds(fn: Callable[[], object], device: Optional[torch.device] = None, reps: int = 3,
                 warmup: int = 1) -> float:
    """The fastest of ``reps`` timed calls (the least disturbed by other work on the machine)."""
    return min(repeat_seconds(fn, device, reps, warmup))
