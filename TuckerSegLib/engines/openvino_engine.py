"""OpenVINO engine: the network converted to OpenVINO IR once, compiled for the CPU (or Intel GPU/NPU).

Why: PyTorch on CPU runs the thin Tucker convolutions on a slow non-oneDNN path; OpenVINO runs
the same compressed network 2-3x faster in f32 and faster still in bf16 or INT8 (``engines.int8``:
NNCF post-training quantisation with accuracy control, cached as its own IR). Conversion
costs tens of seconds, so the IR is cached (``<cache>/openvino/<key>/model.xml``, key = hash of
structure + weights, input shape, OpenVINO version) and the compiled blob too (OpenVINO's own
``CACHE_DIR``): a warm start only reads the blob. The precision hint is always explicit: the CPU
plugin silently defaults to bf16 on CPUs that have it, which changes results.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import weakref
from collections import deque
from pathlib import Path
from typing import Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from TuckerSegLib.engines.base import (Engine, EngineInfo, EngineModule, available_threads, patch_tuple,
                                       network_state_fingerprint, weights_fingerprint)
from TuckerSegLib.errors import EngineError

log = logging.getLogger(__name__)

# INT8 lives in the graph (quantise/dequantise pairs); the layers kept in f32 run in f32.
_HINTS = {"f32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
_CAPABILITY = {"bf16": "BF16", "fp16": "FP16", "f32": "FP32"}
DEVICE_ENV = "TUCKERSEG_OPENVINO_DEVICE"  # e.g. GPU or NPU for Intel accelerators
TILE_STREAMS_ENV = "TUCKERSEG_TILE_STREAMS"  # tiles in flight on the CPU; 1: one at a time
MAX_TILE_STREAMS = 4  # each stream holds a tile's activations (about 1 GB for a full-width 1.5 mm network)


def _ov():
    import openvino as ov  # noqa: WPS433 (optional dependency, imported on use)
    return ov


_CORE = None


def core():
    """One OpenVINO Core per process (creating it loads the plugins)."""
    global _CORE
    if _CORE is None:
        _CORE = _ov().Core()
    return _CORE


def ov_device_name() -> str:
    return os.environ.get(DEVICE_ENV, "CPU").upper()


def tile_streams(threads: int) -> int:
    """How many tiles ``OpenVINOModule.map_tiles`` runs at once on the CPU: one per core, at most
    ``MAX_TILE_STREAMS``; ``TUCKERSEG_TILE_STREAMS`` sets it (1: one tile at a time on every core)."""
    given = os.environ.get(TILE_STREAMS_ENV, "").strip()
    if given:
        try:
            value = int(given)
        except ValueError:
            value = 0
        if value < 1:
            raise EngineError(f"{TILE_STREAMS_ENV} must be a whole number of at least 1, got {given!r}")
        return value
    if ov_device_name() != "CPU":
        return 1
    return max(1, min(int(threads), MAX_TILE_STREAMS))


def ir_key(network: nn.Module, input_shape: Sequence[int]) -> str:
    ov = _ov()
    h = hashlib.sha256()
    h.update(weights_fingerprint(network).encode())
    h.update(repr(tuple(input_shape)).encode())
    h.update(ov.__version__.encode())
    return h.hexdigest()[:24]


def convert_static(module: nn.Module, input_shape: Sequence[int]):
    """``ov.convert_model`` of ``module`` with a static ``input_shape``.

    Why not trace at that shape: tracing runs the module in PyTorch, which at a full 3D patch
    costs seconds per layer (minutes when every form of every layer is timed). The graph does not
    depend on the spatial size, so it is traced at a small one that keeps the network's
    downsampling exact (the largest power of two up to 64 dividing each axis), then reshaped.
    Tracing at the real shape remains the fallback.

    The trace skips torch's ``check_trace`` (a second trace and a graph comparison: half the
    conversion's time, 1.4 s of 2.7 s for a full-width 3 mm network), through OpenVINO's own
    decoder and its ``trace_kwargs``; the IR is the same (``Testing/Python/test_engines.py``).
    """
    ov = _ov()
    small = [int(input_shape[0]), int(input_shape[1]), *[math.gcd(int(s), 64) for s in input_shape[2:]]]
    module = module.eval().to("cpu")
    with torch.no_grad():
        if small != [int(s) for s in input_shape]:
            try:
                model = ov.convert_model(_traced(module, torch.zeros(*small)), example_input=torch.zeros(*small))
                model.reshape({0: ov.PartialShape([int(s) for s in input_shape])})
                return model
            except Exception as exc:  # e.g. a network whose strides need more than 64
                log.debug("small-shape conversion failed (%s); tracing at %s", exc, tuple(input_shape))
        example = torch.zeros(*input_shape)
        return ov.convert_model(_traced(module, example), example_input=example,
                                input=[ov.PartialShape([int(s) for s in input_shape])])


def _traced(module: nn.Module, example: torch.Tensor):
    """OpenVINO's TorchScript decoder of ``module`` traced on ``example`` without ``check_trace``."""
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    return TorchScriptPythonDecoder(module, example_input=example, trace_kwargs={"check_trace": False})


