"""``TuckerConv``: a convolution replaced by 1x1 -> core -> 1x1 (Tucker-2 of its kernel).

For ``ConvNd`` with kernel ``(C_out, C_in, *k)`` and factors ``U_out, U_in, core``:
``first`` = 1x1 conv ``C_in -> r_in`` (weight ``U_in^T``), ``core`` = conv ``r_in -> r_out`` with the
original kernel size, stride, padding, dilation and padding mode, ``last`` = 1x1 conv
``r_out -> C_out`` (weight ``U_out``, the original bias). Strides live in the core only, which is
exact because the 1x1 projections commute with striding.

For ``ConvTransposeNd`` (kernel laid out ``(C_in, C_out, *k)``) ``core`` is a transposed conv with
the original stride, padding and output padding; the two 1x1 convs are plain convs, ``first`` at
input resolution and ``last`` at output resolution.
"""
from __future__ import annotations

from typing import Tuple, Type

import torch
from torch import nn

from TuckerSegLib.decomposition.tucker import Tucker2

_CONV_TYPES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_TRANSPOSED_TYPES = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}
_PLAIN_BY_DIM: dict = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def is_conv(module: nn.Module) -> bool:
    """A plain (non-factorised) convolution or transposed convolution of any dimension."""
    return type(module) in _CONV_TYPES or type(module) in _TRANSPOSED_TYPES


def conv_layout_weight(conv: nn.Module) -> torch.Tensor:
    """The kernel as ``(C_out, C_in, *k)``, whatever the layer type."""
    w = conv.weight
    return w.transpose(0, 1) if isinstance(conv, nn.modules.conv._ConvTransposeNd) else w


class TuckerConv(nn.Module):
    """A Tucker-2 factorised convolution (see module docstring). ``forward = last(core(first(x)))``."""

    def __init__(self, conv: nn.Module, ranks: Tuple[int, int], device=None, dtype=None):
        """Build the three layers for ``conv`` at ``ranks = (r_out, r_in)``, weights uninitialised."""
        super().__init__()
        if conv.groups != 1:
            raise ValueError("grouped convolutions are not factorised")
        transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
        dim = (_TRANSPOSED_TYPES if transposed else _CONV_TYPES)[type(conv)]
        c_in, c_out = conv.in_channels, conv.out_channels
        r_out, r_in = int(ranks[0]), int(ranks[1])
        kw = {"device": device if device is not None else conv.weight.device,
              "dtype": dtype if dtype is not None else conv.weight.dtype}
        plain: Type[nn.Module] = _PLAIN_BY_DIM[dim]
        self.transposed = transposed
        self.first = plain(c_in, r_in, 1, bias=False, **kw)
        if transposed:
            self.core = type(conv)(r_in, r_out, conv.kernel_size, stride=conv.stride,
                                   padding=conv.padding, output_padding=conv.output_padding,
                                   dilation=conv.dilation, bias=False,
                                   padding_mode=conv.padding_mode, **kw)
        else:
            self.core = type(conv)(r_in, r_out, conv.kernel_size, stride=conv.stride,
                                   padding=conv.padding, dilation=conv.dilation, bias=False,
                                   padding_mode=conv.padding_mode, **kw)
        self.last = plain(r_out, c_out, 1, bias=conv.bias is not None, **kw)

    @property
    def ranks(self) -> Tuple[int, int]:
        """``(r_out, r_in)``."""
        return self.last.in_channels, self.first.out_channels

    @classmethod
    def from_factors(cls, conv: nn.Module, factors: Tucker2) -> "TuckerConv":
        """The factorised replacement of ``conv`` with the given conv-layout factors."""
        module = cls(conv, factors.ranks)
        dim = conv.weight.dim() - 2
        ones = (1,) * dim
        with torch.no_grad():
            module.first.weight.copy_(factors.u_in.t().reshape(*factors.u_in.t().shape, *ones))
            core = factors.core.transpose(0, 1) if module.transposed else factors.core
            module.core.weight.copy_(core)
            module.last.weight.copy_(factors.u_out.reshape(*factors.u_out.shape, *ones))
            if conv.bias is not None:
                module.last.bias.copy_(conv.bias)
        return module

    def reconstruct(self) -> torch.Tensor:
        """The dense kernel this module computes, in the original layer's weight layout."""
        u_in = self.first.weight.flatten(1).t()  # (C_in, r_in)
        u_out = self.last.weight.flatten(1)  # (C_out, r_out)
        core = self.core.weight.transpose(0, 1) if self.transposed else self.core.weight
        w = torch.einsum("ab...,oa,ib->oi...", core, u_out, u_in)
        return w.transpose(0, 1) if self.transposed else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))

    def extra_repr(self) -> str:
        return f"ranks(out, in)={self.ranks}, transposed={self.transposed}"
