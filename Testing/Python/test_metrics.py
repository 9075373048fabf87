"""Dice and normalised surface Dice against cases computed by hand."""
from __future__ import annotations

import numpy as np
import pytest

from TuckerSegLib.evaluation.metrics import dice, mean_score, per_class_scores, surface, surface_dice


def _empty(shape=(10, 10, 10)):
    return np.zeros(shape, dtype=bool)


def test_empty_conventions():
    e = _empty()
    one = e.copy()
    one[5, 5, 5] = True
    assert dice(e, e) == 1.0
    assert surface_dice(e, e, (1, 1, 1), 1.0) == 1.0
    assert dice(e, one) == 0.0 and dice(one, e) == 0.0
    assert surface_dice(e, one, (1, 1, 1), 1.0) == 0.0
    assert surface_dice(one, e, (1, 1, 1), 1.0) == 0.0


def test_single_voxel():
    a = _empty()
    a[5, 5, 5] = True
    b = _empty()
    b[5, 5, 6] = True
    assert dice(a, a) == 1.0
    assert surface_dice(a, a, (1, 1, 1), 0.0) == 1.0
    # Disjoint voxels: no overlap, but their centres are 1 voxel apart.
    assert dice(a, b) == 0.0
    assert surface_dice(a, b, (1, 1, 1), 1.0) == 1.0
    assert surface_dice(a, b, (1, 1, 1), 0.99) == 0.0
    # Spacing matters: along the last axis the voxels are 3 mm apart.
    assert surface_dice(a, b, (1, 1, 3), 2.0) == 0.0
    assert surface_dice(a, b, (1, 1, 3), 3.0) == 1.0


def test_shifted_cube_dice():
    a = _empty((12, 12, 12))
    a[2:6, 2:6, 2:6] = True            # 64 voxels
    b = np.roll(a, 1, axis=0)          # overlap 3 x 4 x 4 = 48
    assert dice(a, b) == pytest.approx(2 * 48 / 128)


def test_shifted_cube_surface_dice():
    a = _empty((12, 12, 12))
    a[2:6, 2:6, 2:6] = True
    b = np.roll(a, 1, axis=0)
    # Surface of a 4^3 cube: 64 - 2^3 interior = 56 voxels.
    assert int(surface(a).sum()) == 56
    # Shift by one voxel: every surface voxel lies within 1 voxel of the other surface.
    assert surface_dice(a, b, (1, 1, 1), 1.0) == 1.0
    # Tolerance 0: only coincident surface voxels count. a spans x=2..5, b x=3..6.
    # a's surface: face x=2 (16), rings x=3, x=4 (12 each), face x=5 (16) = 56.
    # Of these, on b's surface (face x=3, rings x=4, x=5, face x=6): 0 + 12 + 12 + 12 = 36.
    # By symmetry 36 of b's 56 lie on a's surface.
    assert surface_dice(a, b, (1, 1, 1), 0.0) == pytest.approx((36 + 36) / 112)


def test_far_apart_surface_dice_is_zero_and_spacing_scales():
    a = _empty((20, 20, 20))
    a[2:5, 2:5, 2:5] = True
    b = _empty((20, 20, 20))
    b[12:15, 2:5, 2:5] = True          # 8 voxels gap along axis 0 (centre faces 8 apart)
    assert surface_dice(a, b, (1, 1, 1), 5.0) == 0.0
    assert surface_dice(a, b, (1, 1, 1), 8.0) > 0.0
    # With 0.5 mm along axis 0, the closest faces are 4 mm apart.
    assert surface_dice(a, b, (0.5, 1, 1), 4.0) > 0.0
    assert surface_dice(a, b, (0.5, 1, 1), 3.9) == 0.0


def test_per_class_and_mean():
    ref = np.zeros((8, 8, 8), dtype=np.uint8)
    ref[1:4, 1:4, 1:4] = 1
    ref[5:7, 5:7, 5:7] = 2
    pred = ref.copy()
    pred[5:7, 5:7, 5:7] = 0            # class 2 missed entirely
    scores = per_class_scores(pred, ref, [1, 2, 3], (1, 1, 1), 1.0)
    assert scores[1]["dice"] == 1.0 and scores[1]["nsd"] == 1.0
    assert scores[2]["dice"] == 0.0 and scores[2]["nsd"] == 0.0
    assert scores[3]["dice"] == 1.0 and scores[3]["ref_voxels"] == 0   # absent in both
    assert mean_score(scores) == pytest.approx(2 / 3)
    assert mean_score(scores, present_only=True) == pytest.approx(0.5)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        dice(_empty((3, 3, 3)), _empty((3, 3, 4)))


def test_argmax_labels_is_torchs_argmax():
    """The fast class argmax gives torch's labels: first maximum on ties, NaN where torch points
    at NaN, any class axis, GPU-free fallbacks for integers and too many classes."""
    import torch

    from TuckerSegLib.network.labels import argmax_labels

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 5, 6, 4, generator=g)
    assert torch.equal(argmax_labels(x), x.argmax(1))
    assert torch.equal(argmax_labels(x, 2), x.argmax(2))
    ties = torch.randint(0, 3, (1, 9, 8, 8, 8), generator=g).float()
    assert torch.equal(argmax_labels(ties), ties.argmax(1))
    assert torch.equal(argmax_labels(ties.half(), dtype=torch.uint8), ties.argmax(1).to(torch.uint8))
    x[1, 3, 2, 2, 2] = float("nan")
    assert torch.equal(argmax_labels(x), x.argmax(1))
    many = torch.randn(1, 300, 3, 3, 3, generator=g)
    assert torch.equal(argmax_labels(many), many.argmax(1))
    ints = torch.randint(0, 5, (1, 4, 3, 3, 3), generator=g)
    assert torch.equal(argmax_labels(ints), ints.argmax(1))
