"""PyTorch engine: eager on CPU/MPS, autocast fp16/bf16 and compiled graphs on CUDA.

Why: PyTorch runs everywhere TotalSegmentator runs. On CUDA the network is memory-bound:
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
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from TuckerSegLib.engines.base import (Engine, EngineInfo, EngineModule, example_input,
                                       network_state_fingerprint)
from TuckerSegLib.engines.timing import best_seconds

log = logging.getLogger(__name__)

_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TorchEngineModule(EngineModule):
    """Runs the wrapped network (a submodule, so ``.to()`` moves it) at a fixed precision."""

    def __init__(self, network: nn.Module, precision: str, device: torch.device,
                 runner: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 clone_output: bool = False, channels_last: bool = False):
        super().__init__(network_state_fingerprint(network))
        self.net = network
        self.precision = precision
        self.device_type = device.type
        self._runner = runner  # a compiled callable, or None for eager
        self._clone = clone_output  # CUDA graphs reuse their output buffer
        # NDHWC activations: cuDNN's tensor-core 3D convolutions often prefer them
        self.channels_last = channels_last

    def _autocast(self):
        if self.precision == "f32":
            # nnU-Net enables autocast on CUDA around the network: switch it off for exact f32
            if self.device_type in ("cuda", "cpu"):
                return torch.autocast(self.device_type, enabled=False)
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=_DTYPES[self.precision])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with self._autocast():
            out = self._runner(x) if self._runner is not None else self.net(x)
        if self._clone or self.channels_last:  # a fresh, standard-layout tensor for the caller
            out = out.contiguous() if not self._clone else out.clone(memory_format=torch.contiguous_format)
        return out.float()


def _allow_recompiles(limit: int = 256) -> None:
    """Every nnU-Net network shares one ``forward``: dynamo counts each compiled network, layout
    and precision as a recompile of it, and past its default limit (8) silently runs eager."""
    cfg = torch._dynamo.config
    for name, value in (("recompile_limit", limit), ("cache_size_limit", limit),
                        ("accumulated_recompile_limit", 8 * limit), ("accumulated_cache_size_limit", 8 * limit)):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), value))


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
        if precision == "int8":
            return "the torch engine has no INT8; --precision int8 runs on the OpenVINO engine"
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
        return self._fastest(net, patch_size, in_channels, device, precision, cache_dir, info)

    def _fastest(self, net: nn.Module, patch_size, in_channels, device, precision, cache_dir,
                 info: EngineInfo) -> "TorchEngineModule":
        """Eager or compiled, standard or channels-last layout: each measured, the fastest kept."""
        net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last_3d)
        candidates = {"eager": TorchEngineModule(net, precision, device),
                      "eager channels-last": TorchEngineModule(net_cl, precision, device, channels_last=True)}
        for label, module in (("compiled", net), ("compiled channels-last", net_cl)):
            compiled = self._compiled(module, patch_size, in_channels, device, precision, cache_dir, info,
                                      channels_last=module is net_cl)
            if compiled is not None:
                candidates[label] = compiled
        x = example_input(patch_size, in_channels).to(device)
        with torch.inference_mode():
            times = {label: best_seconds(lambda m=m: m(x), device) for label, m in candidates.items()}
        best = min(times, key=times.get)
        info.notes.append(f"torch {best} kept: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items())
                          + " per patch")
        return candidates[best]

    def _compiled(self, net: nn.Module, patch_size, in_channels, device, precision, cache_dir,
                  info: EngineInfo, channels_last: bool = False) -> Optional[TorchEngineModule]:
        """``torch.compile`` with CUDA graphs for the static patch shape; None when it fails."""
        if cache_dir is not None:  # inductor's on-disk cache beside the model: warm starts in seconds
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cache_dir) / "inductor"))
        mode = os.environ.get("TUCKERSEG_TORCH_COMPILE_MODE", "reduce-overhead")
        _allow_recompiles()
        try:
            fn = torch.compile(net, mode=mode, dynamic=False)
            module = TorchEngineModule(net, precision, device, runner=fn, clone_output=True,
                                       channels_last=channels_last)
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
