"""The engine interface: turn a PyTorch network into the module nnU-Net's sliding window runs.

Why: the segmentation pipeline swaps ``predictor.network`` for whatever an engine returns, so the
returned module must behave like the network where nnU-Net touches it: called on a
``(N, C, *patch)`` tensor it returns the logits as a float tensor on the input's device; ``.to()``,
``.eval()`` and ``load_state_dict`` work. Engine modules have their weights compiled in, so
``state_dict()`` is empty and ``load_state_dict`` accepts the empty dict (what the pipeline puts
into ``predictor.list_of_parameters``) or the very weights that were compiled in (checked by
fingerprint); anything else would silently run stale weights and is refused.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from TuckerSegLib.errors import EngineError
from TuckerSegLib.storage import merge_json, read_json



@dataclass
class EngineInfo:
    """Which engine runs a network, at what precision, on which device, and what to tell the user."""

    name: str
    precision: str
    device: str
    notes: List[str] = field(default_factory=list)
    cache_hit: bool = False  # the compiled form came from the cache (no conversion this time)
    cache_path: Optional[str] = None
    # argmax agreement with f32: bf16/fp16 voxels on a random patch; int8 mean Dice on the
    # validation patches, measured when quantised and stored with the INT8 model
    agreement: Optional[float] = None
    layer_forms: Optional[dict] = None  # per-layer form chosen by hardware-aware shaping
    int8: Optional[dict] = None  # int8: the stored report (engines.int8: agreement, layers in f32, data)

    def as_dict(self) -> dict:
        return {"name": self.name, "precision": self.precision, "device": self.device,
                "notes": list(self.notes), "cache_hit": self.cache_hit, "cache_path": self.cache_path,
                "agreement": self.agreement, "layer_forms": self.layer_forms, "int8": self.int8}

    def summary(self) -> str:
        text = f"engine {self.name} ({self.precision}) on {self.device}"
        return text + (": " + "; ".join(self.notes) if self.notes else "")


def weights_fingerprint(network: nn.Module) -> str:
    """A hash of the network's structure and every tensor of its state dict (names, shapes, bytes):
    ``sha256(repr(network) + state fingerprint)``."""
    return _fingerprints(network)[0]


def network_state_fingerprint(network: nn.Module) -> str:
    """``state_fingerprint(network.state_dict())``, from ``weights_fingerprint``'s pass."""
    return _fingerprints(network)[1]


# network -> (what its tensors are now, weights fingerprint, state fingerprint). Why: preparing an
# engine keys its files and checks by the weights several times; hashing a full-width 3 mm
# network's 66 MB took 0.3 s each, 0.9 s of a 2.1 s warm start.
_memo: "weakref.WeakKeyDictionary[nn.Module, Tuple[tuple, str, str]]" = weakref.WeakKeyDictionary()


def _fingerprints(network: nn.Module) -> Tuple[str, str]:
    """Both fingerprints of ``network``, hashed again only when its structure or a tensor changed
    (another tensor, or an in-place write, which bumps the tensor's version counter).

    The bytes are hashed once: the weights fingerprint hashes the structure with the state's
    digest (hashing them into two digests took 0.3 s a warm start for a full-width 3 mm network)."""
    structure = repr(network)
    now = _state_now(network, structure)
    known = _memo.get(network)
    if known is not None and known[0] == now:
        return known[1], known[2]
    bare = state_fingerprint(network.state_dict())
    fingerprints = _with_structure(structure, bare), bare
    _memo[network] = (now, *fingerprints)
    return fingerprints


FINGERPRINTS_FILE = "weights_fingerprints.json"  # in a model's cache folder


def fingerprints_from_file(network: nn.Module, identity: str, cache: Optional[Path]) -> None:
    """Let ``network``'s fingerprints come from ``cache`` where weights of the same ``identity``
    (a checkpoint's path, size and modification time) and structure were hashed before; else hash
    them now and keep them there. Call it right after loading the weights from that file.

    Why: an engine finds its compiled network by these fingerprints, and hashing the weights took
    0.2 s per full-width 1.5 mm network on 2 cores: 1 s of each warm ``total`` run."""
    structure = repr(network)
    key = hashlib.sha256(f"{identity}|{structure}".encode()).hexdigest()[:32]
    path = Path(cache) / FINGERPRINTS_FILE if cache is not None else None
    known = read_json(path).get(key) if path is not None else None
    if isinstance(known, list) and len(known) == 2 and all(isinstance(v, str) for v in known):
        _memo[network] = (_state_now(network, structure), known[0], known[1])
        return
    fingerprints = _fingerprints(network)
    if path is not None:
        try:
            merge_json(path, {key: list(fingerprints)})
        except OSError:  # a cache that cannot be written only means hashing again next time
            pass


