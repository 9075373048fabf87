"""Parameters and MACs of a (compressed) network, measured the same way for every model.

MACs are counted by ``torch.utils.flop_counter.FlopCounterMode`` for one forward pass of one
patch (FLOPs / 2; conv bias and norms excluded), on a meta-device copy so that even the large
TotalSegmentator networks cost nothing to count. Parameters are counted once per tensor even when
a module is referenced twice (nnU-Net keeps each conv under ``.conv`` and ``.all_modules``).
"""
from __future__ import annotations

import copy
from typing import Dict, Sequence

import torch
from torch import nn


def count_params(network: nn.Module) -> int:
    """Number of distinct parameter elements."""
    seen = set()
    total = 0
    for p in network.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def count_macs(network: nn.Module, patch_size: Sequence[int], in_channels: int = 1) -> int:
    """Multiply-accumulates of one forward pass on a ``(1, in_channels, *patch_size)`` input."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(network).to("meta").eval()
    x = torch.empty((1, in_channels, *[int(s) for s in patch_size]), device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta(x)
    return int(counter.get_total_flops() // 2)


def network_cost(network: nn.Module, patch_size: Sequence[int], in_channels: int = 1) -> Dict[str, int]:
    """``{"params": ..., "macs": ...}`` of ``network`` for one patch."""
    return {"params": count_params(network), "macs": count_macs(network, patch_size, in_channels)}
