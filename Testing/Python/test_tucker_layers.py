"""Tucker-2 math and the factorised layer: exact at full rank, error falls as rank rises."""
import pytest
import torch
from torch import nn

from TuckerSegLib.decomposition.tucker import mode_spectra, tucker2
from TuckerSegLib.network.tucker_conv import TuckerConv, conv_layout_weight

CASES = [
    ("conv3d", lambda b: nn.Conv3d(12, 10, 3, padding=1, bias=b)),
    ("conv3d_strided", lambda b: nn.Conv3d(12, 10, 3, stride=2, padding=1, bias=b)),
    ("conv3d_dilated_nopad", lambda b: nn.Conv3d(12, 10, (3, 3, 1), dilation=2, bias=b)),
    ("conv3d_anisotropic_stride", lambda b: nn.Conv3d(12, 10, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=b)),
    ("convtranspose3d", lambda b: nn.ConvTranspose3d(12, 10, 2, stride=2, bias=b)),
    ("convtranspose3d_padded", lambda b: nn.ConvTranspose3d(12, 10, 3, stride=2, padding=1, output_padding=1, bias=b)),
    ("conv2d", lambda b: nn.Conv2d(12, 10, 3, padding=1, bias=b)),
    ("convtranspose2d", lambda b: nn.ConvTranspose2d(12, 10, 2, stride=2, bias=b)),
]


def _input(conv):
    torch.manual_seed(1)
    dims = conv.weight.dim() - 2
    return torch.randn(2, conv.in_channels, *([9] * dims))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name,make", CASES, ids=[c[0] for c in CASES])
def test_full_rank_is_exact(name, make, bias):
    torch.manual_seed(0)
    conv = make(bias).double()
    w = conv_layout_weight(conv)
    for method in ("hosvd", "hooi"):
        factors = tucker2(w, (w.shape[0], w.shape[1]), method=method)
        layer = TuckerConv.from_factors(conv, factors)
        x = _input(conv).double()
        assert torch.allclose(layer(x), conv(x), atol=1e-9), method
        assert torch.allclose(layer.reconstruct(), conv.weight, atol=1e-9)
        assert (layer.last.bias is not None) == bias


@pytest.mark.parametrize("name,make", CASES[:5], ids=[c[0] for c in CASES[:5]])
def test_error_falls_as_rank_rises(name, make):
    torch.manual_seed(0)
    conv = make(True)
    w = conv_layout_weight(conv)
    x = _input(conv)
    with torch.no_grad():
        ref = conv(x)
    errors, out_errors = [], []
    for r_out, r_in in ((2, 2), (4, 4), (6, 6), (8, 8), (10, 12)):
        f = tucker2(w, (r_out, r_in))
        errors.append(f.relative_error(w))
        layer = TuckerConv.from_factors(conv, f)
        with torch.no_grad():
            out_errors.append(float((layer(x) - ref).norm() / ref.norm()))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-5
    assert out_errors[0] > out_errors[-1]


def test_hosvd_error_within_bound_and_hooi_not_worse():
    torch.manual_seed(0)
    w = torch.randn(32, 24, 3, 3, 3, dtype=torch.float64)
    sp = mode_spectra(w)
    h = tucker2(w, (8, 6), "hosvd", spectra=sp)
    o = tucker2(w, (8, 6), "hooi")
    assert h.relative_error(w) ** 2 <= sp.error_bound(8, 6) + 1e-12
    assert o.relative_error(w) <= h.relative_error(w) + 1e-9


def test_energy_rank():
    w = torch.zeros(8, 8, 1, 1, 1, dtype=torch.float64)
    w[0, 0] = 3.0
    w[1, 1] = 1.0
    sp = mode_spectra(w)
    assert sp.rank_for_energy(0.8, "out") == 1  # 9 / 10 of the energy in one direction
    assert sp.rank_for_energy(0.95, "out") == 2


def test_bad_ranks_rejected():
    with pytest.raises(ValueError):
        tucker2(torch.randn(4, 4, 3, 3, 3), (5, 2))
