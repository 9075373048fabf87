"""Rank policies: one user-facing ratio in (0, 1] -> Tucker-2 ranks for every layer.

``ratio = 1.0`` always means the original network, unchanged. Below that, per policy:

- ``paper``: the study's rule, exactly: every Conv and ConvTranspose (1x1 and single-input-channel
  layers too) gets ``rank = min(C, max(rank_min, ceil(C * ratio)))`` on each channel mode. The
  study's published parameter counts (e.g. 3.69 M at 0.3 for the 1.5 mm network) correspond to
  no rank floor, so ``rank_min`` defaults to 0 here. Use it to compare with the paper.
- ``uniform``: the same rule on the layers worth factorising (spatial kernel, more than one input
  channel), ranks rounded up to a multiple of ``rank_multiple`` (8) for fast kernels; a layer whose
  factorised form would cost at least as many MACs as the dense one stays dense.
- ``energy``: per layer and channel mode, the smallest rank that keeps ``ratio`` of the squared
  singular-value energy (rounded up to ``rank_multiple``); ratio is an energy fraction, not a cost.
- ``budget`` (default): ``ratio`` is the fraction of the whole network's MACs kept. Ranks are
  allocated across layers greedily by predicted error added per MAC saved (along each layer's
  convex hull of error against MACs), then the slack is filled back so that the result lands on
  the target. The predicted error of a layer is the relative energy it discards in each channel
  mode, each weighted by that mode's measured output sensitivity (``compression.sensitivity``; 1
  when not measured, which makes it the HOSVD error bound). A layer stays dense where
  factorising would not reduce its MACs. Ranks are multiples of ``rank_multiple`` (8) on layers
  of at least 8 x 8 channels, of ``C // 8`` on thinner ones (fine steps where a step of 8 would
  be a third of the layer).
  With a probe input, ``compression.compress_network`` also builds the study's rule at the largest
  rank factor under the target, fills its slack the same way (``budget_alternatives``), measures
  both on the probe and keeps the better: the additive error model cannot see how errors
  compound through the network, the probe can. ``compression.search`` then refines the pick by
  measured trades along each layer's ``rank_ladders``, kept only where whole validation volumes
  agree (when the refinement budget affords them).

Everything here works on ``LayerShape`` (channel counts, kernel, voxels in and out) and on the
kernels' ``ModeSpectra``, not on modules: network surgery lives in ``TuckerSegLib.network``.
"""
from __future__ import annotations

import heapq
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from TuckerSegLib.decomposition.tucker import ModeSpectra
from TuckerSegLib.network.cost import LayerShape, Ranks
from TuckerSegLib.specs import POLICIES

# Rank floors when the caller gives none: the study's published counts use none; ``uniform``
# keeps the study code's default of 16 so that thin layers are not crushed.
DEFAULT_RANK_MIN = {"paper": 0, "uniform": 16, "energy": 1, "budget": 1}


def _round_up(value: int, multiple: int, cap: int) -> int:
    if multiple > 1 and cap >= multiple:
        value = int(math.ceil(value / multiple) * multiple)
    return max(1, min(cap, value))


def _study_rank(channels: int, ratio: float, rank_min: int) -> int:
    return min(channels, max(rank_min, int(math.ceil(channels * ratio))))


def _cheaper(layer: LayerShape, ranks: Tuple[int, int]) -> Ranks:
    return ranks if layer.factorised_macs(*ranks) < layer.dense_macs() else None


def rank_grid(channels: int, multiple: int) -> List[int]:
    """Candidate ranks for a channel mode: multiples of ``multiple`` up to C, and C itself."""
    if channels < multiple or multiple <= 1:
        return list(range(1, channels + 1))
    grid = list(range(multiple, channels + 1, multiple))
    if grid[-1] != channels:
        grid.append(channels)
    return grid


