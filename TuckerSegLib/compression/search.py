"""Choose and refine rank allocations by the whole network's error measured on a probe input.

Why: the budget's error model adds up per-layer errors (each layer's sensitivity measured alone,
in the dense network) and cannot see how errors compound through a U-Net; the measured error of
a whole configuration can. ``ProbeScorer`` measures an allocation's output error (factors cached
per layer and ranks, only changed layers swapped in place). ``best_on_probe`` picks among
candidate allocations. ``refine_on_probe`` then improves the pick at constant MACs: each round
measures, in the current configuration, what one rank step down costs and one step up gains on
each layer, moves MACs from the layers where lowering hurts least per MAC to those where raising
helps most, and keeps the trade only if the measured error falls. The result is never worse on
the probe than where it started. The error is what users compare: Dice of the argmax against the
uncompressed network's (on the demo model, squared probability change chose allocations that lost
to the study's rule in whole-volume Dice, while this one wins; see benchmarks/compare_policies.py).

A few probe patches are a cheap guide but a poor judge: a hundred measured trades fit their
noise (on the demo model refinement cut the probe error by a third while whole-volume Dice did
not move, or fell). ``VolumeScorer`` therefore measures the same error on whole volumes,
predicted as nnU-Net's sliding window does (half-patch steps, Gaussian-weighted tiles). Where the
caller can afford it, the alternatives are chosen on those volumes and each trade the probe
proposes is kept only if the volumes agree: the probe proposes, the volumes decide.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from TuckerSegLib.network.cost import LayerShape, Ranks
from TuckerSegLib.decomposition.tucker import ModeSpectra, tucker2
from TuckerSegLib.network.surgery import ConvSite, replace_site
from TuckerSegLib.network.tucker_conv import TuckerConv, conv_layout_weight
from TuckerSegLib.progress import NullProgress, Progress

Allocation = Dict[str, Ranks]


@dataclass(frozen=True)
class ValidationSet:
    """Whole volumes (C, *spatial) in the network's input space, built on first use.

    ``shapes`` are known without building them, so that the caller can price the validation first
    (resampling four phantoms to 1.5 mm takes seconds, wasted where the budget cannot pay for them).
    """

    shapes: Tuple[Tuple[int, ...], ...]
    build: Callable[[], List[torch.Tensor]]


def output_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """What segmentation users see: 1 - mean Dice of the argmax against the reference's argmax
    over the classes the reference finds, plus a tenth of the class-balanced squared change of
    the probabilities (which breaks ties between configurations with equal argmax)."""
    dims = [0] + list(range(2, reference.dim()))
    prob = torch.softmax(output.float(), 1)
    change = ((prob - reference).pow(2).sum(dims) / reference.pow(2).sum(dims).clamp_min(1e-6)).mean()
    ours, ref = prob.argmax(1), reference.argmax(1)
    dice = []
    for c in torch.unique(ref).tolist():
        a, b = ours == c, ref == c
        dice.append(2 * float((a & b).sum()) / max(1, int(a.sum()) + int(b.sum())))
    return (1.0 - sum(dice) / max(1, len(dice))) + 0.1 * float(change)


class ProbeScorer:
    """Output error of ``network`` with some layers factorised at given ranks, on ``probe``.

    The network is modified in place while scoring; ``restore`` puts the original layers back.
    """

    def __init__(self, network: nn.Module, sites: Mapping[str, ConvSite],
                 spectra: Mapping[str, ModeSpectra], probe: torch.Tensor):
        self.network = network.eval()
        self.sites = dict(sites)
        self.spectra = spectra
        self.probe = probe
        self._original = {name: site.module for name, site in self.sites.items()}
        self._current: Dict[str, Ranks] = {name: None for name in self.sites}
        self._modules: Dict[Tuple[str, Tuple[int, int]], nn.Module] = {}
        self.evaluations = 0
        with torch.no_grad():
            self.reference = torch.softmax(network(probe).float(), 1)

    def _module(self, name: str, ranks: Ranks) -> nn.Module:
        if ranks is None:
            return self._original[name]
        key = (name, tuple(ranks))
        if key not in self._modules:
            conv = self._original[name]
            factors = tucker2(conv_layout_weight(conv), tuple(ranks), spectra=self.spectra.get(name))
            self._modules[key] = TuckerConv.from_factors(conv, factors).eval()
        return self._modules[key]

    def set_ranks(self, allocation: Mapping[str, Ranks]) -> None:
        for name, site in self.sites.items():
            ranks = allocation.get(name)
            ranks = None if ranks is None else tuple(ranks)
            if ranks != self._current[name]:
                replace_site(self.network, site, self._module(name, ranks))
                self._current[name] = ranks

    def error(self, allocation: Mapping[str, Ranks]) -> float:
        self.set_ranks(allocation)
        with torch.no_grad():
            out = self.network(self.probe)
        self.evaluations += 1
        return output_error(out, self.reference)

    def forget_except(self, allocation: Mapping[str, Ranks]) -> None:
        """Drop cached factorised layers not used by ``allocation`` (bounds memory)."""
        keep = {(n, tuple(r)) for n, r in allocation.items() if r is not None}
        self._modules = {k: v for k, v in self._modules.items() if k in keep}

    def restore(self) -> None:
        self.set_ranks({})
        self._modules.clear()


class VolumeScorer:
    """The output error (``output_error``) of ``scorer``'s network on whole volumes.

    Each volume (C, *spatial, at least one patch after padding) is predicted as nnU-Net's
    sliding window does, with its own step and Gaussian helpers, tiles batched. ``cost`` is one
    measurement in probe forwards (the unit of the refinement budget); each measurement adds it to
    ``scorer.evaluations``.
    """

    def __init__(self, scorer: ProbeScorer, volumes: Sequence[torch.Tensor], patch_size: Sequence[int],
                 step: float = 0.5, batch_size: int = 4):
        from acvl_utils.cropping_and_padding.padding import pad_nd_image
        from nnunetv2.inference.sliding_window_prediction import compute_gaussian

        self.scorer = scorer
        self.patch = tuple(int(p) for p in patch_size)
        self.batch_size = batch_size
        padded = [pad_nd_image(v, self.patch, "constant", {"value": 0}, True) for v in volumes]
        self.volumes = [v for v, _ in padded]
        self.unpad = [slicer for _, slicer in padded]  # as nnU-Net, scored on the volume, not its padding
        self.tiles = [tile_slices(v.shape[1:], self.patch, step) for v in self.volumes]
        self.gaussian = compute_gaussian(self.patch, sigma_scale=1. / 8, value_scaling_factor=10,
                                         dtype=torch.float32, device=torch.device("cpu"))
        self.cost = volume_cost([v.shape for v in volumes], self.patch, scorer.probe.shape, step)
        saved = dict(scorer._current)
        scorer.set_ranks({})
        self.reference = [torch.softmax(self._predict(i), 0) for i in range(len(self.volumes))]
        scorer.set_ranks(saved)
        scorer.evaluations += self.cost

    def _predict(self, index: int) -> torch.Tensor:
        volume, tiles = self.volumes[index], self.tiles[index]
        logits: Optional[torch.Tensor] = None
        weight = torch.zeros(volume.shape[1:])
        with torch.no_grad():
            for start in range(0, len(tiles), self.batch_size):
                batch = tiles[start:start + self.batch_size]
                out = self.scorer.network(torch.stack([volume[(slice(None), *t)] for t in batch])).float()
                if logits is None:
                    logits = torch.zeros((out.shape[1], *volume.shape[1:]))
                for o, t in zip(out, batch):
                    logits[(slice(None), *t)] += o * self.gaussian
                    weight[t] += self.gaussian
        return (logits / weight)[(slice(None), *self.unpad[index][1:])]

    def error(self, allocation: Mapping[str, Ranks]) -> float:
        """Mean ``output_error`` over the volumes with ``allocation`` in place."""
        self.scorer.set_ranks(allocation)
        self.scorer.evaluations += self.cost
        errors = [output_error(self._predict(i)[None], ref[None]) for i, ref in enumerate(self.reference)]
        return sum(errors) / len(errors)


def volume_cost(shapes: Sequence[Sequence[int]], patch: Sequence[int], probe_shape: Sequence[int],
                step: float = 0.5) -> int:
    """Probe forwards that one measurement on volumes of ``shapes`` (C, *spatial) costs."""
    tiles = sum(len(tile_slices([max(n, p) for n, p in zip(shape[1:], patch)], patch, step)) for shape in shapes)
    return math.ceil(tiles * math.prod(patch) / (probe_shape[0] * math.prod(probe_shape[2:])))


def tile_slices(shape: Sequence[int], patch: Sequence[int], step: float) -> List[tuple]:
    """The sliding window's tiles of a volume of ``shape`` (at least one patch), by nnU-Net's step rule."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    steps = compute_steps_for_sliding_window(tuple(shape), tuple(patch), step)
    return [tuple(slice(s, s + p) for s, p in zip(corner, patch)) for corner in itertools.product(*steps)]


