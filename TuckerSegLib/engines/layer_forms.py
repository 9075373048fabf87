"""Equivalent forms of a factorised layer: factorised, ranks zero-padded, first 1x1 fused, or dense.

Why: which form is fastest depends on the hardware and engine, not on MACs. A thin 1x1 conv is a
full pass over memory for few MACs; folding it into the core (a conv ``C_in -> r_out`` with
kernel ``core x U_in``) saves that pass at the cost of more MACs; and where the factorised layer
is not cheaper at all on the device, the dense kernel it represents runs faster. All three
compute the same function (up to float rounding) as the ``TuckerConv`` they come from.
Rank rounding: ranks such as 7 or 13 (the study's rule at small rank factors) miss the SIMD width
and fall on slow kernels; padding the factors with zero channels up to a multiple of 16 (CPU
vector width in f32) or 8 (GPU tensor cores) computes exactly the same and may run faster.
"""
from __future__ import annotations

from torch import nn
import torch

from TuckerSegLib.network.tucker_conv import TuckerConv

FORMS = ("factorised", "padded", "fused", "dense")
PAD_MULTIPLE = {"cpu": 16, "cuda": 8, "mps": 8}


def _like(conv: nn.Module, in_channels: int, out_channels: int, bias: bool, device=None) -> nn.Module:
    """A conv of ``conv``'s type and geometry with other channel counts."""
    kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, bias=bias,
              padding_mode=conv.padding_mode, device=device or conv.weight.device, dtype=conv.weight.dtype)
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        kw["output_padding"] = conv.output_padding
    return type(conv)(in_channels, out_channels, conv.kernel_size, **kw)


class FusedTuckerConv(nn.Module):
    """``last(core(x))`` where ``core`` already contains the first 1x1 projection."""

    def __init__(self, core: nn.Module, last: nn.Module):
        super().__init__()
        self.core = core
        self.last = last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(x))


def fused_form(tc: TuckerConv) -> FusedTuckerConv:
    """Fold ``tc.first`` into ``tc.core``: one conv ``C_in -> r_out``, then ``tc.last``."""
    first = tc.first.weight.flatten(1)  # (r_in, C_in)
    c_in, r_out = first.shape[1], tc.ranks[0]
    core = _like(tc.core, c_in, r_out, bias=False)
    with torch.no_grad():
        if tc.transposed:  # weight (in, out, k): (r_in, r_out, k) -> (C_in, r_out, k)
            core.weight.copy_(torch.einsum("ai,ao...->io...", first, tc.core.weight))
        else:  # weight (out, in, k): (r_out, r_in, k) -> (r_out, C_in, k)
            core.weight.copy_(torch.einsum("oa...,ai->oi...", tc.core.weight, first))
    return FusedTuckerConv(core, tc.last).eval()


def dense_form(tc: TuckerConv) -> nn.Module:
    """The dense convolution ``tc`` represents (original type, geometry and bias)."""
    weight = tc.reconstruct()
    c_out, c_in = (weight.shape[1], weight.shape[0]) if tc.transposed else (weight.shape[0], weight.shape[1])
    conv = _like(tc.core, c_in, c_out, bias=tc.last.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if tc.last.bias is not None:
            conv.bias.copy_(tc.last.bias)
    return conv.eval()


def _round_up(r: int, multiple: int) -> int:
    return -(-r // multiple) * multiple


def padded_form(tc: TuckerConv, multiple: int = 16) -> TuckerConv:
    """``tc`` with both ranks zero-padded up to a multiple of ``multiple`` (exactly the same output)."""
    r_out, r_in = tc.ranks
    c_in, c_out = tc.first.in_channels, tc.last.out_channels
    new_out, new_in = min(_round_up(r_out, multiple), max(r_out, c_out)), min(_round_up(r_in, multiple), max(r_in, c_in))
    if (new_out, new_in) == (r_out, r_in):
        return tc
    w = tc.first.weight
    shell = _like(tc.core, c_in, c_out, bias=tc.last.bias is not None, device="meta")
    out = TuckerConv(shell, (new_out, new_in), device=w.device, dtype=w.dtype)
    with torch.no_grad():
        for p in out.parameters():
            p.zero_()
        out.first.weight[:r_in].copy_(tc.first.weight)
        if tc.transposed:  # (in, out, k)
            out.core.weight[:r_in, :r_out].copy_(tc.core.weight)
        else:  # (out, in, k)
            out.core.weight[:r_out, :r_in].copy_(tc.core.weight)
        out.last.weight[:, :r_out].copy_(tc.last.weight)
        if tc.last.bias is not None:
            out.last.bias.copy_(tc.last.bias)
    return out.eval()


def make_form(tc: TuckerConv, form: str, multiple: int = 16) -> nn.Module:
    if form == "factorised":
        return tc
    if form == "padded":
        return padded_form(tc, multiple)
    if form == "fused":
        return fused_form(tc)
    if form == "dense":
        return dense_form(tc)
    raise ValueError(f"unknown layer form {form!r}")
