"""Parameters and MACs of a network at its patch size, counted by running it on the meta device.

MACs follow the study's convention (fvcore, the paper's "GFLOPs"): convolution multiply-adds
(``torch.utils.flop_counter`` FLOPs / 2, bias excluded) plus normalisation at 5 operations per
element with an affine transform (4 without). Parameters are those of the modules that run in a
forward pass, so nnU-Net's unused deep-supervision heads are not counted ("final head only").
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from TuckerSegLib.network.surgery import find_sites

aten = torch.ops.aten
Ranks = Optional[Tuple[int, int]]  # (r_out, r_in) of a factorised layer; None = dense


@dataclass(frozen=True)
class LayerShape:
    """What rank choice needs to know about one convolution layer (channels in conv layout)."""

    name: str
    c_out: int
    c_in: int
    kernel: Tuple[int, ...]
    in_voxels: int  # spatial size of the layer's input at the model's patch size
    out_voxels: int
    transposed: bool = False
    groups: int = 1

    @property
    def kernel_volume(self) -> int:
        return int(np.prod(self.kernel)) if self.kernel else 1

    def dense_macs(self) -> int:
        per = self.c_out * (self.c_in // self.groups) * self.kernel_volume
        return per * (self.in_voxels if self.transposed else self.out_voxels)

    def dense_params(self) -> int:
        return self.c_out * (self.c_in // self.groups) * self.kernel_volume

    def factorised_macs(self, r_out: int, r_in: int) -> int:
        """MACs of 1x1 (C_in->r_in) -> core (r_in->r_out) -> 1x1 (r_out->C_out)."""
        core_voxels = self.in_voxels if self.transposed else self.out_voxels
        return (self.c_in * r_in * self.in_voxels
                + r_in * r_out * self.kernel_volume * core_voxels
                + r_out * self.c_out * self.out_voxels)

    def factorised_params(self, r_out: int, r_in: int) -> int:
        return self.c_in * r_in + r_in * r_out * self.kernel_volume + r_out * self.c_out

    def macs(self, ranks: Ranks) -> int:
        return self.dense_macs() if ranks is None else self.factorised_macs(*ranks)

    def params(self, ranks: Ranks) -> int:
        """Weight parameters (bias excluded: it is the same either way)."""
        return self.dense_params() if ranks is None else self.factorised_params(*ranks)

    def worth_factorising(self) -> bool:
        """The default selection: a spatial kernel and more than one input channel, not grouped."""
        return self.groups == 1 and self.kernel_volume > 1 and self.c_in > 1


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int
    conv_macs: int
    norm_ops: int

    def as_dict(self) -> Dict[str, int]:
        return asdict(self)


def _norm_flops(input_shape, weight_shape=None, *args, out_shape=None, **kwargs) -> int:
    numel = 1
    for d in input_shape:
        numel *= d
    return (5 if weight_shape is not None else 4) * numel


# Keyed by packet (what the counter looks up) and by overload (what stops the counter from
# decomposing the op into uncounted primitives first).
_NORM_PACKETS = (aten.native_batch_norm, aten.native_group_norm, aten.native_layer_norm)
_NORM_OPS = {**{op: _norm_flops for op in _NORM_PACKETS},
             **{op.default: _norm_flops for op in _NORM_PACKETS}}


def _meta_copy(network: nn.Module) -> nn.Module:
    """A structural copy on the meta device, so that tracing costs no memory or compute."""
    return copy.deepcopy(network).to("meta")


@dataclass
class Trace:
    """What one meta forward pass at the patch size revealed."""

    shapes: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]]  # site name -> (input, output) shape
    cost: Cost


def trace(network: nn.Module, input_shape: Sequence[int]) -> Trace:
    """Run ``network`` on a meta tensor of ``input_shape`` (N, C, *spatial); record conv shapes and cost."""
    meta = _meta_copy(network)
    sites = find_sites(meta, include_factorised=True)
    name_of = {id(s.module): s.name for s in sites}
    shapes: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {}
    executed_params: Dict[int, int] = {}

    def conv_hook(module, inputs, output):
        shapes[name_of[id(module)]] = (tuple(inputs[0].shape), tuple(output.shape))

    def leaf_hook(module, inputs, output):
        for p in module.parameters(recurse=False):
            executed_params[id(p)] = p.numel()

    handles = [s.module.register_forward_hook(conv_hook) for s in sites]
    handles += [m.register_forward_hook(leaf_hook) for m in meta.modules()
                if next(m.parameters(recurse=False), None) is not None]
    counter = FlopCounterMode(display=False, custom_mapping=_NORM_OPS)
    try:
        with torch.no_grad(), counter:
            meta(torch.empty(*input_shape, device="meta"))
    finally:
        for h in handles:
            h.remove()
    counts = counter.get_flop_counts().get("Global", {})
    conv_flops = sum(v for k, v in counts.items() if k not in _NORM_PACKETS)
    norm_ops = sum(v for k, v in counts.items() if k in _NORM_PACKETS)
    cost = Cost(params=sum(executed_params.values()), macs=conv_flops // 2 + norm_ops,
                conv_macs=conv_flops // 2, norm_ops=norm_ops)
    return Trace(shapes, cost)


def count_cost(network: nn.Module, input_shape: Sequence[int]) -> Cost:
    return trace(network, input_shape).cost


def layer_shapes(network: nn.Module, tr: Trace) -> Dict[str, LayerShape]:
    """``LayerShape`` of every plain conv that ran in the traced pass."""
    out: Dict[str, LayerShape] = {}
    for site in find_sites(network):
        if site.name not in tr.shapes:
            continue
        conv = site.module
        (in_shape, out_shape) = tr.shapes[site.name]
        vox_in = 1
        for d in in_shape[2:]:
            vox_in *= d
        vox_out = 1
        for d in out_shape[2:]:
            vox_out *= d
        out[site.name] = LayerShape(
            name=site.name, c_out=conv.out_channels, c_in=conv.in_channels,
            kernel=tuple(conv.kernel_size), in_voxels=vox_in, out_voxels=vox_out,
            transposed=isinstance(conv, nn.modules.conv._ConvTransposeNd), groups=conv.groups)
    return out