def best_on_probe(scorer: ProbeScorer, alternatives: Mapping[str, Allocation],
                  volumes: Optional[VolumeScorer] = None) -> dict:
    """Measure each candidate allocation on the probe (and on ``volumes``: they decide); name the best."""
    errors = {name: scorer.error(ranks) for name, ranks in alternatives.items()}
    out = {"chosen": min(errors, key=errors.get), "probe_error": errors}
    if volumes is not None:
        on_volumes = {name: volumes.error(ranks) for name, ranks in alternatives.items()}
        out.update(chosen=min(on_volumes, key=lambda n: (on_volumes[n], errors[n])), volume_error=on_volumes)
    return out


def _neighbours(ladder: Sequence[Ranks], layer: LayerShape, ranks: Ranks) -> Tuple[Ranks, Ranks, bool, bool]:
    """The next cheaper and the next dearer rung around ``ranks`` (which may be off the ladder)."""
    macs = layer.macs(ranks)
    cheaper = [r for r in ladder if layer.macs(r) < macs]
    dearer = [r for r in ladder if layer.macs(r) > macs]
    return (cheaper[-1] if cheaper else None, dearer[0] if dearer else None, bool(cheaper), bool(dearer))


def refine_on_probe(scorer: ProbeScorer, layers: Sequence[LayerShape], ladders: Mapping[str, List[Ranks]],
                    start: Allocation, target_macs: float, fixed_macs: int, max_rounds: int = 3,
                    tolerance: float = 0.02,
                    progress: Optional[Progress] = None,
                    start_error: Optional[float] = None,
                    max_evaluations: Optional[int] = None,
                    volumes: Optional[VolumeScorer] = None,
                    start_volume_error: Optional[float] = None) -> Tuple[Allocation, dict]:
    """Trade MACs between layers by measured error at the same MAC target (see module docstring).

    A round costs two probe forwards per layer. It starts only if that fits in ``max_evaluations``
    forwards (a count, not a time, so that every machine gets the same result). The MACs stay
    within ``[1 - tolerance, 1] x target_macs`` unless ``start`` already lies below that.
    ``start_error``: the probe error of ``start`` when already measured (e.g. by
    ``best_on_probe``), so that it is not measured again. With
    ``volumes``, a trade is kept only if it also lowers the error there (``start_volume_error``:
    that of ``start``, when measured); a round then tries the whole plan, then its first three
    trades alone, and its cost counts the volume measurements. When the volumes refuse them all,
    the next round plans again from the same measurements without those raises.
    """
    progress = progress or NullProgress()
    t0 = time.perf_counter()
    by_name = {l.name: l for l in layers}
    current: Allocation = {l.name: start.get(l.name) for l in layers}

    def total(alloc: Mapping[str, Ranks]) -> int:
        return fixed_macs + sum(by_name[n].macs(r) for n, r in alloc.items())

    floor = min((1 - tolerance) * target_macs, total(current))
    error = scorer.error(current) if start_error is None else start_error
    history = {"probe_error_start": error, "rounds": 0, "trades": 0, "evaluations_start": scorer.evaluations}
    volume_error = None
    if volumes is not None:
        volume_error = volumes.error(current) if start_volume_error is None else start_volume_error
        history["volume_error_start"] = volume_error
    movable = [l for l in layers if len(ladders.get(l.name, [])) > 1]
    measured: Optional[Tuple[list, list]] = None  # moves measured around ``current``
    refused = set()  # raises the volumes refused around ``current``
    for round_ in range(max_rounds):
        per_round = (0 if measured else 2 * len(movable)) + 2 + (2 * volumes.cost if volumes is not None else 0)
        if max_evaluations is not None and \
                scorer.evaluations - history["evaluations_start"] + per_round > max_evaluations:
            history["stopped"] = "evaluation budget"
            break
        if measured is None:
            measured = _measure_moves(scorer, movable, ladders, current, error, progress, round_, max_rounds)
        ups, downs = measured
        trades = _plan_trades([u for u in ups if u[1:3] not in refused], downs, target_macs - total(current))
        if not trades:
            history["stopped"] = "no trade helps"
            break
        accepted = False
        plans = [trades] + [[t] for t in trades[:1 if volumes is None else 3]] if len(trades) > 1 else [trades]
        for plan in plans:
            candidate = dict(current)
            for name, ranks in plan_changes(plan).items():
                candidate[name] = ranks
            if not floor <= total(candidate) <= target_macs:
                continue
            e = scorer.error(candidate)
            if e < error and volumes is not None:
                v = volumes.error(candidate)
                if v >= volume_error:
                    continue
                volume_error = v
            if e < error:
                current, error, accepted = candidate, e, True
                history["trades"] += len(plan)
                break
        history["rounds"] = round_ + 1
        scorer.forget_except(current)
        if accepted:
            measured, refused = None, set()
        elif volumes is None:
            history["stopped"] = "measured trade did not help"
            break
        else:  # the volumes refused: the same measurements, without the refused raises, next round
            refused.update(trade[0] for trade in trades[:3])
    if volumes is not None:
        history["volume_error"] = volume_error
    history.update(probe_error=error, evaluations=scorer.evaluations - history.pop("evaluations_start"),
                   seconds=round(time.perf_counter() - t0, 3), macs=total(current))
    return current, history


