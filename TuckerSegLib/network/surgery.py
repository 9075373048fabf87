"""Finding convolution layers in a network and swapping them for factorised ones.

nnU-Net's networks (dynamic_network_architectures) hold the same conv under two attribute paths
(``ConvDropoutNormReLU.conv`` and ``.all_modules[0]``). A ``ConvSite`` is one physical layer with
all its paths, so that it is decomposed once and replaced everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

from torch import nn

from TuckerSegLib.network.tucker_conv import TuckerConv, is_conv


@dataclass
class ConvSite:
    """One physical layer: its first (canonical) path, every path it is reachable by, the module."""

    name: str
    module: nn.Module
    aliases: List[str] = field(default_factory=list)


def find_sites(network: nn.Module, include_factorised: bool = False) -> List[ConvSite]:
    """Every distinct plain conv (and ``TuckerConv`` if asked) in module order, with aliases."""
    sites: Dict[int, ConvSite] = {}
    for path, module in network.named_modules(remove_duplicate=False):
        if isinstance(module, TuckerConv):
            if include_factorised:
                sites.setdefault(id(module), ConvSite(path, module)).aliases.append(path)
            continue
        if is_conv(module) and not _inside_tucker(network, path):
            sites.setdefault(id(module), ConvSite(path, module)).aliases.append(path)
    return list(sites.values())


def _inside_tucker(network: nn.Module, path: str) -> bool:
    parts = path.split(".")
    for i in range(1, len(parts)):
        if isinstance(get_module(network, ".".join(parts[:i])), TuckerConv):
            return True
    return False


def get_module(network: nn.Module, path: str) -> nn.Module:
    module = network
    for part in path.split(".") if path else []:
        module = getattr(module, part) if not part.isdigit() else module[int(part)]
    return module


def _set_module(network: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = get_module(network, parent_path)
    if attr.isdigit() and isinstance(parent, (nn.Sequential, nn.ModuleList)):
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)


def replace_site(network: nn.Module, site: ConvSite, new: nn.Module) -> None:
    """Put ``new`` at every path of ``site`` (so that both nnU-Net references see it)."""
    for path in site.aliases:
        _set_module(network, path, new)
    site.module = new


def factorised_layers(network: nn.Module) -> Dict[str, TuckerConv]:
    """Canonical path -> ``TuckerConv`` for every factorised layer of a network."""
    return {s.name: s.module for s in find_sites(network, include_factorised=True)
            if isinstance(s.module, TuckerConv)}


def factorise_structure(network: nn.Module, layer_ranks: Mapping[str, Optional[Sequence[int]]]) -> nn.Module:
    """Replace the named layers by ``TuckerConv`` shells of the given ranks (weights to be loaded).

    Raises ``KeyError`` when a named layer does not exist: a manifest that does not match the
    architecture must never produce a model.
    """
    sites = {s.name: s for s in find_sites(network)}
    for name, r in layer_ranks.items():
        if r is None:
            continue
        if name not in sites:
            raise KeyError(f"layer {name!r} not found in the network")
        site = sites[name]
        replace_site(network, site, TuckerConv(site.module, (int(r[0]), int(r[1]))))
    return network
