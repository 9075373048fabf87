"""INT8 on CPU: post-training quantisation of the OpenVINO IR with NNCF, under accuracy control.

Why: INT8 convolutions on CPUs with VNNI or AMX run a 3 mm TotalSegmentator network about 2.4x
faster than OpenVINO f32, but plain post-training INT8 of a trained network changed 12 % of its
voxels (``NOTES.md`` section 7). So quantisation here is NNCF's
``quantize_with_accuracy_control``: the metric is the argmax agreement with f32 (mean Dice over
the classes f32 finds, pooled over the validation patches), and layers are reverted to f32, the
most harmful first, until the agreement reaches the target (``RunSpec.int8_min_agreement``). The
first convolution and the segmentation head are never quantised (``ignored_scope``). Weights are
per-channel (NNCF's default for convolutions), activations per-tensor (mixed preset), with full
bias correction. Before quantising, each activation's channel ranges are evened out by moving half
of their spread (SmoothQuant, alpha 0.5) into the weights that read them, folded into the norms
(``network.channel_scaling``; the same f32 output): on a trained full-width 3 mm network, plain
INT8's agreement with f32 rose from 0.844 to 0.896 on 4 unseen CT tiles and from 0.570 to 0.595 on
the held-out one (alpha 0.3: 0.809 and 0.601; 1.0: 0.476 on the held-out tile;
``benchmarks/results/experiment_int8_recipes_w32cpu_smoothing_*.json``).

Quantising costs minutes, so the INT8 IR is cached per network, data and target
(``<cache>/openvino/int8-<key>/model.xml``) with ``int8.json``: the agreement measured on the
validation data, the layers kept in f32 and what the calibration and validation data were. A
warm start reads both and quantises nothing.

The data (``Int8Data``) comes from ``engines.int8_data``: phantom CT patches preprocessed like
nnU-Net's predictor, plus the user's CTs where given.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from TuckerSegLib.errors import EngineError

log = logging.getLogger(__name__)

# Bump when the recipe changes (ignored scope, preset, metric): old INT8 caches are not reused.
RECIPE = "int8-v2"
# CPU features that make INT8 convolutions fast (x86 flags in /proc/cpuinfo).
INT8_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# Reverting layers stops after this many steps (each costs one validation pass).
MAX_REVERT_STEPS = 16
# At or below this target there is nothing to control: plain ``nncf.quantize`` (the quality
# target's INT8 candidates, which it validates on its own data). Why: NNCF's accuracy control
# validates f32 and INT8 before it can decide that nothing needs reverting: the full-width 3 mm
# network took 170 s to quantise that way and 139 s plain on 2 cores (the same INT8 model).
PLAIN_AT_OR_BELOW = 0.01
# SmoothQuant's migration strength, folded into the network before quantising
# (``network.channel_scaling``); None quantises the network as it is.
SMOOTHING_ALPHA: Optional[float] = 0.5


@dataclass
class Int8Data:
    """Calibration and validation patches for INT8, built on first use.

    ``calibration()`` and ``validation()`` return lists of ``(C, *patch)`` float tensors in the
    network's input space. ``identity`` enters the cache key (same data, same INT8 model);
    ``description`` is stored in ``int8.json``; ``sources`` are the CT files used (never the CT
    being evaluated in a benchmark).
    """

    calibration: Callable[[], List[torch.Tensor]]
    validation: Callable[[], List[torch.Tensor]]
    identity: str
    description: dict = field(default_factory=dict)
    sources: Tuple[str, ...] = ()


def cpu_int8_flags() -> Optional[List[str]]:
    """The INT8 features of this CPU from /proc/cpuinfo; None where that cannot be read."""
    from TuckerSegLib.devices import cpu_flags

    flags = cpu_flags()
    return None if flags is None else [f for f in INT8_CPU_FLAGS if f in flags]


def int8_support_reason() -> Optional[str]:
    """None when this CPU runs INT8 convolutions fast (VNNI or AMX), else a one-line reason.

    Linux x86: the CPU flags. Elsewhere: OpenVINO's ``OPTIMIZATION_CAPABILITIES`` must list INT8.
    Tests monkeypatch this function to simulate a CPU without INT8.
    """
    flags = cpu_int8_flags()
    if flags is None or platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        try:
            from TuckerSegLib.engines.openvino_engine import core, ov_device_name
            caps = [str(c).upper() for c in core().get_property(ov_device_name(), "OPTIMIZATION_CAPABILITIES")]
        except Exception:
            caps = []
        if "INT8" in caps:
            return None
        return "--precision int8 needs a CPU with INT8 support (OpenVINO lists none here); use --precision f32"
    if flags:
        return None
    return ("--precision int8 needs a CPU with VNNI or AMX (avx512_vnni, avx_vnni or amx_int8), which this "
            "CPU lacks; use --precision f32 or bf16")


def nncf_version() -> Optional[str]:
    try:
        import nncf
        return nncf.__version__
    except ImportError:
        return None


# -- the metric --------------------------------------------------------------------------------
def dice_counts(labels: np.ndarray, reference: np.ndarray) -> Dict[int, Tuple[int, int]]:
    """Per class of the reference: (2 * |A and B|, |A| + |B|)."""
    counts = {}
    for c in np.unique(reference).tolist():
        a, b = labels == c, reference == c
        counts[int(c)] = (2 * int(np.count_nonzero(a & b)), int(np.count_nonzero(a)) + int(np.count_nonzero(b)))
    return counts


def mean_dice(counts: Sequence[Dict[int, Tuple[int, int]]]) -> float:
    """Mean Dice over the classes the reference finds, intersections and sizes pooled over patches."""
    pooled: Dict[int, List[int]] = {}
    for per_patch in counts:
        for c, (inter, total) in per_patch.items():
            acc = pooled.setdefault(c, [0, 0])
            acc[0] += inter
            acc[1] += total
    if not pooled:
        return 1.0
    return float(np.mean([inter / max(1, total) for inter, total in pooled.values()]))


@dataclass
class AgreementReport:
    dice: float  # mean Dice of the argmax against f32's, over the classes f32 finds (pooled)
    voxels: float  # fraction of voxels with the same argmax class
    per_patch: List[float]

    def as_dict(self) -> dict:
        return {"dice": self.dice, "voxels": self.voxels, "per_patch": list(self.per_patch)}


class Reference:
    """f32's argmax on the validation patches, and the agreement of another model with it."""

    def __init__(self, f32_model, patches: Sequence[torch.Tensor]):
        self.patches = [np.ascontiguousarray(p.numpy()[None], dtype=np.float32) for p in patches]
        self.labels = [_argmax(f32_model(x)) for x in self.patches]

    def measure(self, compiled, indices: Optional[Sequence[int]] = None) -> AgreementReport:
        indices = list(range(len(self.patches))) if indices is None else list(indices)
        counts, same, total, per = [], 0, 0, []
        for i in indices:
            lab = _argmax(compiled(self.patches[i]))
            c = dice_counts(lab, self.labels[i])
            counts.append(c)
            per.append(mean_dice([c]))
            same += int(np.count_nonzero(lab == self.labels[i]))
            total += lab.size
        return AgreementReport(mean_dice(counts), same / max(1, total), per)


