"""Which engine and precision run a network: explicit choices are obeyed or refused, ``auto`` decides.

Rules:
- ``--precision auto`` is the stock pipeline's own precision on the device: fp16 autocast on CUDA
  (what nnU-Net and TotalSegmentator do), f32 everywhere else. Lower precision on CPU only when
  the user asks for it.
- ``--engine auto`` takes the fastest engine that runs the device at that precision: OpenVINO on
  CPU (2-3x faster than PyTorch on the compressed networks), PyTorch on CUDA and MPS. An
  engine that cannot run is skipped, and the reason is logged and kept in the engine notes.
- An engine named explicitly that is not installed or cannot run the device/precision raises a
  one-line ``EngineError``: no silent fallback from what the user asked for.
- ``--precision int8`` runs on the OpenVINO engine only (``engines.int8``), on CPUs with VNNI or
  AMX; elsewhere it is refused with one line saying why.
"""
from __future__ import annotations

import logging
import platform
from typing import Dict, List, Tuple

import torch

from TuckerSegLib.engines.base import Engine, available_threads
from TuckerSegLib.engines.openvino_engine import OpenVINOEngine, core, ov_device_name
from TuckerSegLib.engines.torch_engine import TorchEngine
from TuckerSegLib.errors import EngineError

log = logging.getLogger(__name__)

IMPLEMENTATIONS: Dict[str, Engine] = {"torch": TorchEngine(), "openvino": OpenVINOEngine()}
# Preference of ``auto`` per torch device type, fastest first.
AUTO_ORDER = {"cpu": ["openvino", "torch"], "cuda": ["torch"], "mps": ["torch"]}


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> what stock TotalSegmentator runs on ``device``; a named precision as given."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "f32"
    return precision


def why_not(name: str, device: torch.device, precision: str) -> str:
    """'' when engine ``name`` can run ``device`` at ``precision``, else the reason."""
    engine = IMPLEMENTATIONS[name]
    return engine.unavailable_reason() or engine.unsupported_reason(device, precision) or ""


def select_engine(name: str, device: torch.device, precision: str) -> Tuple[Engine, List[str]]:
    """The engine to use and notes about engines skipped by ``auto``."""
    if precision == "int8" and name in ("auto", "openvino"):
        reason = why_not("openvino", device, precision)
        if reason:
            raise EngineError(reason if "int8" in reason else f"--precision int8: {reason}")
        return IMPLEMENTATIONS["openvino"], []
    if name != "auto":
        reason = why_not(name, device, precision)
        if reason:
            raise EngineError(f"engine {name} cannot run {precision} on {device.type}: {reason}")
        return IMPLEMENTATIONS[name], []
    notes = []
    for candidate in AUTO_ORDER.get(device.type, ["torch"]):
        reason = why_not(candidate, device, precision)
        if not reason:
            return IMPLEMENTATIONS[candidate], notes
        log.info("engine auto: %s skipped: %s", candidate, reason)
        notes.append(f"{candidate} skipped: {reason}")
    raise EngineError(f"no engine can run {precision} on {device.type}: " + "; ".join(notes))


def describe_device(device: torch.device, engine: str) -> str:
    """A human name for the hardware, e.g. 'cpu (AMD EPYC, 2 threads)' or 'cuda:0 (NVIDIA H200)'."""
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        name = platform.processor() or platform.machine()
        if engine == "openvino":
            try:
                name = str(core().get_property(ov_device_name(), "FULL_DEVICE_NAME"))
            except Exception:
                pass
            if ov_device_name() != "CPU":
                return f"openvino {ov_device_name()} ({name})"
        return f"cpu ({name}, {available_threads()} threads)"
    return str(device)
