"""What a user asks for, checked once where it enters.

Why: the command line, the Python API, finetune, batch and the Slicer module all take the same
options. Each front end builds a ``CompressionSpec`` (which network to run) and a ``RunSpec`` (how
to run it); the constructors validate every field and raise ``InputError`` with a one-line
message, so the layers below take the specs as given and check nothing again. Every list of
choices is defined here, once. This module imports neither torch nor nnU-Net: the Slicer panel
reads it on the GUI thread.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import Optional, Sequence, Tuple, Union

from TuckerSegLib.errors import InputError

# How ranks are chosen below ratio 1.0 (``compression.ranks``).
POLICIES: Tuple[str, ...] = ("budget", "uniform", "energy", "paper")
# How a kernel is factorised (``compression.tucker``).
METHODS: Tuple[str, ...] = ("hosvd", "hooi")
# Inference engines (``engines``); "auto" times those that run the device and keeps the fastest.
ENGINES: Tuple[str, ...] = ("auto", "torch", "openvino")
# Numeric precisions an engine may run at; "auto" is what stock TotalSegmentator uses. "int8" is
# post-training INT8 (OpenVINO + NNCF, CPU with VNNI or AMX), with accuracy control.
PRECISIONS: Tuple[str, ...] = ("f32", "bf16", "fp16", "int8")
PRECISION_CHOICES: Tuple[str, ...] = ("auto",) + PRECISIONS
# Layer forms (``engines.layer_forms``): "auto" runs each factorised layer in its fastest measured
# equivalent form, "as-is" runs the network as factorised.
LAYER_FORMS: Tuple[str, ...] = ("auto", "as-is")
# Devices, as TotalSegmentator names them ("gpu:N" and "cuda[:N]" are accepted as well).
DEVICES: Tuple[str, ...] = ("auto", "cpu", "gpu", "mps")
# TotalSegmentator's resolution modes for the ``total`` task: default 1.5 mm, fast 3 mm, fastest 6 mm.
MODES: Tuple[str, ...] = ("default", "fast", "fastest")

# Ranks are rounded to multiples of this for fast kernels (uniform, energy, budget).
RANK_MULTIPLE = 8
# The quality target users get unless they ask otherwise: mean Dice of the compressed network's
# argmax against the original's, on the validation data (``pipeline.quality_target``).
DEFAULT_MIN_AGREEMENT = 0.95
# When a quality target's curve is not measured yet on this machine (``pipeline.background_search``):
# "now" measures it before the run (minutes, once per model); "background" runs the original network
# now (stock's output) and measures the curve in a detached low-priority process for later runs.
SEARCH_MODES: Tuple[str, ...] = ("now", "background")
# INT8: layers are kept in f32 until the argmax agreement (mean Dice) with f32 on the validation
# data reaches this (``--int8-min-agreement``).
INT8_MIN_AGREEMENT = 0.99


def check_ratio(ratio: float) -> float:
    """A compression ratio: a float in (0, 1], where 1.0 means the original network."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise InputError(f"ratio must be a number in (0, 1], got {ratio!r}") from None
    if not (0.0 < value <= 1.0):
        raise InputError(f"ratio must be in (0, 1] (1.0 = original network), got {value:g}")
    return value


def check_agreement(value: float, what: str = "minimum agreement") -> float:
    """An agreement target: a mean Dice of argmax labels in (0, 1] (1.0 = the same labels)."""
    try:
        a = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number in (0, 1], got {value!r}") from None
    if not (0.0 < a <= 1.0):
        raise InputError(f"{what} must be in (0, 1] (mean Dice with the reference labels), got {a:g}")
    return a


def _check_choice(what: str, value: str, choices: Tuple[str, ...]) -> str:
    if value not in choices:
        raise InputError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
    return value


def check_device(device: Optional[str]) -> str:
    """A device name: auto, cpu, gpu, gpu:N, cuda, cuda:N or mps (lower-cased; cuda -> gpu)."""
    d = (device or "auto").strip().lower()
    if d.startswith("cuda"):
        d = "gpu" + d[4:]
    if d in DEVICES or (d.startswith("gpu:") and d[4:].isdigit()):
        return d
    raise InputError(f"unknown device {device!r}; use auto, cpu, gpu, gpu:N (or cuda:N) or mps")