def _argmax(result) -> np.ndarray:
    out = result[0] if not isinstance(result, np.ndarray) else result
    return np.asarray(out).argmax(1).astype(np.int16)


# -- which layers stay in f32 ------------------------------------------------------------------
def sensitive_layers(model) -> List[str]:
    """Names of the first convolution and of the convolutions that produce the outputs (heads)."""
    convs = [op for op in model.get_ordered_ops() if op.get_type_name() in ("Convolution", "GroupConvolution")]
    names = [convs[0].get_friendly_name()] if convs else []
    for result in model.get_results():
        node = result.input(0).get_source_output().get_node()
        for _ in range(8):  # through the bias Add, converts, reshapes
            if node.get_type_name() in ("Convolution", "GroupConvolution"):
                names.append(node.get_friendly_name())
                break
            if node.get_input_size() == 0:
                break
            node = node.input(0).get_source_output().get_node()
    return list(dict.fromkeys(names))


def quantised_layers(model) -> Tuple[List[str], List[str]]:
    """(convolutions with INT8 weights, convolutions left in floating point) of an NNCF model."""
    q, f = [], []
    for op in model.get_ordered_ops():
        if op.get_type_name() not in ("Convolution", "GroupConvolution", "ConvolutionBackpropData"):
            continue
        (q if _int8_weights(op.input(1).get_source_output().get_node()) else f).append(op.get_friendly_name())
    return q, f