def save_ir(model, folder: Path, sidecar: str, info: dict) -> None:
    """Save an OpenVINO model (f32 weights kept) and a JSON sidecar into ``folder`` atomically;
    when another process wrote ``folder`` meanwhile, theirs is kept."""
    ov = _ov()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        # keep f32 weights: save_model compresses to fp16 by default, which would change results
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        (tmp / sidecar).write_text(json.dumps(info, indent=1))
        if folder.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert_to_ir(network: nn.Module, input_shape: Sequence[int], folder: Path) -> Path:
    """Convert ``network`` at a static ``input_shape`` and save f32 IR into ``folder`` atomically."""
    save_ir(convert_static(network, input_shape), folder, "source.json",
            {"input_shape": list(input_shape), "openvino": _ov().__version__})
    return folder / "model.xml"


class OpenVINOModule(EngineModule):
    """Calls a compiled OpenVINO model on torch tensors; recompiles for a new input shape.

    ``tile_streams`` above 1: ``map_tiles`` runs that many tiles at once, each on its own share
    of the threads (OpenVINO's CPU streams, compiled on first use); one call still runs one tile
    on every thread."""

    def __init__(self, ir_path: Path, input_shape: Tuple[int, ...], device: str, config: dict,
                 source_fp: str, tile_streams: int = 1):
        super().__init__(source_fp)
        self.ir_path = Path(ir_path)
        self.ir_shape = tuple(int(s) for s in input_shape)
        self.ov_device = device
        self.config = dict(config)
        self.tile_streams = max(1, int(tile_streams))
        self._compiled: Dict[Tuple[int, ...], object] = {}
        self._requests: Dict[Tuple[int, ...], object] = {}
        self._stream_pools: Dict[Tuple[int, ...], List[object]] = {}
        self._compile(self.ir_shape)

    def _compile_for(self, shape: Tuple[int, ...], config: dict):
        ov_core = core()
        if shape == self.ir_shape:  # the IR's own shape: compile from the path (uses the blob cache)
            return ov_core.compile_model(str(self.ir_path), self.ov_device, config)
        model = ov_core.read_model(str(self.ir_path))
        model.reshape({0: _ov().PartialShape(list(shape))})
        return ov_core.compile_model(model, self.ov_device, config)

    def _compile(self, shape: Tuple[int, ...]):
        if shape not in self._compiled:
            self._compiled[shape] = self._compile_for(shape, self.config)
            self._requests[shape] = self._compiled[shape].create_infer_request()
        return self._requests[shape]

    def _stream_pool(self, shape: Tuple[int, ...]) -> List[object]:
        """One infer request per stream of the model compiled for tiles in flight at ``shape``."""
        if shape not in self._stream_pools:
            config = {**self.config, "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": self.tile_streams}
            compiled = self._compile_for(shape, config)
            self._stream_pools[shape] = [compiled.create_infer_request() for _ in range(self.tile_streams)]
        return self._stream_pools[shape]

    def _output(self, request, device: torch.device) -> torch.Tensor:
        data = request.get_output_tensor(0).data
        return torch.from_numpy(data if self._borrow_outputs else data.copy()).to(device)

    @staticmethod
    def _array(x: torch.Tensor):
        return x.detach().to("cpu", torch.float32).contiguous().numpy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(int(s) for s in x.shape)
        request = self._compile(shape) if shape not in self._requests else self._requests[shape]
        request.infer({0: self._array(x)})
        return self._output(request, x.device)

    def map_tiles(self, tiles: Iterable[torch.Tensor], count: int) -> Iterator[torch.Tensor]:
        """The outputs of ``count`` tiles in order, ``tile_streams`` in flight at a time.

        Why: one 3-D convolution network on all cores waits on its threads at every layer; on 2
        cores two tiles at once, one thread each, ran six full-width 1.5 mm tiles 1.12x faster in
        bf16 and 1.04x in f32 (``benchmarks/bench_tile_streams.py``, AMD EPYC). The numbers are
        those of the model on one thread: bf16 rounds differently from the two-thread model."""
        if count < 2 or self.tile_streams < 2:
            yield from super().map_tiles(tiles, count)
            return
        in_flight: Deque[Tuple[object, torch.device]] = deque()
        idle: List[object] = []
        shape = None

        def oldest() -> Tuple[object, torch.Tensor]:
            request, device = in_flight.popleft()
            request.wait()
            return request, self._output(request, device)

        try:
            for tile in tiles:
                tile_shape = tuple(int(s) for s in tile.shape)
                if tile_shape != shape:  # another shape: finish this pool's tiles first
                    while in_flight:
                        yield oldest()[1]
                    shape, idle = tile_shape, list(self._stream_pool(tile_shape))
                if not idle:  # the oldest tile's output is consumed before its request runs again
                    request, output = oldest()
                    yield output
                    idle.append(request)
                request = idle.pop()
                request.start_async({0: self._array(tile)})
                in_flight.append((request, tile.device))
            while in_flight:
                yield oldest()[1]
        finally:  # a consumer that stops early: no request may still write into its memory
            for request, _ in in_flight:
                request.wait()

    def execution_precision(self) -> str:
        compiled = next(iter(self._compiled.values()))
        try:
            hint = compiled.get_property("INFERENCE_PRECISION_HINT")
            return hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        except Exception:  # not every device reports it
            return "?"