def _measure_moves(scorer: ProbeScorer, movable: Sequence[LayerShape], ladders: Mapping[str, List[Ranks]],
                   current: Allocation, error: float, progress: Progress, round_: int,
                   max_rounds: int) -> Tuple[list, list]:
    """Per layer, the measured error change of one rung up (gain per MAC) and one down (loss per
    MAC) from ``current``: the raises best first, the cuts cheapest first."""
    ups: List[Tuple[float, str, Ranks, int]] = []
    downs: List[Tuple[float, str, Ranks, int]] = []
    for i, layer in enumerate(movable):
        r = current[layer.name]
        down, up, has_down, has_up = _neighbours(ladders[layer.name], layer, r)
        if has_down:
            saved = layer.macs(r) - layer.macs(down)
            e = scorer.error({**current, layer.name: down})
            downs.append(((e - error) / saved, layer.name, down, saved))
        if has_up:
            extra = layer.macs(up) - layer.macs(r)
            e = scorer.error({**current, layer.name: up})
            ups.append(((error - e) / extra, layer.name, up, extra))
        progress.update((round_ + (i + 1) / len(movable)) / max_rounds,
                        f"refining ranks on the probe (round {round_ + 1})")
    ups.sort(key=lambda t: -t[0])
    downs.sort(key=lambda t: t[0])
    return ups, downs


def _plan_trades(ups, downs, slack: float) -> List[List[Tuple[str, Ranks]]]:
    """Pair measured rank raises with rank cuts that pay for them, best rates first.

    A raise is taken only if cuts whose measured loss per MAC is below its gain per MAC (plus any
    slack under the target) cover its MACs. Each layer moves at most once per round.
    """
    trades: List[List[Tuple[str, Ranks]]] = []
    used = set()
    budget = max(0.0, slack)
    j = 0
    for gain, name, up, extra in ups:
        if gain <= 0:
            break
        if name in used:
            continue
        cuts = []
        available = budget
        k = j
        while available < extra and k < len(downs):
            loss, d_name, down, saved = downs[k]
            k += 1
            if d_name in used or d_name == name:
                continue
            if loss >= gain:
                break
            cuts.append((d_name, down))
            available += saved
        if available < extra:
            break
        trades.append([(name, up)] + cuts)
        used.add(name)
        used.update(n for n, _ in cuts)
        budget = available - extra
        j = k
    return trades


def plan_changes(plan: Sequence[Sequence[Tuple[str, Ranks]]]) -> Dict[str, Ranks]:
    """The rank changes of a list of trades, as one mapping."""
    return {name: ranks for trade in plan for name, ranks in trade}
