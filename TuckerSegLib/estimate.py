"""Architecture-only cost estimates: params, MACs and the MAC-bound speed-up of a ratio.

The Slicer panel shows these live while the user drags the ratio slider, before any weights are
loaded (or even downloaded). Networks are built on the meta device from TotalSegmentator's
architectures (``models.totalseg_archs``) and traced once per dataset id; each estimate is then a
pure rank choice. ``budget`` and ``energy`` depend on the trained weights' spectra, which are not
known here: the estimate assumes flat spectra (exact MAC target for ``budget``, ranks
``ceil(ratio * C)`` for ``energy``), so their parameter counts are indicative.

The panel must not import torch or trace networks on Slicer's GUI thread, so it reads
``readout_cost``: the same numbers, looked up in ``resources/readout_costs.json`` (written by
``write_readout_table`` from ``estimate_cost``; the architectures are data). The table holds every
ratio on the slider's 0.01 grid; ratios between grid points are interpolated. This module imports
torch only inside the functions that trace.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from TuckerSegLib.errors import InputError
from TuckerSegLib.specs import MODES, POLICIES, check_ratio

READOUT_TABLE = Path(__file__).resolve().parent / "resources" / "readout_costs.json"
READOUT_STEPS = 100  # ratios 0.01, 0.02, ..., 1.00

QUALITIES = {"default": "total", "fast": "total_fast", "fastest": "total_fastest"}


@lru_cache(maxsize=None)
def _traced(dataset_id: int) -> Tuple[tuple, int, int]:
    """Layer shapes, params and MACs of one TotalSegmentator network (cached per process)."""
    import torch

    from TuckerSegLib.models.nnunet_folder import build_network
    from TuckerSegLib.models.totalseg_archs import TRAINERS, totalseg_plans
    from TuckerSegLib.network.cost import layer_shapes, trace

    plans, dataset_json = totalseg_plans(dataset_id)
    with torch.device("meta"):
        net = build_network(plans, dataset_json, "3d_fullres", TRAINERS[dataset_id])
    from TuckerSegLib.models.totalseg_archs import patch_size

    tr = trace(net, (1, 1, *patch_size(dataset_id)))
    return tuple(layer_shapes(net, tr).values()), tr.cost.params, tr.cost.macs


def _flat_spectra(layers) -> dict:
    import numpy as np

    from TuckerSegLib.decomposition.tucker import ModeSpectra

    empty = np.zeros((0, 0))
    return {l.name: ModeSpectra(np.full(l.c_out, 1.0 / l.c_out), empty,
                                np.full(l.c_in, 1.0 / l.c_in), empty, 1.0) for l in layers}


def estimate_network(dataset_id: int, ratio: float, policy: str = "budget") -> Dict[str, float]:
    """Params and MACs of one network, original and compressed."""
    from TuckerSegLib.compression.ranks import choose_ranks

    shapes, params, macs = _traced(dataset_id)
    candidates: list = [s for s in shapes if policy == "paper" or s.worth_factorising()]
    dense = sum(s.dense_macs() for s in candidates)
    ranks = choose_ranks(candidates, ratio, policy, spectra=_flat_spectra(candidates),
                         fixed_macs=macs - dense, total_macs=macs)
    by_name = {s.name: s for s in candidates}
    d_params = sum(by_name[n].params(r) - by_name[n].dense_params() for n, r in ranks.items())
    d_macs = sum(by_name[n].macs(r) - by_name[n].dense_macs() for n, r in ranks.items())
    return {"params_original": params, "macs_original": macs,
            "params": params + d_params, "macs": macs + d_macs}


def estimate_cost(task: str = "total", quality: str = "default", ratio: float = 0.5,
                  policy: str = "budget") -> Dict[str, float]:
    """Summed cost of the networks a TotalSegmentator task runs, at ``ratio`` under ``policy``.

    Returns ``params``, ``macs`` (per patch, summed over the task's networks),
    ``params_original``, ``macs_original`` and ``expected_speedup`` (MAC ratio: the upper bound
    that fast engines approach).
    """
    from TuckerSegLib.models.totalseg_archs import TASK_DATASETS

    ratio = check_ratio(ratio)
    if quality not in QUALITIES:
        raise InputError(f"unknown quality {quality!r}; choose one of {', '.join(QUALITIES)}")
    key = task if task != "total" else QUALITIES[quality]
    if key not in TASK_DATASETS:
        raise InputError(f"no architecture known for task {task!r} ({quality})")
    total = {"params": 0, "macs": 0, "params_original": 0, "macs_original": 0}
    for dataset_id in TASK_DATASETS[key]:
        for k, v in estimate_network(dataset_id, ratio, policy).items():
            total[k] += v
    total["expected_speedup"] = total["macs_original"] / max(1, total["macs"])
    total.update(task=task, quality=quality, ratio=ratio, policy=policy)
    return total


# -- the panel's read-out: a table, no torch ------------------------------------------------------
def _grid() -> List[float]:
    return [round((k + 1) / READOUT_STEPS, 2) for k in range(READOUT_STEPS)]


def write_readout_table(path: Path = READOUT_TABLE, task: str = "total") -> Path:
    """Regenerate the read-out table from the architectures (developers; imports torch)."""
    table: Dict[str, dict] = {}
    for quality in MODES:
        entry: Dict[str, object] = {}
        for policy in POLICIES:
            rows = [estimate_cost(task, quality, ratio, policy) for ratio in _grid()]
            entry["params_original"] = int(rows[0]["params_original"])
            entry["macs_original"] = int(rows[0]["macs_original"])
            entry[policy] = {"params": [int(r["params"]) for r in rows],
                             "macs": [int(r["macs"]) for r in rows]}
        table[quality] = entry
    data = {"about": "TuckerSegLib.estimate.readout_cost: estimate_cost at ratios 0.01..1.00 "
                     "(step 0.01); regenerate with python -m TuckerSegLib.estimate",
            "ratios": _grid(), "tasks": {task: table}}
    Path(path).write_text(json.dumps(data, separators=(",", ":")) + "\n", encoding="utf-8")
    return Path(path)


@lru_cache(maxsize=4)
def _readout_table(path: str) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def readout_cost(task: str = "total", quality: str = "default", ratio: float = 0.5,
                 policy: str = "budget", path: Path = READOUT_TABLE) -> Dict[str, float]:
    """``estimate_cost``'s numbers without torch, from the shipped table (microseconds).

    Exact on the 0.01 grid (the slider's), linearly interpolated between grid points.
    """
    ratio = check_ratio(ratio)
    if policy not in POLICIES:
        raise InputError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    data = _readout_table(str(path))
    if data is None:
        raise InputError(f"the cost table {path} is missing or unreadable")
    try:
        entry = data["tasks"][task][quality]
    except KeyError:
        raise InputError(f"no cost table for task {task!r} ({quality})") from None
    ratios = data["ratios"]  # 0.01, 0.02, ..., 1.00
    pos = ratio / ratios[0] - 1.0  # where ``ratio`` falls on the grid
    lo = max(0, min(len(ratios) - 1, int(pos + 1e-9)))
    hi = min(lo + 1, len(ratios) - 1)
    w = min(max(pos - lo, 0.0), 1.0) if hi != lo else 0.0
    if w < 1e-9:
        w = 0.0
    column = entry[policy]
    params = (1 - w) * column["params"][lo] + w * column["params"][hi]
    macs = (1 - w) * column["macs"][lo] + w * column["macs"][hi]
    result = {"params": params, "macs": macs, "params_original": entry["params_original"],
              "macs_original": entry["macs_original"]}
    result["expected_speedup"] = result["macs_original"] / max(1.0, macs)
    result.update(task=task, quality=quality, ratio=ratio, policy=policy)
    return result


if __name__ == "__main__":
    print(write_readout_table())
