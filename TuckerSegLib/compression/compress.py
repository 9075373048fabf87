"""Compress a network: choose ranks, factorise the chosen layers, report what changed.

``compress_model(model, spec, data)`` is the one entry point for a loaded nnU-Net model (the
cache, ``tuckerseg compress``, finetune and the benchmarks call it); ``compress_network`` does the
same job on a bare ``nn.Module``. ``data`` holds what the ranks are measured on: the probe and
validation volumes of the ``budget`` policy (``probe_data``) or activation statistics of the
user's CTs (``calibration``).
"""
from __future__ import annotations

import copy
import math
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from TuckerSegLib.compression.probe_data import CompressionData, budget_inputs
from TuckerSegLib.compression.ranks import budget_alternatives, choose_ranks, rank_ladders
from TuckerSegLib.compression.search import ValidationSet
from TuckerSegLib.decomposition.tucker import mode_spectra, tucker2
from TuckerSegLib.models.compressed_file import CompressionResult
from TuckerSegLib.models.nnunet_folder import NnUNetModel
from TuckerSegLib.network.cost import Cost, LayerShape, Ranks, layer_shapes, trace
from TuckerSegLib.network.surgery import find_sites, replace_site
from TuckerSegLib.network.tucker_conv import TuckerConv, conv_layout_weight
from TuckerSegLib.progress import NullProgress, Progress
from TuckerSegLib.specs import CompressionSpec

# Closed-loop refinement of budget allocations on the probe (``compression.search``): at most
# this many rounds, started only while their probe forwards fit in this many MACs in all. A
# budget in MACs, not seconds, gives the same ranks on every machine. Whole-volume validation is
# paid from it too (in probe forwards). It buys about 280 forwards of the demo model's probe (3 to
# 5 rounds validated on 4 phantoms, 25 to 35 s on 2 cores) and neither rounds nor validation for a
# TotalSegmentator network (33 probe forwards; one round needs 44 to 54), which would take many
# minutes on a CPU.
REFINE_ROUNDS = 8
REFINE_PROBE_MACS = 2e12


def default_data(model: NnUNetModel, spec: CompressionSpec) -> CompressionData:
    """The ``budget`` policy's built-in probe and phantom validation volumes; nothing for the others."""
    if spec.policy != "budget" or spec.is_original:
        return CompressionData()
    return budget_inputs(model)


def compress_model(model: NnUNetModel, spec: CompressionSpec, data: Optional[CompressionData] = None,
                   progress: Optional[Progress] = None, inplace: bool = False) -> CompressionResult:
    """``model``'s network compressed as ``spec`` asks, measured on ``data`` (default: ``default_data``).

    With ``inplace`` the model's own network is factorised (saves a copy of a large network).
    """
    data = default_data(model, spec) if data is None else data
    return compress_network(model.network, spec, patch_size=model.patch_size,
                            in_channels=model.num_input_channels, data=data, inplace=inplace,
                            progress=progress)


def _module_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _candidates(shapes: Mapping[str, LayerShape], policy: str) -> Tuple[List[LayerShape], Dict[str, str]]:
    """Layers the policy may factorise, and the reason each other layer stays dense."""
    chosen, reasons = [], {}
    for s in shapes.values():
        if s.groups != 1:
            reasons[s.name] = "grouped convolution: left dense"
        elif policy == "paper" or s.worth_factorising():
            chosen.append(s)
        elif s.kernel_volume == 1:
            reasons[s.name] = "1x1 kernel: already a channel projection"
        else:
            reasons[s.name] = "single input channel: nothing to factorise"
    return chosen, reasons


