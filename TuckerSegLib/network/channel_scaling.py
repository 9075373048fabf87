"""Rescale activation channels without changing what a network computes.

Why: INT8 activations share one scale per tensor (OpenVINO with NNCF), so a channel whose values
span a tenth of its neighbours' range keeps a tenth of the 256 levels. In nnU-Net every activation
is ``LeakyReLU(InstanceNorm(x))`` with an affine norm; since ``LeakyReLU(x / s) = LeakyReLU(x) / s``
for ``s > 0``, dividing channel c's affine weight and bias by ``s_c`` divides the activation by
``s_c``, and multiplying the input-channel slice c of every convolution that reads it by ``s_c``
gives back the same output. That is SmoothQuant's migration of range from activations to weights
(Xiao et al. 2023), folded into the network instead of an extra multiply. A convolution whose
output only feeds convolutions (a transposed convolution into the decoder's concatenation, the
channel projections of a factorised layer) is rescaled the same way through its weight and bias.

``scalable_groups`` finds the activations this is exact for (torch.fx graph of the network);
``channel_ranges`` measures each one's per-channel range on data; ``smoothing_scales`` and
``apply_scales`` migrate it. In float32 the rescaled network's output equals the original's up to
rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_HOMOGENEOUS = (nn.LeakyReLU, nn.ReLU)  # f(x / s) = f(x) / s for s > 0
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


@dataclass
class ScalableGroup:
    """One activation whose channels can be rescaled: who produces it, who reads it."""

    source: str  # module path of the affine norm, or of the convolution that produces it
    kind: str  # "norm" or "conv"
    activation: str  # module path whose output is the activation (nonlinearity, norm or conv)
    channels: int
    consumers: List[Tuple[str, int]]  # (convolution's module path, offset of these channels in its input)


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, _CONVS + _TRANSPOSED) and m.groups == 1


def _node_channels(node, modules) -> Optional[int]:
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, _CONVS + _TRANSPOSED):
            return m.out_channels
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) or isinstance(m, nn.modules.batchnorm._BatchNorm):
            return m.num_features
        if isinstance(m, _HOMOGENEOUS + _PASS_THROUGH):
            return _node_channels(node.args[0], modules)
    if node.op == "call_function" and node.target is torch.cat and _cat_dim(node) == 1:
        sizes = [_node_channels(a, modules) for a in node.args[0]]
        return None if any(s is None for s in sizes) else sum(sizes)
    return None


def _cat_dim(node) -> Optional[int]:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim if isinstance(dim, int) else None


def _consumers(node, offset: int, modules) -> Optional[List[Tuple[str, int]]]:
    """Every convolution that reads ``node`` (through concatenations), or None if anything else does."""
    found: List[Tuple[str, int]] = []
    for user in node.users:
        if user.op == "call_module" and _is_conv(modules[user.target]) and user.args[0] is node:
            found.append((user.target, offset))
        elif user.op == "call_module" and isinstance(modules[user.target], _PASS_THROUGH):
            more = _consumers(user, offset, modules)
            if more is None:
                return None
            found += more
        elif user.op == "call_function" and user.target is torch.cat and _cat_dim(user) == 1:
            inputs = list(user.args[0])
            if inputs.count(node) != 1:
                return None
            before = [_node_channels(a, modules) for a in inputs[:inputs.index(node)]]
            if any(b is None for b in before):
                return None
            more = _consumers(user, offset + sum(before), modules)
            if more is None:
                return None
            found += more
        else:
            return None
    return found or None


def scalable_groups(network: nn.Module) -> List[ScalableGroup]:
    """The activations of ``network`` whose channels can be rescaled exactly; [] if it cannot be traced."""
    import torch.fx as fx

    try:
        graph = fx.symbolic_trace(network).graph
    except Exception:  # a network torch.fx cannot trace simply keeps its scales
        return []
    modules = dict(network.named_modules())
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    groups = []
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        m = modules[node.target]
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.affine:
            act = node
            users = list(node.users)
            if len(users) == 1 and users[0].op == "call_module" and calls[users[0].target] == 1 \
                    and isinstance(modules[users[0].target], _HOMOGENEOUS):
                act = users[0]
            kind, channels = "norm", m.num_features
        elif _is_conv(m):
            act, kind, channels = node, "conv", m.out_channels
        else:
            continue
        consumers = _consumers(act, 0, modules)
        if consumers:
            groups.append(ScalableGroup(node.target, kind, act.target, channels, consumers))
    return groups


def channel_ranges(network: nn.Module, groups: Iterable[ScalableGroup], inputs: Iterable[torch.Tensor]
                   ) -> Dict[str, torch.Tensor]:
    """Per activation, each channel's largest absolute value, averaged over ``inputs`` (one batch each)."""
    modules = dict(network.named_modules())
    sums: Dict[str, torch.Tensor] = {}
    handles = []
    for g in groups:
        def hook(_m, _i, out, key=g.source):
            amax = out.detach().abs().float().transpose(0, 1).flatten(1).amax(dim=1).cpu()
            sums[key] = sums.get(key, 0) + amax
        handles.append(modules[g.activation].register_forward_hook(hook))
    n = 0
    try:
        with torch.no_grad():
            for x in inputs:
                network(x)
                n += 1
    finally:
        for h in handles:
            h.remove()
    return {k: v / max(1, n) for k, v in sums.items()}


