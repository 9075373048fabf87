"""One device resolver: what ``--device`` means, for TotalSegmentator and for torch alike.

Why: ``auto`` must pick the same hardware whether TotalSegmentator's pipeline, nnU-Net's predictor
(demo, eval) or distillation runs: a CUDA GPU, else Apple's MPS, else the CPU. Names are checked
by ``specs.check_device`` where they enter; here they meet the machine.
"""
from __future__ import annotations

from pathlib import Path
from typing import FrozenSet, Optional

from TuckerSegLib.errors import InputError
from TuckerSegLib.specs import check_device


def resolve_device(device: str = "auto") -> str:
    """TotalSegmentator's device name (cpu, gpu, gpu:N or mps) on this machine; raises
    ``InputError`` when the named hardware is not there."""
    import torch

    d = check_device(device)
    mps = getattr(torch.backends, "mps", None)
    has_mps = mps is not None and mps.is_available()
    if d == "auto":
        return "gpu" if torch.cuda.is_available() else ("mps" if has_mps else "cpu")
    if d.startswith("gpu") and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but PyTorch sees no CUDA device; use --device cpu")
    if d.startswith("gpu:") and int(d[4:]) >= torch.cuda.device_count():
        raise InputError(f"device {device!r} asked for, but there are {torch.cuda.device_count()} CUDA GPU(s)")
    if d == "mps" and not has_mps:
        raise InputError("device 'mps' asked for, but PyTorch's MPS backend is not available here")
    return d


def torch_device(device: str = "auto"):
    """The ``torch.device`` of ``resolve_device(device)`` (gpu -> cuda)."""
    import torch

    d = resolve_device(device)
    return torch.device("cuda" + d[3:] if d.startswith("gpu") else d)


def cpu_flags() -> Optional[FrozenSet[str]]:
    """This CPU's feature flags from /proc/cpuinfo (x86 ``flags``, Arm ``Features``); None where
    that cannot be read (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags") or line.startswith("Features"):
            flags.update(line.split(":", 1)[-1].split())
    return frozenset(flags)