def compress_network(network: nn.Module, spec: CompressionSpec, patch_size: Sequence[int] = (128, 128, 128),
                     in_channels: int = 1, data: Optional[CompressionData] = None, inplace: bool = False,
                     progress: Optional[Progress] = None) -> CompressionResult:
    """Factorise ``network`` as ``spec`` asks (ratio and policy: see ``compression.ranks``).

    Costs are counted at ``patch_size`` (the model's sliding-window patch). The input network is
    left untouched unless ``inplace``. Ratio 1.0 returns the network unchanged.
    ``data.probe`` (an input batch, e.g. ``probe_data.default_probe``) lets ``budget`` weigh each
    layer's error by its measured effect on the output (``compression.sensitivity``).
    ``data.validation`` (whole volumes, e.g. ``probe_data.default_validation``) then decides which
    of the probe's choices are kept, where the refinement budget affords it (``compression.search``).
    ``data.calibration`` (activation statistics) replaces ``spec.method`` for the factors and the
    weight spectra for rank allocation wherever it has data for a layer (the probe is then unused).
    """
    data = data or CompressionData()
    probe, validation, calibration = data.probe, data.validation, data.calibration
    ratio, policy, method = spec.ratio, spec.policy, spec.method
    rank_min, rank_multiple = spec.rank_min, spec.rank_multiple
    progress = progress or NullProgress()
    t0 = time.perf_counter()
    net = network if inplace else copy.deepcopy(network)
    net.eval()
    input_shape = (1, in_channels, *patch_size)
    before = trace(net, input_shape)
    shapes = layer_shapes(net, before)
    candidates, reasons = _candidates(shapes, policy)

    spectra = {}
    if ratio < 1.0 and (policy in ("budget", "energy") or method == "hosvd"):
        sites = {s.name: s for s in find_sites(net)}
        for i, layer in enumerate(candidates):
            spectra[layer.name] = mode_spectra(conv_layout_weight(sites[layer.name].module))
            progress.update(0.5 * (i + 1) / max(1, len(candidates)), f"analysing {layer.name}")

    sensitivity = None
    # With calibration the data-aware spectra already measure each layer's output error; the
    # probe's sensitivities are calibrated against weight-energy truncation, so they are not mixed.
    if probe is not None and calibration is None and policy == "budget" and ratio < 1.0:
        from TuckerSegLib.compression.sensitivity import layer_sensitivities

        known = data.sensitivities or {}
        if all(layer.name in known for layer in candidates):
            sensitivity = {layer.name: tuple(known[layer.name]) for layer in candidates}
            progress.log("layer sensitivities: measured before for this model and probe")
        else:
            sensitivity = layer_sensitivities(net, candidates, spectra, {s.name: s for s in find_sites(net)},
                                              probe, progress)
            data.sensitivities = dict(sensitivity)

    rank_spectra = dict(spectra)
    if calibration is not None and ratio < 1.0:
        sites = {s.name: s for s in find_sites(net)}
        for layer in candidates:
            data_spectra = calibration.spectra(layer.name, sites[layer.name].module)
            if data_spectra is not None:
                rank_spectra[layer.name] = data_spectra

    dense_candidates = sum(l.dense_macs() for l in candidates)
    allocation = None
    if sensitivity is not None:
        alternatives = budget_alternatives(candidates, ratio, rank_spectra, rank_multiple,
                                           fixed_macs=before.cost.macs - dense_candidates,
                                           total_macs=before.cost.macs, weights=sensitivity)
        probe_macs = before.cost.macs * probe.shape[0] * probe[0, 0].numel() / math.prod(patch_size)
        ranks, allocation = _search_on_probe(net, candidates, alternatives, spectra, probe, rank_multiple,
                                             ratio * before.cost.macs,
                                             before.cost.macs - dense_candidates, sensitivity, progress,
                                             max_evaluations=int(REFINE_PROBE_MACS // max(1.0, probe_macs)) if spec.refine else 0,
                                             validation=validation, patch_size=patch_size)
    else:
        ranks = choose_ranks(candidates, ratio, policy, spectra=rank_spectra, rank_min=rank_min,
                             rank_multiple=rank_multiple, fixed_macs=before.cost.macs - dense_candidates,
                             total_macs=before.cost.macs)

    layers_report = []
    sites = find_sites(net)
    todo = [s for s in sites if ranks.get(s.name) is not None]
    done = 0
    for site in sites:
        shape = shapes.get(site.name)
        conv = site.module
        entry = {
            "name": site.name, "type": type(conv).__name__,
            "weight_shape": list(conv.weight.shape),
            "out_channels": conv.out_channels, "in_channels": conv.in_channels,
            "kernel": list(conv.kernel_size), "stride": list(conv.stride),
            "params_before": _module_params(conv), "macs_before": shape.dense_macs() if shape else 0,
        }
        if sensitivity is not None and site.name in sensitivity:
            entry["sensitivity"] = list(sensitivity[site.name])
        r: Ranks = ranks.get(site.name)
        if r is None:
            entry.update(ranks=None, status="dense", params_after=entry["params_before"],
                         macs_after=entry["macs_before"], rel_error=0.0,
                         reason=reasons.get(site.name) or ("not executed at this patch size" if shape is None
                                                            else "kept dense by the policy"))
        else:
            factors = calibration.factorise(site.name, conv, r) if calibration is not None else None
            if factors is not None:
                entry["data_error"] = calibration.output_error(site.name, conv, factors)
            else:
                factors = tucker2(conv_layout_weight(conv), r, method=method, spectra=spectra.get(site.name))
            new = TuckerConv.from_factors(conv, factors)
            entry.update(ranks=list(r), status="factorised", params_after=_module_params(new),
                         macs_after=shape.factorised_macs(*r),
                         rel_error=factors.relative_error(conv_layout_weight(conv)))
            replace_site(net, site, new)
            done += 1
            progress.update(0.5 + 0.5 * done / max(1, len(todo)), f"factorising {site.name}")
        layers_report.append(entry)

    after = trace(net, input_shape).cost if todo else before.cost
    report = _report(before.cost, after, layers_report, policy=policy, ratio=ratio, method=method,
                     patch_size=list(patch_size), in_channels=in_channels, rank_min=rank_min,
                     rank_multiple=rank_multiple, seconds=time.perf_counter() - t0,
                     probe=None if sensitivity is None else list(probe.shape))
    if allocation is not None:
        report["allocation"] = allocation
    if calibration is not None:
        report["calibration"] = calibration.describe()
    layer_ranks = {e["name"]: e["ranks"] for e in layers_report}
    return CompressionResult(net, layer_ranks, report)


def _search_on_probe(net: nn.Module, candidates: Sequence[LayerShape],
                     alternatives: Mapping[str, Mapping[str, Ranks]], spectra: Mapping, probe: torch.Tensor,
                     rank_multiple: int, target_macs: float, fixed_macs: int,
                     sensitivity: Mapping[str, Tuple[float, float]], progress: Progress,
                     max_evaluations: int, validation: Optional[ValidationSet] = None,
                     patch_size: Sequence[int] = ()) -> Tuple[Dict[str, Ranks], dict]:
    """Keep the allocation with the least measured error, then refine it (see ``compression.search``).

    Whole-volume validation is used only when its reference and the alternatives' measurements
    fit in ``max_evaluations`` (probe forwards); otherwise the probe alone decides, as before.
    """
    from TuckerSegLib.compression.search import (ProbeScorer, VolumeScorer, best_on_probe, refine_on_probe,
                                                   volume_cost)

    scorer = ProbeScorer(net, {s.name: s for s in find_sites(net)}, spectra, probe)
    volumes = None
    try:
        if validation is not None and validation.shapes:
            cost = volume_cost(validation.shapes, patch_size, probe.shape)
            if (1 + len(alternatives)) * cost + len(alternatives) <= max_evaluations:
                progress.log(f"validating on {len(validation.shapes)} whole volumes")
                volumes = VolumeScorer(scorer, validation.build(), patch_size)
        allocation = best_on_probe(scorer, alternatives, volumes)
        ladders = rank_ladders(candidates, spectra, rank_multiple, sensitivity)
        chosen = allocation["chosen"]
        left = max_evaluations - scorer.evaluations
        ranks, refined = refine_on_probe(scorer, candidates, ladders, alternatives[chosen],
                                         target_macs, fixed_macs, max_rounds=REFINE_ROUNDS,
                                         max_evaluations=left, progress=progress,
                                         start_error=allocation["probe_error"][chosen], volumes=volumes,
                                         start_volume_error=allocation.get("volume_error", {}).get(chosen))
    finally:
        scorer.restore()
    allocation["refined"] = refined
    allocation["validation"] = {"volumes": len(validation.shapes) if volumes is not None else 0,
                                "probe_forwards_each": volumes.cost if volumes is not None else None}
    return ranks, allocation


def _report(before: Cost, after: Cost, layers: list, **settings) -> dict:
    return {
        **settings,
        "original": before.as_dict(),
        "compressed": after.as_dict(),
        "params_ratio": after.params / max(1, before.params),
        "macs_ratio": after.macs / max(1, before.macs),
        "layers": layers,
    }