def _int8_weights(node, depth: int = 5) -> bool:
    """Weights through a FakeQuantize, or stored as 8-bit constants (dequantised by Convert/Multiply)."""
    for _ in range(depth):
        kind = node.get_type_name()
        if kind == "FakeQuantize":
            return True
        if kind == "Constant":
            return str(node.get_output_element_type(0)) in ("i8", "u8", "<Type: 'int8_t'>", "<Type: 'uint8_t'>") \
                or node.get_output_element_type(0).get_type_name() in ("i8", "u8")
        if node.get_input_size() == 0:
            return False
        node = node.input(0).get_source_output().get_node()
    return False


def _short(name: str) -> str:
    """'__module.decoder.seg_layers.2/aten::_convolution/Convolution' -> 'decoder.seg_layers.2'."""
    head = name.split("/")[0]
    return head[len("__module."):] if head.startswith("__module.") else head


# -- quantisation ------------------------------------------------------------------------------
def int8_key(f32_key: str, data: Int8Data, min_agreement: float) -> str:
    h = hashlib.sha256()
    for part in (RECIPE, f32_key, data.identity, f"{min_agreement:.6f}", nncf_version() or "", str(MAX_REVERT_STEPS),
                 str(SMOOTHING_ALPHA)):
        h.update(part.encode())
        h.update(b"|")
    return h.hexdigest()[:24]


def smoothed_model(network, input_shape: Sequence[int], calibration: Sequence[torch.Tensor],
                   alpha: float = SMOOTHING_ALPHA):
    """The OpenVINO model of a copy of ``network`` whose activation ranges were moved into its
    weights (``network.channel_scaling``; the same output in f32), and what was done."""
    import copy

    from TuckerSegLib.engines.openvino_engine import convert_static
    from TuckerSegLib.network.channel_scaling import smooth_activations

    net = copy.deepcopy(network).float().cpu().eval()
    report = smooth_activations(net, [p[None].float() for p in calibration], alpha)
    return convert_static(net, input_shape), report