class OpenVINOEngine(Engine):
    name = "openvino"

    def unavailable_reason(self) -> Optional[str]:
        try:
            _ov()
        except ImportError as exc:
            return f"OpenVINO is not installed (pip install openvino): {exc}"
        return None

    def unsupported_reason(self, device: torch.device, precision: str) -> Optional[str]:
        if device.type != "cpu":
            return (f"the OpenVINO engine runs on the host (torch device 'cpu'; Intel GPU/NPU through "
                    f"{DEVICE_ENV}), not on torch device {device.type!r}")
        ov_dev = ov_device_name()
        try:
            devices = core().available_devices
        except Exception as exc:  # broken installation
            return f"OpenVINO cannot list its devices: {exc}"
        if not any(d.upper().startswith(ov_dev) for d in devices):
            return f"OpenVINO device {ov_dev} is not present (available: {', '.join(devices)})"
        try:
            caps = [str(c).upper() for c in core().get_property(ov_dev, "OPTIMIZATION_CAPABILITIES")]
        except Exception:
            caps = []
        if precision == "int8":
            if ov_dev != "CPU":
                return f"--precision int8 runs on the OpenVINO CPU device, not {ov_dev}"
            from TuckerSegLib.engines import int8
            return int8.int8_support_reason()
        if precision != "f32" and caps and _CAPABILITY[precision] not in caps:
            return (f"OpenVINO on {ov_dev} has no {precision} support on this hardware "
                    f"(capabilities: {', '.join(caps)}); use --precision f32")
        return None

    def config(self, precision: str) -> dict:
        cfg = {"INFERENCE_PRECISION_HINT": _HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}
        if ov_device_name() == "CPU":
            cfg["INFERENCE_NUM_THREADS"] = available_threads()
        return cfg

    def _f32_ir(self, network: nn.Module, input_shape: Tuple[int, ...], base: Path,
                info: EngineInfo) -> Tuple[Path, str]:
        """The cached f32 IR of ``network`` (converted once); ``(model.xml, key)``."""
        key = ir_key(network, input_shape)
        folder = base / "openvino" / key
        ir = folder / "model.xml"
        if ir.is_file() and (folder / "model.bin").is_file():
            info.cache_hit = True
        else:
            with _lock(folder):
                if not ir.is_file():
                    convert_to_ir(network, input_shape, folder)
        info.cache_path = str(folder)
        return ir, key

    def prepare(self, network: nn.Module, patch_size: Sequence[int], in_channels: int,
                device: torch.device, precision: str, cache_dir: Optional[Path],
                info: EngineInfo, int8_data=None, int8_min_agreement: float = 0.99,
                log_fn=None) -> nn.Module:
        """``int8_data`` (``engines.int8.Int8Data``) and ``int8_min_agreement``: for
        ``precision="int8"`` only (see ``engines.int8``)."""
        input_shape = (1, int(in_channels), *patch_tuple(patch_size))
        base = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="tuckerseg-ov-"))
        if cache_dir is None:
            info.notes.append("no cache folder given: OpenVINO IR converted into a temporary folder")
        try:
            module, report, config = self._compiled_module(network, input_shape, base, precision, info,
                                                           int8_data, int8_min_agreement, log_fn,
                                                           blob_cache=cache_dir is not None)
        except BaseException:
            if cache_dir is None:
                shutil.rmtree(base, ignore_errors=True)
            raise
        if cache_dir is None:  # the folder lives as long as the module (it re-reads the IR to reshape)
            weakref.finalize(module, shutil.rmtree, str(base), True)
        got = module.execution_precision()
        info.notes.append(f"OpenVINO {ov_device_name()} inference precision {got}, "
                          f"{config.get('INFERENCE_NUM_THREADS', 'default')} threads"
                          + (f", tiles {module.tile_streams} at a time" if module.tile_streams > 1 else ""))
        if report is not None:
            info.agreement = float(report["agreement"])
            info.int8 = report
            kept = len(report.get("f32_layers", []))
            info.notes.append(
                f"int8: argmax agreement with f32 {report['agreement']:.4f} (mean Dice; voxels "
                f"{report['voxel_agreement']:.4f}) on {report['validation_patches']} validation patches, "
                f"{report['quantised_layers']} convolutions INT8, {kept} kept in f32"
                + ("" if report.get("meets_target") else
                   f"; BELOW the target {report['min_agreement']:g} even so"))
        return module

    def _compiled_module(self, network: nn.Module, input_shape: Tuple[int, ...], base: Path, precision: str,
                         info: EngineInfo, int8_data, int8_min_agreement: float, log_fn, blob_cache: bool = True
                         ) -> Tuple["OpenVINOModule", Optional[dict], dict]:
        """The IR (converted, or quantised, once into ``base``) compiled for ``precision``; the
        compiled blob is kept for the next process only where ``blob_cache``."""
        ir, key = self._f32_ir(network, input_shape, base, info)
        config = dict(self.config(precision))
        if blob_cache:
            config["CACHE_DIR"] = str(base / "openvino" / "compiled")
        report = None
        if precision == "int8":
            ir, report = self._int8_ir(ir, key, base, config, info, int8_data, int8_min_agreement, log_fn,
                                       network)
        try:
            module = OpenVINOModule(ir, input_shape, ov_device_name(), config,
                                    network_state_fingerprint(network),
                                    tile_streams(config.get("INFERENCE_NUM_THREADS", 1)))
        except RuntimeError as exc:
            raise EngineError(f"OpenVINO could not compile the network for {ov_device_name()} at "
                              f"{precision}: {' '.join(str(exc).split())[:200]}") from None
        return module, report, config

    def _int8_ir(self, f32_ir: Path, f32_key: str, base: Path, config: dict, info: EngineInfo,
                 data, min_agreement: float, log_fn, network: Optional[nn.Module] = None) -> Tuple[Path, dict]:
        """The cached INT8 IR and its report; quantised (NNCF, accuracy control) when missing."""
        from TuckerSegLib.engines import int8

        if data is None:
            raise EngineError("--precision int8 needs calibration data (prepare_network builds it)")
        folder = base / "openvino" / f"int8-{int8.int8_key(f32_key, data, min_agreement)}"
        report = int8.read_int8(folder)
        hit = report is not None
        if not hit:
            with _lock(folder):
                report = int8.read_int8(folder)
                if report is None:
                    if folder.exists():  # damaged entry: rebuilt
                        shutil.rmtree(folder, ignore_errors=True)
                    model, report = int8.quantise(f32_ir, data, min_agreement, config, ov_device_name(),
                                                  log_fn or log.info, network=network)
                    int8.save_int8(model, report, folder)
                else:
                    hit = True
        info.cache_hit = hit
        info.cache_path = str(folder)
        if hit:
            info.notes.append(f"int8 model from the cache ({folder.name}; quantised once)")
        return folder / "model.xml", report


def _lock(folder: Path):
    """A file lock beside ``folder``, so that concurrent runs convert or quantise once."""
    import contextlib

    try:
        from filelock import FileLock
    except ImportError:  # pragma: no cover - filelock is a dependency
        return contextlib.nullcontext()
    folder.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder) + ".lock")