def _state_now(network: nn.Module, structure: str) -> tuple:
    """What ``network``'s tensors are now (a write or a new tensor changes it)."""
    return (structure, tuple((name, t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device)
                             for name, t in network.state_dict().items()))


def _with_structure(structure: str, state_fp: str) -> str:
    return hashlib.sha256(structure.encode() + b"\0" + state_fp.encode()).hexdigest()


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """A hash of a bare state dict (names, shapes, dtypes and bytes in logical order, whatever the
    memory layout), for ``load_state_dict`` checks."""
    h = hashlib.sha256()
    for name, tensor in state.items():
        # flat copy in logical order: a channels-last weight hashes like its standard twin
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{tuple(tensor.shape)}:{t.dtype}".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # the buffer itself, no bytes copy
    return h.hexdigest()


def available_threads() -> int:
    """CPU cores this process may use (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


class EngineModule(nn.Module):
    """Base of every engine's module: weights compiled in, nnU-Net-compatible state handling."""

    def __init__(self, source_state_fingerprint: str):
        super().__init__()
        self._source_fp = source_state_fingerprint
        self._borrow_outputs = False  # see borrowed_outputs

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                        assign: bool = False):
        """Accept ``{}`` (the pipeline's parameters) or the weights compiled in; refuse others."""
        if len(state_dict) == 0:
            return nn.modules.module._IncompatibleKeys([], [])
        if state_fingerprint(state_dict) == self._source_fp:
            return nn.modules.module._IncompatibleKeys([], [])
        raise EngineError("this engine's network has its weights compiled in and cannot load other "
                          "weights; prepare the engine again from the network with those weights")

    def state_dict(self, *args, **kwargs):  # the weights live inside the engine
        return {}

    @contextlib.contextmanager
    def borrowed_outputs(self) -> Iterator[None]:
        """Within: ``forward`` may return a tensor over the engine's own output memory, valid only
        until the next call. Why: copying the logits of a tile (118 classes of a 3 mm patch: 760
        MB) costs 0.15 s on 2 cores; the sliding window consumes each tile's output before it
        asks for the next. Engines without such memory ignore it."""
        previous, self._borrow_outputs = self._borrow_outputs, True
        try:
            yield
        finally:
            self._borrow_outputs = previous

    def map_tiles(self, tiles: Iterable[torch.Tensor], count: int) -> Iterator[torch.Tensor]:
        """The outputs of ``count`` tiles, in their order; the same as calling the module on each
        (an engine may keep several in flight: ``OpenVINOModule``)."""
        for tile in tiles:
            yield self(tile)


def predict_tiles(network: nn.Module, tiles: Iterable[torch.Tensor], count: int) -> Iterator[torch.Tensor]:
    """``network``'s output for each of ``count`` tiles, in order: through the engine's
    ``map_tiles`` where it has one, else one call per tile. Under ``borrowed_outputs`` an output
    is valid until the next one is asked for."""
    mapper = getattr(network, "map_tiles", None)
    if mapper is not None:
        return mapper(tiles, count)
    return (network(tile) for tile in tiles)


class Engine(ABC):
    """One way to run a network. Subclasses say when they can run and build the module."""

    name: str = ""

    @abstractmethod
    def unavailable_reason(self) -> Optional[str]:
        """None when the engine is installed and usable here, else a one-line reason."""

    @abstractmethod
    def unsupported_reason(self, device: torch.device, precision: str) -> Optional[str]:
        """None when this engine can run on ``device`` at ``precision``, else a one-line reason."""

    @abstractmethod
    def prepare(self, network: nn.Module, patch_size: Sequence[int], in_channels: int,
                device: torch.device, precision: str, cache_dir: Optional[Path],
                info: EngineInfo) -> nn.Module:
        """The module that runs ``network`` (eval mode) on ``device`` at ``precision``.

        Records cache hits and notes in ``info``. ``network`` is not modified.
        """


def example_input(patch_size: Sequence[int], in_channels: int, seed: int = 0,
                  batch: int = 1) -> torch.Tensor:
    """A reproducible random patch, the shape nnU-Net's sliding window feeds the network."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, in_channels, *[int(p) for p in patch_size], generator=g)


def normalise_device(device) -> torch.device:
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def patch_tuple(patch_size: Sequence[int]) -> Tuple[int, ...]:
    return tuple(int(p) for p in patch_size)
