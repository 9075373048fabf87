"""PyTorch engine: eager on CPU/MPS, autocast fp16/bf16 and compiled graphs on CUDA.

Why: PyTorch runs everywhere TotalSegmentator runs. On CUDA the network is memory-bound (NOTES 4):
``torch.compile`` fuses InstanceNorm/LeakyReLU into few kernels and, with CUDA graphs
("reduce-overhead"), removes launch overhead; whether that helps is measured on the patch shape
and the faster of eager and compiled is kept. Precision is explicit: nnU-Net's sliding window
turns autocast on for every CUDA device, so the f32 engine turns it off inside the module.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from TuckerSegLib.engines.base import (Engine, EngineInfo, EngineModule, example_input, patch_tuple,
                                       state_fingerprint)

log = logging.getLogger(__name__)

_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TorchEngineModule(EngineModule):
    """Runs the wrapped network (a submodule, so ``.to()`` moves it) at a fixed precision."""

    def __init__(self, network: nn.Module, precision: str, device: torch.device,
                 runner: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 clone_output: bool = False):
        super().__init__(state_fingerprint(network.state_dict()))
        self.net = network
        self.precision = precision
        self.device_type = device.type
        self._runner = runner  # a compiled callable, or None for eager
        self._clone = clone_output  # CUDA graphs reuse their output buffer

    def _autocast(self):
        if self.precision == "f32":
            # nnU-Net enables autocast on CUDA around the network: switch it off for exact f32
            if self.device_type in ("cuda", "cpu"):
                return torch.autocast(self.device_type, enabled=False)
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=_DTYPES[self.precision])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        with self._autocast():
            out = self._runner(x) if self._runner is not None else self.net(x)
        if self._clone:
            out = out.clone()
        return out.float()


def _time(fn: Callable[[], torch.Tensor], device: torch.device, reps: int = 3) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


class TorchEngine(Engine):
    name = "torch"

    def unavailable_reason(self) -> Optional[str]:
        return None  # PyTorch is a hard dependency

    def unsupported_reason(self, device: torch.device, precision: str) -> Optional[str]:
        if device.type == "cuda" and not torch.cuda.is_available():
            return "CUDA is not available to PyTorch on this machine"
        if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            return "Apple MPS is not available to PyTorch on this machine"
        if device.type not in ("cpu", "cuda", "mps"):
            return f"device type {device.type!r} is not supported by the torch engine"
        if device.type == "cpu" and precision == "fp16":
            return "PyTorch has no fast fp16 convolutions on CPU; use --precision bf16 or f32"
        if device.type == "mps" and precision == "bf16":
            return "bf16 is not supported on Apple MPS; use --precision fp16 or f32"
        if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
            return "this CUDA device does not support bf16; use --precision fp16 or f32"
        return None

    def prepare(self, network: nn.Module, patch_size: Sequence[int], in_channels: int,
                device: torch.device, precision: str, cache_dir: Optional[Path],
                info: EngineInfo) -> nn.Module:
        net = copy.deepcopy(network).eval().to(device)
        if device.type != "cuda" or os.environ.get("TUCKERSEG_TORCH_COMPILE", "1") == "0":
            return TorchEngineModule(net, precision, device)
        torch.backends.cudnn.benchmark = True
        eager = TorchEngineModule(net, precision, device)
        compiled = self._compiled(net, patch_size, in_channels, device, precision, cache_dir, info)
        if compiled is None:
            return eager
        x = example_input(patch_size, in_channels).to(device)
        with torch.inference_mode():
            t_eager = _time(lambda: eager(x), device)
            t_comp = _time(lambda: compiled(x), device)
        if t_comp < t_eager:
            info.notes.append(f"torch.compile kept: {t_comp * 1e3:.1f} ms vs eager {t_eager * 1e3:.1f} ms per patch")
            return compiled
        info.notes.append(f"torch.compile not faster ({t_comp * 1e3:.1f} ms vs eager {t_eager * 1e3:.1f} ms): eager kept")
        return eager

    def _compiled(self, net: nn.Module, patch_size, in_channels, device, precision, cache_dir,
                  info: EngineInfo) -> Optional[TorchEngineModule]:
        """``torch.compile`` with CUDA graphs for the static patch shape; None when it fails."""
        if cache_dir is not None:  # inductor's on-disk cache beside the model: warm starts in seconds
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cache_dir) / "inductor"))
        mode = os.environ.get("TUCKERSEG_TORCH_COMPILE_MODE", "reduce-overhead")
        try:
            fn = torch.compile(net, mode=mode, dynamic=False)
            module = TorchEngineModule(net, precision, device, runner=fn, clone_output=True)
            x = example_input(patch_size, in_channels).to(device)
            with torch.inference_mode():
                for _ in range(3):  # compile, record the graph, replay
                    module(x)
            return module
        except Exception as exc:  # compilers fail in many ways (no triton, old GPU): fall back
            msg = " ".join(str(exc).split())[:160]
            log.warning("torch.compile failed, running eager: %s", msg)
            info.notes.append(f"torch.compile failed ({type(exc).__name__}: {msg}); eager used")
            return None
