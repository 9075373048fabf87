"""How much each layer's kernel error costs at the network's output, measured on a probe input.

Weight-reconstruction error alone misjudges layers: truncating a thin high-resolution layer adds
little kernel error per MAC saved but disturbs every feature downstream, while deep 320-channel
layers absorb large kernel errors; and cutting a layer's input channels differs from cutting its
outputs. For each candidate layer and each channel mode we truncate that mode alone to a probe
rank (about a quarter of its channels: the regime high compression works in), run the network
on a probe input and divide the relative squared change of the logits by the energy discarded
in that mode. The ``budget`` policy then allocates ranks by
``s_out x discarded_out + s_in x discarded_in`` per MAC saved, i.e. by predicted output error.
Layers holding under ``MIN_MAC_SHARE`` of the candidates' MACs (the deep, parameter-heavy ones of a
U-Net) are not probed, to halve the probing time: they save few MACs whatever their ranks, and get
the largest sensitivity measured, so the budget cuts them only where that is nearly free.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from TuckerSegLib.network.cost import LayerShape
from TuckerSegLib.decomposition.tucker import ModeSpectra, tucker2
from TuckerSegLib.network.surgery import ConvSite, replace_site
from TuckerSegLib.network.tucker_conv import TuckerConv, conv_layout_weight
from TuckerSegLib.progress import NullProgress, Progress


MIN_MAC_SHARE = 0.01


def _probe_rank(channels: int) -> int:
    return max(1, min(channels - 1, round(channels / 4)))


def layer_sensitivities(network: nn.Module, layers: Sequence[LayerShape],
                        spectra: Mapping[str, ModeSpectra], sites: Mapping[str, ConvSite],
                        probe: torch.Tensor,
                        progress: Optional[Progress] = None) -> Dict[str, Tuple[float, float]]:
    """``{layer: (s_out, s_in)}``: relative squared output error per unit of relative energy
    discarded in the output and the input channel mode."""
    progress = progress or NullProgress()
    out: Dict[str, Tuple[float, float]] = {}
    total_macs = sum(l.dense_macs() for l in layers) or 1
    skipped = [l for l in layers if l.dense_macs() < MIN_MAC_SHARE * total_macs]
    layers = [l for l in layers if l.dense_macs() >= MIN_MAC_SHARE * total_macs]
    with torch.no_grad():
        reference = torch.softmax(network(probe).float(), 1)
        norm = float(reference.pow(2).sum()) or 1.0
        for i, layer in enumerate(layers):
            site = sites[layer.name]
            conv = site.module
            sp = spectra[layer.name]
            per_mode = []
            for ranks in ((_probe_rank(layer.c_out), layer.c_in), (layer.c_out, _probe_rank(layer.c_in))):
                discarded = (sp.tail_out(ranks[0]) + sp.tail_in(ranks[1])) / max(sp.total, 1e-30)
                if layer.c_out == 1 or layer.c_in == 1 or discarded <= 1e-12:
                    per_mode.append(0.0)
                    continue
                factors = tucker2(conv_layout_weight(conv), ranks, spectra=sp)
                replace_site(network, site, TuckerConv.from_factors(conv, factors))
                try:
                    changed = torch.softmax(network(probe).float(), 1)
                finally:
                    replace_site(network, site, conv)
                per_mode.append(float((changed - reference).pow(2).sum()) / norm / discarded)
            out[layer.name] = (per_mode[0], per_mode[1])
            progress.update((i + 1) / max(1, len(layers)), f"probing {layer.name}")
    if skipped:
        worst = (max((v[0] for v in out.values()), default=1.0), max((v[1] for v in out.values()), default=1.0))
        out.update({l.name: worst for l in skipped})
    return out
