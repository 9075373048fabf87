"""Choosing layer forms: per factorised layer, run the equivalent form that is fastest on this device.

Why: a factorised layer is not always faster than the dense one it replaces (PyTorch's slow
conv3d path on CPU, tensor-core alignment on GPU, memory passes of thin 1x1 convs), so a
compression ratio could end up slower than the original network. Each ``TuckerConv`` is timed
with the engine that will run it, at its real input shape, in four equivalent forms
(made by ``layer_forms``: factorised, ranks zero-padded to the vector width, first 1x1 fused into the
core, dense); the fastest is used, the
factorised form unless another is at least ``MARGIN`` faster. Timings are cached per device,
engine, precision and layer signature in ``layer_timings.json``, so each shape is timed once;
the forms chosen for a whole network are kept beside them (``layer_form_choices.json``), so a
warm start rebuilds only the layers whose form changes, without tracing or timing.
"""
from __future__ import annotations

import copy
import hashlib
import math
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from TuckerSegLib.engines.base import Engine, available_threads
from TuckerSegLib.engines.layer_forms import FORMS, PAD_MULTIPLE, make_form
from TuckerSegLib.engines.select import describe_device
from TuckerSegLib.network.cost import trace
from TuckerSegLib.network.surgery import find_sites, replace_site
from TuckerSegLib.network.tucker_conv import TuckerConv
from TuckerSegLib.engines.timing import best_seconds
from TuckerSegLib.progress import NullProgress, Progress
from TuckerSegLib.storage import cache_root, merge_json, read_json

MARGIN = 0.05  # another form must be this much faster than the factorised one to replace it
# What a network's first run may spend timing layer forms, per engine. Layers are timed from the
# most MACs down; those left (the smallest) run factorised, the form they were built in. The forms
# are remembered either way, so later runs neither trace nor time (a timing left out stays out:
# spreading it over later runs made each of them pay up to this budget again).
MEASURE_BUDGET_SECONDS = 30.0
TIMINGS_FILE = "layer_timings.json"
CHOICES_FILE = "layer_form_choices.json"


def timings_path(cache_dir: Optional[Path]) -> Path:
    return (Path(cache_dir) if cache_dir is not None else cache_root()) / TIMINGS_FILE


def timing_key(engine: str, precision: str, device: str, module: nn.Module,
               input_shape: Sequence[int]) -> str:
    """Device, engine, precision, threads and the layer's exact signature (structure + input shape)."""
    sig = hashlib.sha1(f"{module!r}|{tuple(input_shape)}".encode()).hexdigest()[:16]
    return f"{engine}|{precision}|{device}|t{available_threads()}|{sig}"


def _time_torch(module: nn.Module, x: torch.Tensor, device: torch.device, precision: str,
                reps: int) -> float:
    from TuckerSegLib.engines.torch_engine import TorchEngineModule

    runner = TorchEngineModule(copy.deepcopy(module).to(device), precision, device)
    x = x.to(device)
    with torch.inference_mode():
        return best_seconds(lambda: runner(x), device, reps)


def _time_openvino(module: nn.Module, x: torch.Tensor, precision: str, reps: int) -> float:
    from TuckerSegLib.engines.openvino_engine import OpenVINOEngine, convert_static, core, ov_device_name

    model = convert_static(module, x.shape)
    compiled = core().compile_model(model, ov_device_name(), OpenVINOEngine().config(precision))
    request = compiled.create_infer_request()
    arr = x.numpy()
    return best_seconds(lambda: request.infer({0: arr}), None, reps)


def time_layer(engine: Engine, module: nn.Module, input_shape: Sequence[int], device: torch.device,
               precision: str, reps: int = 3) -> float:
    """Best-of-``reps`` seconds of one forward of ``module`` on ``engine`` at ``input_shape``."""
    x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
    if engine.name == "openvino":
        return _time_openvino(module, x, precision, reps)
    return _time_torch(module, x, device, precision, reps)