def quantise(f32_ir: Path, data: Int8Data, min_agreement: float, config: dict, device: str,
             log_fn: Callable[[str], None] = log.info, network=None):
    """NNCF INT8 of the f32 IR under accuracy control; returns ``(ov.Model, report dict)``.

    With ``network`` (the torch network the IR was converted from), its activations are smoothed
    first (``smoothed_model``); the agreement is still measured against the f32 IR."""
    try:
        import nncf
        from nncf.quantization.advanced_parameters import (AdvancedAccuracyRestorerParameters,
                                                           AdvancedQuantizationParameters)
    except ImportError as exc:
        raise EngineError(f"--precision int8 needs NNCF (pip install nncf): {exc}") from None
    from TuckerSegLib.engines.openvino_engine import core

    t0 = time.perf_counter()
    model = core().read_model(str(f32_ir))
    calibration = data.calibration()
    validation = data.validation()
    if not calibration or not validation:
        raise EngineError("INT8 needs calibration and validation patches; none could be made")
    f32 = core().compile_model(model, device, config)
    reference = Reference(f32, validation)
    del f32
    t_ref = time.perf_counter() - t0

    def validate(compiled, items) -> Tuple[float, List[float]]:
        """NNCF's metric: agreement with f32 on these validation items (higher is better)."""
        indices = [int(i) for i, _ in items]
        rep = reference.measure(compiled, indices)
        return rep.dice, rep.per_patch

    smoothing = None
    if network is not None and SMOOTHING_ALPHA is not None:
        model, smoothing = smoothed_model(network, tuple(model.inputs[0].get_partial_shape().to_shape()),
                                          calibration)
    ignored = sensitive_layers(model)
    cal_set = nncf.Dataset([p.numpy()[None].astype(np.float32) for p in calibration])
    val_set = nncf.Dataset(list(enumerate(validation)), lambda item: item[1].numpy()[None].astype(np.float32))
    controlled = float(min_agreement) > PLAIN_AT_OR_BELOW
    log_fn(f"INT8: quantising with NNCF {nncf.__version__} on {len(calibration)} calibration and "
           f"{len(validation)} validation patches ("
           + (f"target agreement {min_agreement:g}" if controlled else "plain INT8, no accuracy control")
           + "; first convolution and head kept in f32)")
    recipe = dict(preset=nncf.QuantizationPreset.MIXED, target_device=nncf.TargetDevice.CPU,
                  subset_size=len(calibration), fast_bias_correction=False,
                  ignored_scope=nncf.IgnoredScope(names=ignored, validate=False))
    # NNCF's progress bars and log go to stderr: stdout may carry JSON events
    with contextlib.redirect_stdout(sys.stderr):
        if not controlled:
            quantised = nncf.quantize(model, cal_set, **recipe,
                                      advanced_parameters=AdvancedQuantizationParameters())
        else:
            quantised = nncf.quantize_with_accuracy_control(
                model, cal_set, val_set, validate,
                max_drop=max(0.0, 1.0 - float(min_agreement)), drop_type=nncf.DropType.ABSOLUTE, **recipe,
                advanced_quantization_parameters=AdvancedQuantizationParameters(),
                advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                    max_num_iterations=MAX_REVERT_STEPS, ranking_subset_size=min(2, len(validation)),
                    num_ranking_workers=1))
    q, f = quantised_layers(quantised)
    final = reference.measure(core().compile_model(quantised, device, config))
    seconds = time.perf_counter() - t0
    report = {
        "recipe": RECIPE, "agreement": final.dice, "voxel_agreement": final.voxels,
        "per_patch": final.per_patch, "min_agreement": float(min_agreement),
        "meets_target": final.dice >= float(min_agreement),
        "metric": "mean Dice of the argmax against f32's, over the classes f32 finds, pooled over "
                  "the validation patches",
        "quantised_layers": len(q), "f32_layers": [_short(n) for n in f],
        "ignored_scope": [_short(n) for n in ignored],
        "calibration": data.description.get("calibration"), "validation": data.description.get("validation"),
        "sources": list(data.sources), "calibration_patches": len(calibration),
        "validation_patches": len(validation), "seconds": seconds, "reference_seconds": t_ref,
        "accuracy_control": controlled,
        "nncf": nncf.__version__, "openvino": _ov_version(), "preset": "mixed",
        "weights": "per-channel symmetric", "bias_correction": "full", "smoothing": smoothing,
    }
    log_fn(f"INT8: agreement with f32 {final.dice:.4f} (voxels {final.voxels:.4f}), {len(q)} convolutions "
           f"INT8, {len(f)} f32, {seconds:.0f} s")
    return quantised, report


def _ov_version() -> str:
    import openvino
    return openvino.__version__


def save_int8(model, report: dict, folder: Path) -> None:
    """Write ``model.xml/.bin`` and ``int8.json`` into ``folder`` atomically."""
    from TuckerSegLib.engines.openvino_engine import save_ir

    save_ir(model, folder, "int8.json", report)


def read_int8(folder: Path) -> Optional[dict]:
    """The stored report of a complete INT8 cache entry, else None (it is rebuilt)."""
    try:
        if not ((folder / "model.xml").is_file() and (folder / "model.bin").is_file()):
            return None
        report = json.loads((folder / "int8.json").read_text())
        return report if isinstance(report, dict) and "agreement" in report else None
    except (OSError, ValueError):
        return None


def cached_report(network, patch_size: Sequence[int], in_channels: int, cache_dir: Path, data: Int8Data,
                  min_agreement: float) -> Optional[dict]:
    """The stored INT8 report of ``network`` for this data and target, without converting or
    quantising anything; None when it has not been quantised yet (e.g. for a chooser that ranks
    configurations by measured speed and agreement)."""
    from TuckerSegLib.engines.openvino_engine import ir_key

    shape = (1, int(in_channels), *[int(p) for p in patch_size])
    folder = Path(cache_dir) / "openvino" / f"int8-{int8_key(ir_key(network, shape), data, min_agreement)}"
    return read_int8(folder)