def _convex_hull_steps(points: List[Tuple[int, float, Ranks]]) -> List[Tuple[int, float, Ranks]]:
    """Lower-left convex hull of (macs, error) points, from the dense point toward cheaper ones.

    Returns the hull vertices ordered by decreasing MACs; successive vertices have increasing
    slope (error added per MAC saved), which makes the greedy allocation optimal on the hull.
    """
    # Pareto front: walking from the cheapest point up, keep a point only if it has less error
    # than every cheaper one; then walk it from the dense (most expensive) end.
    frontier: List[Tuple[int, float, Ranks]] = []
    best = math.inf
    for p in sorted(points, key=lambda p: (p[0], p[1])):
        if p[1] < best:
            frontier.append(p)
            best = p[1]
    frontier.reverse()
    hull: List[Tuple[int, float, Ranks]] = []
    for p in frontier:  # decreasing macs, increasing error
        while len(hull) >= 2:
            (m1, e1, _), (m2, e2, _) = hull[-2], hull[-1]
            # slope from hull[-2] to hull[-1] must be smaller than from hull[-1] to p
            s12 = (e2 - e1) / max(m1 - m2, 1)
            s2p = (p[1] - e2) / max(m2 - p[0], 1)
            if s2p <= s12:
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def _budget_multiple(channels: int, multiple: int) -> int:
    return multiple if channels >= 8 * multiple else max(1, channels // 8)


def _balanced_pairs(layer: LayerShape, multiple: int) -> List[Tuple[int, int]]:
    """Rank pairs that keep about the same fraction of both channel modes.

    Lopsided pairs (e.g. all outputs, an eighth of the inputs) look cheap to the additive error
    model but compound badly in the network; keeping both modes at a similar fraction, as the
    study's rule does, and choosing that fraction per layer is what works in practice.
    """
    grid_out = rank_grid(layer.c_out, _budget_multiple(layer.c_out, multiple))
    grid_in = rank_grid(layer.c_in, _budget_multiple(layer.c_in, multiple))
    pairs = set()
    for r_out in grid_out:
        f = r_out / layer.c_out
        near = sorted(grid_in, key=lambda r: abs(r / layer.c_in - f))[:2]
        pairs.update((r_out, r_in) for r_in in near)
    for r_in in grid_in:
        f = r_in / layer.c_in
        near = sorted(grid_out, key=lambda r: abs(r / layer.c_out - f))[:2]
        pairs.update((r_out, r_in) for r_out in near)
    return sorted(pairs)


def _point(layer: LayerShape, ranks: Ranks, spectra: Mapping[str, ModeSpectra],
           weights: Optional[Mapping[str, Tuple[float, float]]]) -> Tuple[int, float, Ranks]:
    """(MACs, predicted error, ranks) of one layer at ``ranks`` (None = dense, no error)."""
    if ranks is None:
        return (layer.dense_macs(), 0.0, None)
    sp = spectra[layer.name]
    w_out, w_in = (1.0, 1.0) if weights is None else weights.get(layer.name, (1.0, 1.0))
    err = (w_out * sp.tail_out(ranks[0]) + w_in * sp.tail_in(ranks[1])) / max(sp.total, 1e-30)
    return (layer.factorised_macs(*ranks), err, tuple(ranks))


def _layer_points(layer: LayerShape, spectra: Mapping[str, ModeSpectra], multiple: int,
                  weights: Optional[Mapping[str, Tuple[float, float]]]) -> List[Tuple[int, float, Ranks]]:
    """The dense point and every balanced rank pair cheaper than dense, as (MACs, error, ranks)."""
    dense = layer.dense_macs()
    return [_point(layer, None, spectra, weights)] + [
        _point(layer, pair, spectra, weights) for pair in _balanced_pairs(layer, multiple)
        if layer.factorised_macs(*pair) < dense]


def rank_ladders(layers: Sequence[LayerShape], spectra: Mapping[str, ModeSpectra], multiple: int = 8,
                 weights: Optional[Mapping[str, Tuple[float, float]]] = None) -> Dict[str, List[Ranks]]:
    """Per layer, the rank pairs worth stepping through, cheapest first, ending with dense (None).

    Each rung costs more MACs and has less predicted error than the one below it (the Pareto
    front of ``_layer_points``): the moves ``compression.search`` measures.
    """
    ladders: Dict[str, List[Ranks]] = {}
    for layer in layers:
        front: List[Ranks] = []
        best = math.inf
        for macs, err, ranks in sorted(_layer_points(layer, spectra, multiple, weights),
                                       key=lambda p: (p[0], p[1])):
            if err < best:
                front.append(ranks)
                best = err
        ladders[layer.name] = front
    return ladders


def _budget(layers: Sequence[LayerShape], spectra: Mapping[str, ModeSpectra], target_macs: float,
            fixed_macs: int, multiple: int,
            weights: Optional[Mapping[str, Tuple[float, float]]] = None,
            start: Optional[Mapping[str, Ranks]] = None) -> Optional[Dict[str, Ranks]]:
    """Greedy rank allocation to a global MAC target (see module docstring).

    With ``start`` (an allocation under the target, e.g. the study's rule), the greedy descent is
    skipped and only the slack is filled; None when ``start`` does not fit under the target.
    """
    def point(layer: LayerShape, ranks: Ranks) -> Tuple[int, float, Ranks]:
        return _point(layer, ranks, spectra, weights)

    candidates = {layer.name: _layer_points(layer, spectra, multiple, weights) for layer in layers}

    if start is not None:
        chosen = {l.name: point(l, start.get(l.name)) for l in layers}
        total = fixed_macs + sum(p[0] for p in chosen.values())
        if total > target_macs:
            return None
        return _fill(candidates, chosen, target_macs - total)

    hulls = {name: _convex_hull_steps(pts) for name, pts in candidates.items()}
    position = {name: 0 for name in hulls}
    total = fixed_macs + sum(h[0][0] for h in hulls.values())
    heap: List[Tuple[float, str]] = []

    def push(name: str) -> None:
        i = position[name]
        hull = hulls[name]
        if i + 1 < len(hull):
            (m0, e0, _), (m1, e1, _) = hull[i], hull[i + 1]
            heapq.heappush(heap, ((e1 - e0) / max(m0 - m1, 1), name))

    for name in hulls:
        push(name)
    while total > target_macs and heap:
        _, name = heapq.heappop(heap)
        i = position[name]
        total -= hulls[name][i][0] - hulls[name][i + 1][0]
        position[name] = i + 1
        push(name)

    chosen = {name: hulls[name][position[name]] for name in hulls}
    return _fill(candidates, chosen, target_macs - total)


def _fill(candidates: Mapping[str, List[Tuple[int, float, Ranks]]],
          chosen: Dict[str, Tuple[int, float, Ranks]], slack: float) -> Dict[str, Ranks]:
    """Spend the MACs left under the target on the best error reduction per extra MAC."""
    improved = True
    while improved and slack > 0:
        improved = False
        best: Optional[Tuple[float, str, Tuple[int, float, Ranks]]] = None
        for name, pts in candidates.items():
            m0, e0, _ = chosen[name]
            for p in pts:
                extra = p[0] - m0
                if 0 < extra <= slack and p[1] < e0 - 1e-15:
                    gain = (e0 - p[1]) / extra
                    if best is None or gain > best[0]:
                        best = (gain, name, p)
        if best is not None:
            _, name, p = best
            slack -= p[0] - chosen[name][0]
            chosen[name] = p
            improved = True
    return {name: p[2] for name, p in chosen.items()}


def budget_alternatives(layers: Sequence[LayerShape], ratio: float,
                        spectra: Mapping[str, ModeSpectra], rank_multiple: int = 8,
                        fixed_macs: int = 0, total_macs: Optional[int] = None,
                        weights: Optional[Mapping[str, Tuple[float, float]]] = None,
                        ) -> Dict[str, Dict[str, Ranks]]:
    """Budget allocations worth comparing on a probe, all at the same MAC target.

    ``greedy``: the allocation by predicted error (``choose_ranks``). ``uniform-seeded``: the
    study's rule at the largest rank factor that fits under the target, its slack then filled
    greedily. The additive error model misjudges how errors compound through the network; the
    caller measures both on a probe input and keeps the better, so that ``budget`` is never
    worse there than the study's rule at equal MACs.
    """
    total = total_macs if total_macs is not None else fixed_macs + sum(l.dense_macs() for l in layers)
    target = ratio * total
    out = {"greedy": _budget(layers, spectra, target, fixed_macs, rank_multiple, weights)}
    for factor in np.arange(0.99, 0.0, -0.01):
        start = choose_ranks(layers, float(factor), "uniform", rank_multiple=rank_multiple)
        if fixed_macs + sum(l.macs(start[l.name]) for l in layers) <= target:
            filled = _budget(layers, spectra, target, fixed_macs, rank_multiple, weights, start=start)
            # an alternative must hit the target as closely as the greedy one (within 2 %)
            if filled is not None and fixed_macs + sum(l.macs(filled[l.name]) for l in layers) >= 0.98 * target:
                out["uniform-seeded"] = filled
            break
    return out


def choose_ranks(layers: Sequence[LayerShape], ratio: float, policy: str = "budget",
                 spectra: Optional[Mapping[str, ModeSpectra]] = None, rank_min: Optional[int] = None,
                 rank_multiple: int = 8, fixed_macs: int = 0, total_macs: Optional[int] = None,
                 weights: Optional[Mapping[str, Tuple[float, float]]] = None) -> Dict[str, Ranks]:
    """Ranks for each layer in ``layers`` (the candidates a policy may factorise).

    ``fixed_macs`` are the MACs of everything that is not a candidate (other layers), and
    ``total_macs`` the whole network's MACs, both needed by ``budget`` to turn the ratio into a
    global target. ``spectra`` (per layer name) are needed by ``energy`` and ``budget``;
    ``weights`` (per layer name: output-mode and input-mode sensitivity) scale ``budget``'s
    error estimates.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if ratio >= 1.0:
        return {layer.name: None for layer in layers}
    if rank_min is None:
        rank_min = DEFAULT_RANK_MIN[policy]
    if policy == "paper":
        return {l.name: (_study_rank(l.c_out, ratio, rank_min), _study_rank(l.c_in, ratio, rank_min))
                for l in layers}
    if policy == "uniform":
        return {l.name: _cheaper(l, (_round_up(_study_rank(l.c_out, ratio, rank_min), rank_multiple, l.c_out),
                                     _round_up(_study_rank(l.c_in, ratio, rank_min), rank_multiple, l.c_in)))
                for l in layers}
    if spectra is None:
        raise ValueError(f"policy {policy!r} needs the layers' spectra")
    if policy == "energy":
        out: Dict[str, Ranks] = {}
        for l in layers:
            sp = spectra[l.name]
            out[l.name] = _cheaper(l, (_round_up(sp.rank_for_energy(ratio, "out"), rank_multiple, l.c_out),
                                       _round_up(sp.rank_for_energy(ratio, "in"), rank_multiple, l.c_in)))
        return out
    total = total_macs if total_macs is not None else fixed_macs + sum(l.dense_macs() for l in layers)
    return _budget(layers, spectra, ratio * total, fixed_macs, rank_multiple, weights)