def choose_layer_forms(network: nn.Module, patch_size: Sequence[int], in_channels: int, engine: Engine,
                     device: torch.device, precision: str, cache_dir: Optional[Path],
                     device_name: Optional[str] = None, reps: int = 3,
                     progress: Optional[Progress] = None,
                     budget_seconds: float = MEASURE_BUDGET_SECONDS) -> Tuple[nn.Module, Dict[str, str]]:
    """A copy of ``network`` with each ``TuckerConv`` in its fastest measured form, and the forms.

    A network without factorised layers is returned as is (``{}``). Timing stops once it has
    taken ``budget_seconds`` (at least one layer is timed); untimed layers stay factorised.
    Layers already timed (any network, same signature) cost nothing.
    """
    progress = progress or NullProgress()
    sites = [s for s in find_sites(network, include_factorised=True) if isinstance(s.module, TuckerConv)]
    if not sites:
        return network, {}
    device_name = device_name or describe_device(device, engine.name)
    multiple = PAD_MULTIPLE.get(device.type, 8)
    path = timings_path(cache_dir)
    choices_path = path.with_name(CHOICES_FILE)
    # the forms depend on the structure and shapes only (timings are never overwritten): a
    # network seen before on this device gets the same forms without tracing or timing
    net_key = timing_key(engine.name, precision, device_name, network, (in_channels, *patch_size))
    forms = read_json(choices_path).get(net_key)
    if not (isinstance(forms, dict) and set(forms) == {s.name for s in sites}):
        forms, complete = _measure_forms(network, sites, in_channels, patch_size, engine, device, precision,
                                         device_name, multiple, path, reps, progress, budget_seconds)
        merge_json(choices_path, {net_key: forms}, indent=0)
        if not complete:
            progress.log(f"layer forms: timed the largest layers within {budget_seconds:g} s; the others run "
                         "factorised")
    net = copy.deepcopy(network)
    for site in find_sites(net, include_factorised=True):
        choice = forms.get(site.name, "factorised")
        if isinstance(site.module, TuckerConv) and choice != "factorised":
            replace_site(net, site, make_form(site.module, choice, multiple))
    return net.eval(), dict(forms)


def _dense_macs(module: TuckerConv, in_shape: Sequence[int]) -> int:
    """MACs of the dense layer a factorised one stands for (its timing priority)."""
    return (math.prod(module.core.kernel_size) * math.prod(in_shape[2:]) * module.first.in_channels
            * module.last.out_channels)


def _measure_forms(network: nn.Module, sites, in_channels: int, patch_size: Sequence[int], engine: Engine,
                   device: torch.device, precision: str, device_name: str, multiple: int, path: Path,
                   reps: int, progress: Progress, budget_seconds: float = MEASURE_BUDGET_SECONDS
                   ) -> Tuple[Dict[str, str], bool]:
    """The fastest form of each factorised layer, timing only what ``path`` does not hold yet,
    largest layers first, within ``budget_seconds``; and whether every layer got its timings."""
    shapes = trace(network, (1, in_channels, *patch_size)).shapes
    known = read_json(path)
    new: Dict[str, float] = {}
    forms: Dict[str, str] = {}
    ordered = sorted((s for s in sites if s.name in shapes),
                     key=lambda s: -_dense_macs(s.module, shapes[s.name][0]))
    spent, complete = 0.0, True
    for i, site in enumerate(ordered):
        in_shape = shapes[site.name][0]
        seconds = {}
        for form in FORMS:
            candidate = make_form(site.module, form, multiple)
            if form != "factorised" and candidate is site.module:
                continue  # e.g. ranks already a multiple of the vector width
            key = timing_key(engine.name, precision, device_name, candidate, in_shape)
            if key not in known and key not in new:
                if spent >= budget_seconds and i > 0:
                    complete = False  # over budget: a later run times it
                    continue
                t0 = time.perf_counter()
                new[key] = time_layer(engine, candidate, in_shape, device, precision, reps)
                spent += time.perf_counter() - t0
            seconds[form] = known[key] if key in known else new[key]
        if "factorised" not in seconds:
            forms[site.name] = "factorised"
        else:
            best = min(seconds, key=seconds.get)
            forms[site.name] = best if seconds[best] < (1 - MARGIN) * seconds["factorised"] else "factorised"
        progress.update((i + 1) / len(ordered), f"timed {site.name}: {forms[site.name]}")
    if new:
        merge_json(path, new, indent=0)
    return {s.name: forms[s.name] for s in sites if s.name in forms}, complete