@dataclass(frozen=True)
class CompressionSpec:
    """Which network to run: ``ratio`` of the original's cost under ``policy``, or, with
    ``min_agreement``, the cheapest network whose validated agreement with the original is at
    least that (``ratio`` is then not used).

    ``ratio`` 1.0 is the original network, untouched. ``rank_min`` is the ``uniform`` and
    ``paper`` policies' rank floor (None: the policy's own). ``validate_on``: the user's CTs that
    the agreement is measured on, besides the built-in phantoms. ``refine`` False skips the
    ``budget`` policy's refinement rounds (quality targets validate each candidate themselves).
    ``search``: with ``min_agreement``, what a run does when the model's quality curve is not
    measured yet (``SEARCH_MODES``); it does not change which network a measured curve chooses.
    """

    ratio: float = 0.5
    policy: str = "budget"
    method: str = "hosvd"
    rank_multiple: int = RANK_MULTIPLE
    rank_min: Optional[int] = None
    min_agreement: Optional[float] = None
    validate_on: Tuple[str, ...] = ()
    refine: bool = True  # budget: closed-loop refinement on probe and phantom volumes (small models)
    search: str = "now"

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratio", check_ratio(self.ratio))
        if self.min_agreement is not None:
            object.__setattr__(self, "min_agreement", check_agreement(self.min_agreement))
        object.__setattr__(self, "validate_on", tuple(str(p) for p in self.validate_on))
        for path in self.validate_on:
            if not os.path.exists(path):
                raise InputError(f"validation CT not found: {path}")
        _check_choice("policy", self.policy, POLICIES)
        _check_choice("quality search", self.search, SEARCH_MODES)
        _check_choice("method", self.method, METHODS)
        if int(self.rank_multiple) < 1:
            raise InputError(f"rank multiple must be at least 1, got {self.rank_multiple}")
        object.__setattr__(self, "rank_multiple", int(self.rank_multiple))
        if self.rank_min is not None:
            if int(self.rank_min) < 0:
                raise InputError(f"rank minimum must be at least 0, got {self.rank_min}")
            object.__setattr__(self, "rank_min", int(self.rank_min))

    @property
    def is_original(self) -> bool:
        """True when no layer is compressed (ratio 1.0, no quality target)."""
        return self.ratio >= 1.0 and self.min_agreement is None

    @property
    def is_target(self) -> bool:
        """True when the network is chosen by ``min_agreement``."""
        return self.min_agreement is not None

    def with_ratio(self, ratio: float) -> "CompressionSpec":
        return replace(self, ratio=ratio)

    def concrete(self, ratio: float) -> "CompressionSpec":
        """The fixed-ratio spec a quality target measures or chose at ``ratio`` (1.0: the
        original): no target, no validation CTs, and no ``budget`` refinement (the target
        validates each candidate itself)."""
        return replace(self, ratio=ratio, min_agreement=None, validate_on=(), refine=False)

    def as_dict(self) -> dict:
        return asdict(self)


def compression_spec(ratio: Optional[float] = None, min_agreement: Optional[float] = None,
                     policy: str = "budget", validate_on: Sequence[Union[str, os.PathLike]] = (),
                     quality_search: str = "now") -> CompressionSpec:
    """The spec of ``--ratio`` or ``--min-agreement`` (one of them; neither: the default target
    ``DEFAULT_MIN_AGREEMENT``, which the command line, the Python API, ``pipeline.segment``, batch
    and the Slicer module all run); ``quality_search``: what a target does before its curve is
    measured (``SEARCH_MODES``)."""
    if ratio is not None and min_agreement is not None:
        raise InputError("give either a ratio or a minimum agreement, not both")
    if ratio is None and min_agreement is None:
        min_agreement = DEFAULT_MIN_AGREEMENT
    return CompressionSpec(ratio=1.0 if ratio is None else ratio, policy=policy, min_agreement=min_agreement,
                           validate_on=tuple(str(p) for p in validate_on), search=quality_search)


@dataclass(frozen=True)
class RunSpec:
    """How to run a network: engine, precision, layer forms and device (see ``engines``).

    ``int8_min_agreement``: with ``precision="int8"``, layers are kept in f32 until the INT8
    network's argmax agreement with f32 (mean Dice over the classes f32 finds) on the validation
    data reaches it. ``int8_calibration``: the user's CTs (NIfTI paths) added to the built-in
    phantoms as calibration and validation data for INT8.
    """

    engine: str = "auto"
    precision: str = "auto"
    layer_forms: str = "auto"
    device: str = "auto"
    int8_min_agreement: float = INT8_MIN_AGREEMENT
    int8_calibration: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "engine", _check_choice("engine", self.engine or "auto", ENGINES))
        object.__setattr__(self, "precision",
                           _check_choice("precision", self.precision or "auto", PRECISION_CHOICES))
        object.__setattr__(self, "layer_forms",
                           _check_choice("layer forms", self.layer_forms or "auto", LAYER_FORMS))
        object.__setattr__(self, "device", check_device(self.device))
        object.__setattr__(self, "int8_min_agreement", check_agreement(self.int8_min_agreement))
        cts = self.int8_calibration or ()
        if isinstance(cts, (str, bytes)) or not all(isinstance(c, str) or hasattr(c, "__fspath__") for c in cts):
            raise InputError("int8 calibration CTs must be a list of file paths")
        object.__setattr__(self, "int8_calibration", tuple(str(c) for c in cts))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["int8_calibration"] = list(self.int8_calibration)
        return d


def check_mode(fast: bool = False, fastest: bool = False) -> str:
    """TotalSegmentator's resolution mode from its two flags."""
    if fast and fastest:
        raise InputError("use either fast or fastest, not both")
    return "fast" if fast else ("fastest" if fastest else "default")
