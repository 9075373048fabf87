"""Rescaling activation channels (INT8 smoothing) keeps the network's output and evens the ranges."""
from __future__ import annotations

import copy

import pytest
import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from torch import nn

from TuckerSegLib.compression.compress import compress_network
from TuckerSegLib.network.channel_scaling import channel_ranges, scalable_groups, smooth_activations
from TuckerSegLib.network.tucker_conv import TuckerConv
from TuckerSegLib.specs import CompressionSpec

from test_engines import PATCH, small_unet


def _inputs(n=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 1, *PATCH, generator=g) for _ in range(n)]


def _spread_ranges(net: nn.Module) -> None:
    """Uneven channel ranges, as training leaves them: affine norms scaled 0.05..5 per channel."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.InstanceNorm3d) and m.affine:
                m.weight.mul_(torch.exp(torch.empty(m.num_features).uniform_(-3, 1.6, generator=g)))


def _check_exact_and_even(net: nn.Module, expect_groups: int) -> None:
    net = net.eval()
    _spread_ranges(net)
    x = _inputs(1, seed=11)[0]
    with torch.no_grad():
        ref = net(x)
    groups = scalable_groups(net)
    assert len(groups) == expect_groups
    before = channel_ranges(net, groups, _inputs())
    smoothed = copy.deepcopy(net)
    report = smooth_activations(smoothed, _inputs(), alpha=1.0)
    assert report["activations"] == expect_groups
    with torch.no_grad():
        out = smoothed(x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    after = channel_ranges(smoothed, groups, _inputs())
    spread = lambda r: float(r[r > 0].max() / r[r > 0].min())  # noqa: E731
    worst_before = max(spread(r) for r in before.values())
    worst_after = max(spread(r) for r in after.values())
    # alpha 1 moves the whole range into the weights: every channel of an activation spans the
    # same range, where they spanned up to 100x apart
    assert worst_before > 20
    for key, r in after.items():
        # scales are clipped to 10x either side of their geometric mean
        assert spread(r) < 1.05 * max(1.0, spread(before[key]) / 10), key
    assert worst_after < worst_before / 10


def test_plain_unet_every_norm_and_transposed_conv_is_scalable():
    torch.manual_seed(0)
    net = small_unet()
    groups = {g.source: g for g in scalable_groups(net)}
    norms = [n for n, m in net.named_modules() if isinstance(m, nn.InstanceNorm3d)]
    transposed = [n for n, m in net.named_modules() if isinstance(m, nn.ConvTranspose3d)]
    assert set(norms + transposed) == set(groups)
    # the encoder's last activation of a stage feeds the next stage and, through the skip, the decoder
    skip = groups["encoder.stages.0.0.convs.1.norm"]
    assert len(skip.consumers) == 2 and {o for _, o in skip.consumers} == {0, 8}
    _check_exact_and_even(net, len(norms) + len(transposed))


def test_factorised_network_scales_its_projections_too():
    torch.manual_seed(0)
    net = compress_network(small_unet(), CompressionSpec(0.3, "paper"), patch_size=PATCH).network
    tucker = sum(isinstance(m, TuckerConv) for m in net.modules())
    assert tucker > 0
    groups = scalable_groups(net)
    convs = [g for g in groups if g.kind == "conv"]
    # each factorised layer's in-projection and core feed the next conv of the chain
    assert len(convs) >= 2 * tucker
    _check_exact_and_even(net, len(groups))


def test_residual_encoder_leaves_activations_read_by_an_add_alone():
    torch.manual_seed(0)
    features = [8, 16, 32]
    net = ResidualEncoderUNet(1, 3, features, nn.Conv3d, 3, [1, 2, 2], [1, 2, 2], 3, [1, 1], True,
                              nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU,
                              {"inplace": True}).eval()
    groups = scalable_groups(net)
    assert groups, "the decoder's plain blocks are scalable"
    readers = {path for g in groups for path, _ in g.consumers}
    # a residual block's second norm is added to the skip path before its nonlinearity: not scalable
    assert not any(g.source.endswith("conv2.norm") for g in groups)
    assert readers
    _check_exact_and_even(net, len(groups))


def test_untraceable_network_keeps_its_scales():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(1, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else -self.conv(x)  # data-dependent: torch.fx fails

    assert scalable_groups(Branchy()) == []
    assert smooth_activations(Branchy(), _inputs(1))["activations"] == 0


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_any_alpha_keeps_the_output(alpha):
    torch.manual_seed(0)
    net = small_unet().eval()
    _spread_ranges(net)
    x = _inputs(1, seed=11)[0]
    with torch.no_grad():
        ref = net(x)
        smoothed = copy.deepcopy(net)
        smooth_activations(smoothed, _inputs(), alpha=alpha)
        assert (smoothed(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
