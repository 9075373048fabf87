"""``prepare_network``: the one call the pipeline makes to get the module that runs a network."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from TuckerSegLib.engines import agreement as agreement_mod
from TuckerSegLib.engines.base import (EngineInfo, example_input, normalise_device, patch_tuple,
                                       network_state_fingerprint, weights_fingerprint)
from TuckerSegLib.engines.select import (AUTO_ORDER, IMPLEMENTATIONS, describe_device, resolve_precision,
                                         select_engine, why_not)
from TuckerSegLib.engines.timing import best_seconds
from TuckerSegLib.errors import EngineError, TuckerSegError
from TuckerSegLib.progress import NullProgress, Progress
from TuckerSegLib.specs import RunSpec
from TuckerSegLib.storage import merge_json, read_json

if TYPE_CHECKING:
    from TuckerSegLib.engines.int8 import Int8Data

log = logging.getLogger(__name__)

def prepare_network(network: nn.Module, patch_size: Sequence[int], in_channels: int = 1,
                    device: Union[str, torch.device] = "cpu", run: RunSpec = RunSpec(layer_forms="as-is"),
                    cache_dir: Optional[Union[str, Path]] = None, check_agreement: bool = True,
                    measure_auto: bool = True,
                    progress: Optional[Progress] = None,
                    int8_data: Optional["Int8Data"] = None) -> Tuple[nn.Module, EngineInfo]:
    """The module that runs ``network`` for nnU-Net's sliding window, and what was chosen.

    ``run.engine``: auto|torch|openvino; ``run.precision``: auto|f32|bf16|fp16 (see ``select``);
    ``run.device`` is not used here: ``device`` is the torch device nnU-Net's predictor holds.
    ``cache_dir``: where compiled forms are kept (beside the compressed model); None = no cache.
    ``run.layer_forms``: "auto" lets measured per-layer timings pick each factorised layer's form
    (factorised, first 1x1 fused into the core, or dense) on this device; "as-is" keeps the network.
    Low-precision runs measure their argmax agreement with f32 once (cached) when
    ``check_agreement``. With ``engine="auto"`` and ``measure_auto``, every engine that can run
    the device at that precision is timed on one patch and the fastest is kept (the choice is
    cached per network, patch, device and precision). ``network`` itself is never modified.

    ``run.precision="int8"`` (OpenVINO, CPU with VNNI/AMX): the network is quantised with NNCF
    on ``int8_data`` (``engines.int8_data.model_int8_data`` for an nnU-Net model: phantoms and
    ``run.int8_calibration`` CTs; None = noise patches, for networks without plans), keeping
    layers in f32 until the agreement with f32 reaches ``run.int8_min_agreement``. The INT8 IR
    and its measured agreement are cached in ``cache_dir``; ``info.agreement`` is that agreement
    and ``info.int8`` the stored report. Layer forms (``run.layer_forms="auto"``) are chosen
    from f32 timings for INT8.
    """
    progress = progress or NullProgress()
    engine, precision = run.engine, run.precision
    device = normalise_device(device)
    prec = resolve_precision(precision, device)
    chosen, notes = select_engine(engine, device, prec)
    if precision == "auto" and prec != "f32":
        notes.append(f"precision auto = {prec} autocast, as stock nnU-Net/TotalSegmentator on {device.type}")
    patch = patch_tuple(patch_size)
    cache = Path(cache_dir) if cache_dir is not None else None
    network = network.eval()

    extra = {}
    if prec == "int8":
        if int8_data is None:
            from TuckerSegLib.engines.int8_data import random_int8_data
            int8_data = random_int8_data(patch, in_channels)
            notes.append("int8 calibrated on noise patches (no model plans given)")
        extra = {"int8_data": int8_data, "int8_min_agreement": run.int8_min_agreement,
                 "log_fn": progress.log}

    def build(eng) -> Tuple[nn.Module, EngineInfo]:
        info = EngineInfo(eng.name, prec, describe_device(device, eng.name), list(notes))
        net = network
        if run.layer_forms == "auto":
            from TuckerSegLib.engines.layer_form_choice import choose_layer_forms
            # INT8 layers cannot be timed one by one without calibrating each: f32 decides
            timed = "f32" if prec == "int8" else prec
            progress.stage("engine", f"timing layer forms for {eng.name} ({timed})")
            net, forms = choose_layer_forms(network, patch, in_channels, eng, device, timed, cache,
                                          progress=progress)
            info.layer_forms = forms
            changed = {k: v for k, v in forms.items() if v != "factorised"}
            if changed:
                info.notes.append("layer forms from measured timings: " + ", ".join(
                    f"{sum(v == f for v in changed.values())} {f}" for f in sorted(set(changed.values()))))
        progress.stage("engine", f"preparing {eng.name} engine ({prec})" +
                       (" (quantised once per model, calibration data and target; minutes)" if extra else ""))
        module = eng.prepare(net, patch, in_channels, device, prec, cache, info, **extra)
        if net is not network:  # the user's weights are what load_state_dict may be given
            module._source_fp = network_state_fingerprint(network)
        return module, info

    if engine == "auto" and measure_auto:
        viable = [n for n in AUTO_ORDER.get(device.type, ["torch"]) if not why_not(n, device, prec)]
        if len(viable) > 1:
            try:
                module, info = _fastest(build, viable, network, patch, in_channels, device, prec, cache,
                                        progress)
                return _finish(module, info, network, patch, in_channels, device, prec, cache,
                               check_agreement)
            except Exception as exc:  # a failing candidate: fall through to the static order
                log.warning("engine auto: timing the engines failed (%s); using the static order", exc)
                notes.append(f"engine timing failed ({type(exc).__name__}); static choice")

    try:
        module, info = build(chosen)
    except TuckerSegError:
        if engine != "auto" or chosen.name == "torch":
            raise
        module, info = _fallback(build, chosen.name, "failed")
    except Exception as exc:  # conversion/compilation failures of a third-party engine
        msg = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        if engine != "auto" or chosen.name == "torch":
            raise EngineError(f"engine {chosen.name} could not prepare the network ({msg})") from None
        module, info = _fallback(build, chosen.name, msg)

    return _finish(module, info, network, patch, in_channels, device, prec, cache, check_agreement)


def _finish(module, info, network, patch, in_channels, device, prec, cache, check_agreement):
    if prec not in ("f32", "int8") and check_agreement:  # int8 measured its own when quantised
        _measure_agreement(module, network, patch, in_channels, device, info, cache)
    log.info(info.summary())
    return module, info


def _fastest(build, viable, network, patch, in_channels, device, prec, cache, progress):
    """Build and time each viable engine on one patch; keep the fastest (choice cached)."""
    from TuckerSegLib.engines.base import available_threads

    store = cache / "engine_choice.json" if cache is not None else None
    key = (f"{prec}|{describe_device(device, 'torch')}|t{available_threads()}|{patch}|{in_channels}|"
           f"{weights_fingerprint(network)[:24]}")
    choices = read_json(store)
    if key in choices and choices[key].get("engine") in viable:
        module, info = build(IMPLEMENTATIONS[choices[key]["engine"]])
        info.notes.append("engine auto: " + choices[key]["why"] + " (cached)")
        return module, info
    x = example_input(patch, in_channels, seed=2).to(device)
    best = None
    timings = {}
    for name in viable:
        progress.stage("engine", f"timing the {name} engine on one patch")
        module, info = build(IMPLEMENTATIONS[name])
        with torch.inference_mode():
            # warm-up (first inference allocates), then one timed run
            first = best_seconds(lambda: module(x), device, reps=1)
            # clearly slower after one run: no need for a second
            seconds = first if best is not None and first > 1.5 * best[0] else min(first, best_seconds(
                lambda: module(x), device, reps=1))
        timings[name] = seconds
        if best is None or seconds < best[0]:
            best = (seconds, name, module, info)
        else:
            del module
    seconds, name, module, info = best
    why = f"{name} fastest here (" + ", ".join(f"{n} {t:.3g} s" for n, t in timings.items()) + " per patch)"
    info.notes.append("engine auto: " + why)
    merge_json(store, {key: {"engine": name, "why": why, "seconds": timings}})
    return module, info


def _fallback(build, failed: str, why: str):
    log.warning("engine auto: %s failed (%s); using torch", failed, why)
    module, info = build(IMPLEMENTATIONS["torch"])
    info.notes.append(f"{failed} failed ({why}); fell back to torch")
    return module, info


def _measure_agreement(module: nn.Module, network: nn.Module, patch, in_channels: int,
                       device: torch.device, info: EngineInfo, cache: Optional[Path]) -> None:
    """Argmax agreement of the low-precision module with f32 on a random patch (cached per model)."""
    store = cache / "engine_agreement.json" if cache is not None else None
    key = f"{info.name}|{info.precision}|{info.device}|{weights_fingerprint(network)[:24]}|{patch}"
    result = agreement_mod.cached(store, key)
    if result is None:
        reference_engine = IMPLEMENTATIONS[info.name]
        ref_info = EngineInfo(info.name, "f32", info.device)
        if info.name == "torch":
            from TuckerSegLib.engines.torch_engine import TorchEngineModule
            import copy
            reference = TorchEngineModule(copy.deepcopy(network).eval().to(device), "f32", device)
        else:
            reference = reference_engine.prepare(network, patch, in_channels, device, "f32", cache, ref_info)
        x = example_input(patch, in_channels, seed=1).to(device)
        with torch.inference_mode():
            result = agreement_mod.compare_logits(module(x), reference(x))
        del reference
        agreement_mod.store(store, key, result)
    info.agreement = result.argmax_agreement
    info.notes.append(f"{info.precision}: argmax agreement with f32 "
                      f"{100 * result.argmax_agreement:.3f} % on a random patch "
                      f"(max logit difference {result.max_abs_diff:.3g})")
