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
"""
from __future__ import annotations

import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from TuckerSegLib.decomposition.ranks import LayerShape, Ranks
from TuckerSegLib.decomposition.tucker import ModeSpectra, tucker2
from TuckerSegLib.network.surgery import ConvSite, replace_site
from TuckerSegLib.network.tucker_conv import TuckerConv, conv_layout_weight
from TuckerSegLib.progress import NullProgress, Progress

Allocation = Dict[str, Ranks]


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

    def _set(self, allocation: Mapping[str, Ranks]) -> None:
        for name, site in self.sites.items():
            ranks = allocation.get(name)
            ranks = None if ranks is None else tuple(ranks)
            if ranks != self._current[name]:
                replace_site(self.network, site, self._module(name, ranks))
                self._current[name] = ranks

    def error(self, allocation: Mapping[str, Ranks]) -> float:
        self._set(allocation)
        with torch.no_grad():
            out = self.network(self.probe)
        self.evaluations += 1
        return output_error(out, self.reference)

    def forget_except(self, allocation: Mapping[str, Ranks]) -> None:
        """Drop cached factorised layers not used by ``allocation`` (bounds memory)."""
        keep = {(n, tuple(r)) for n, r in allocation.items() if r is not None}
        self._modules = {k: v for k, v in self._modules.items() if k in keep}

    def restore(self) -> None:
        self._set({})
        self._modules.clear()


def best_on_probe(scorer: ProbeScorer, alternatives: Mapping[str, Allocation]) -> dict:
    """Measure each candidate allocation on the probe; name the best."""
    errors = {name: scorer.error(ranks) for name, ranks in alternatives.items()}
    return {"chosen": min(errors, key=errors.get), "probe_error": errors}


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
                    max_evaluations: Optional[int] = None) -> Tuple[Allocation, dict]:
    """Trade MACs between layers by measured error at the same MAC target (see module docstring).

    A round costs two probe forwards per layer. It starts only if that fits in ``max_evaluations``
    forwards (a count, not a time, so that every machine gets the same result). The MACs stay within ``[1 - tolerance, 1] x target_macs``
    unless ``start`` already lies below that. ``start_error``: the probe error of ``start`` when
    already measured (e.g. by ``best_on_probe``), so that it is not measured again.
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
    movable = [l for l in layers if len(ladders.get(l.name, [])) > 1]
    for round_ in range(max_rounds):
        per_round = 2 * len(movable) + 2
        if max_evaluations is not None and \
                scorer.evaluations - history["evaluations_start"] + per_round > max_evaluations:
            history["stopped"] = "evaluation budget"
            break
        slack = target_macs - total(current)
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
        trades = _plan_trades(ups, downs, slack)
        if not trades:
            history["stopped"] = "no trade helps"
            break
        accepted = False
        for plan in (trades, trades[:1]) if len(trades) > 1 else (trades,):
            candidate = dict(current)
            for name, ranks in plan_changes(plan).items():
                candidate[name] = ranks
            if not floor <= total(candidate) <= target_macs:
                continue
            e = scorer.error(candidate)
            if e < error:
                current, error, accepted = candidate, e, True
                history["trades"] += len(plan)
                break
        history["rounds"] = round_ + 1
        scorer.forget_except(current)
        if not accepted:
            history["stopped"] = "measured trade did not help"
            break
    history.update(probe_error=error, evaluations=scorer.evaluations - history.pop("evaluations_start"),
                   seconds=round(time.perf_counter() - t0, 3), macs=total(current))
    return current, history


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