def _weight_columns(conv: nn.Module, offset: int, channels: int) -> torch.Tensor:
    """The slice of ``conv``'s weight that multiplies input channels offset..offset+channels."""
    if isinstance(conv, _TRANSPOSED):  # (C_in, C_out, *k)
        return conv.weight[offset:offset + channels]
    return conv.weight[:, offset:offset + channels].transpose(0, 1)  # (channels, C_out, *k)


def smoothing_scales(network: nn.Module, group: ScalableGroup, ranges: torch.Tensor, alpha: float,
                     max_ratio: float = 100.0) -> torch.Tensor:
    """SmoothQuant's ``s_c = a_c^alpha / w_c^(1 - alpha)`` (``a_c`` the activation range, ``w_c`` the
    largest weight reading channel c), scaled to a geometric mean of 1 and clipped to ``max_ratio``."""
    modules = dict(network.named_modules())
    w = torch.zeros(group.channels)
    for path, offset in group.consumers:
        cols = _weight_columns(modules[path], offset, group.channels).detach().abs().float()
        w = torch.maximum(w, cols.flatten(1).amax(dim=1).cpu())
    a = ranges.float()
    live = (a > 0) & (w > 0)
    s = torch.ones(group.channels)
    if live.any():
        s[live] = a[live].pow(alpha) / w[live].pow(1.0 - alpha)
        s[live] = s[live] / s[live].log().mean().exp()
        s = s.clamp(1.0 / max_ratio ** 0.5, max_ratio ** 0.5)
    return s


def _along(v: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return v.view(shape)


@torch.no_grad()
def apply_scales(network: nn.Module, group: ScalableGroup, scales: torch.Tensor) -> None:
    """Divide the activation's channels by ``scales`` and multiply every reader's weights by them."""
    modules = dict(network.named_modules())
    src = modules[group.source]
    s = scales.to(src.weight.dtype)
    # output channels: axis 0 of a norm's or conv's weight, axis 1 of a transposed conv's
    src.weight.div_(_along(s, 1 if isinstance(src, _TRANSPOSED) else 0, src.weight.dim()))
    if src.bias is not None:
        src.bias.div_(s)
    for path, offset in group.consumers:
        conv = modules[path]
        cs = scales.to(conv.weight.dtype)
        if isinstance(conv, _TRANSPOSED):  # input channels on axis 0
            conv.weight[offset:offset + group.channels].mul_(_along(cs, 0, conv.weight.dim()))
        else:
            conv.weight[:, offset:offset + group.channels].mul_(_along(cs, 1, conv.weight.dim()))


def smooth_activations(network: nn.Module, inputs: Iterable[torch.Tensor], alpha: float = 0.5) -> dict:
    """Migrate activation range into weights over every scalable activation of ``network`` (in place).

    Returns a small report: how many activations were rescaled and the largest scale ratio.
    """
    groups = scalable_groups(network)
    ranges = channel_ranges(network, groups, inputs)
    spread = []
    for g in groups:
        if g.source in ranges:
            s = smoothing_scales(network, g, ranges[g.source], alpha)
            apply_scales(network, g, s)
            spread.append(float(s.max() / s.min()))
    return {"alpha": alpha, "activations": len(spread), "max_scale_ratio": max(spread, default=1.0)}
