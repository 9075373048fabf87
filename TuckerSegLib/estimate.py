"""Architecture-only cost estimates: params, MACs and the MAC-bound speed-up of a ratio.

The Slicer panel shows these live while the user drags the ratio slider, before any weights are
loaded (or even downloaded). Networks are built on the meta device from TotalSegmentator's
architectures (``models.totalseg_archs``) and traced once per dataset id; each estimate is then a
pure rank choice. ``budget`` and ``energy`` depend on the trained weights' spectra, which are not
known here: the estimate assumes flat spectra (exact MAC target for ``budget``, ranks
``ceil(ratio * C)`` for ``energy``), so their parameter counts are indicative.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Dict, List, Tuple

import numpy as np
import torch

from TuckerSegLib.compression.ranks import choose_ranks
from TuckerSegLib.network.cost import LayerShape
from TuckerSegLib.decomposition.tucker import ModeSpectra
from TuckerSegLib.errors import InputError
from TuckerSegLib.specs import check_ratio

QUALITIES = {"default": "total", "fast": "total_fast", "fastest": "total_fastest"}


@lru_cache(maxsize=None)
def _traced(dataset_id: int) -> Tuple[Tuple[LayerShape, ...], int, int]:
    """Layer shapes, params and MACs of one TotalSegmentator network (cached per process)."""
    from TuckerSegLib.models.nnunet_folder import build_network
    from TuckerSegLib.models.totalseg_archs import TRAINERS, totalseg_plans
    from TuckerSegLib.network.cost import layer_shapes, trace

    plans, dataset_json = totalseg_plans(dataset_id)
    with torch.device("meta"):
        net = build_network(plans, dataset_json, "3d_fullres", TRAINERS[dataset_id])
    from TuckerSegLib.models.totalseg_archs import patch_size

    tr = trace(net, (1, 1, *patch_size(dataset_id)))
    return tuple(layer_shapes(net, tr).values()), tr.cost.params, tr.cost.macs


def _flat_spectra(layers) -> Dict[str, ModeSpectra]:
    empty = np.zeros((0, 0))
    return {l.name: ModeSpectra(np.full(l.c_out, 1.0 / l.c_out), empty,
                                np.full(l.c_in, 1.0 / l.c_in), empty, 1.0) for l in layers}


def estimate_network(dataset_id: int, ratio: float, policy: str = "budget") -> Dict[str, float]:
    """Params and MACs of one network, original and compressed."""
    shapes, params, macs = _traced(dataset_id)
    candidates: List[LayerShape] = [s for s in shapes if policy == "paper" or s.worth_factorising()]
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
