"""A default probe input for a model: what its network sees, without the user's data.

For CT models (nnU-Net's ``CTNormalization``) the probe is a patch of the built-in synthetic CT
phantom at the model's spacing, normalised with the model's own intensity statistics, so that
activations look like real ones. Other models get standard-normal noise (their inputs are
z-scored). Large patches are probed at half size per axis: sensitivities are ratios and barely
change, while eight times less compute keeps compression of a 1.5 mm network fast. Small patches
(under ``MAX_PROBE_VOXELS`` together) are probed as a batch of up to ``MAX_PROBE_PATCHES``: the
centre of one phantom and windows anywhere in others (body edges and air included, as nnU-Net's
sliding window sees them), so that choices made on the probe do not fit one centred patch.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from TuckerSegLib.models.nnunet_folder import NnUNetModel, _plans_manager

MAX_PROBE_VOXELS = 80 ** 3
MAX_PROBE_PATCHES = 4


def probe_shape(patch_size: Sequence[int], total_strides: Sequence[int]) -> tuple:
    """The patch, or about half of it per axis when large, kept a multiple of the network's
    total downsampling on each axis (so that skip connections line up)."""
    shape = tuple(int(p) for p in patch_size)
    if np.prod(shape) <= MAX_PROBE_VOXELS:
        return shape
    return tuple(max(s, int(round(p / 2 / s)) * s) for p, s in zip(shape, total_strides))


def _ct_patch(shape: Sequence[int], spacing: Sequence[float], props: dict, seed: int,
              shift: bool = False) -> np.ndarray:
    """A crop of phantom ``seed`` at ``spacing``: centred, or anywhere at random (edges included,
    as the sliding window sees them)."""
    from scipy import ndimage

    from TuckerSegLib.demo.phantom import DEFAULT_SPACING, make_phantom

    ph = make_phantom(seed).image.astype(np.float32)
    zoom = [d / s for d, s in zip(DEFAULT_SPACING, spacing)]
    img = ndimage.zoom(ph, zoom, order=1)
    pads = [(max(0, (t - n + 1) // 2 + 1),) * 2 for t, n in zip(shape, img.shape)]
    img = np.pad(img, pads, constant_values=-1000.0)
    starts = [(n - t) // 2 for n, t in zip(img.shape, shape)]
    if shift:
        rng = np.random.default_rng(seed)
        starts = [int(rng.integers(0, 2 * st + 1)) for st in starts]
    img = img[tuple(slice(s, s + t) for s, t in zip(starts, shape))]
    lo, hi = props.get("percentile_00_5", -1000.0), props.get("percentile_99_5", 1500.0)
    img = np.clip(img, lo, hi)
    return (img - props.get("mean", 0.0)) / max(props.get("std", 1.0), 1e-8)


def default_probe(model: NnUNetModel, seed: int = 0) -> torch.Tensor:
    """A (N, C, *probe_shape) input batch for ``model``'s network (N = 1 for large patches)."""
    pm = _plans_manager(model.plans)
    cm = pm.get_configuration(model.configuration)
    strides = np.prod(np.array(cm.pool_op_kernel_sizes, dtype=int), axis=0)
    shape = probe_shape(model.patch_size, [int(s) for s in strides])
    count = max(1, min(MAX_PROBE_PATCHES, MAX_PROBE_VOXELS // int(np.prod(shape))))
    schemes = list(cm.normalization_schemes)
    props = pm.foreground_intensity_properties_per_channel
    batch = []
    for i in range(count):
        channels = []
        for c in range(model.num_input_channels):
            scheme = schemes[c] if c < len(schemes) else schemes[-1]
            if scheme == "CTNormalization" and len(shape) == 3:
                spacing = [float(s) for s in cm.spacing]
                channels.append(_ct_patch(shape, spacing, props.get(str(c), {}), seed + i, shift=i > 0))
            else:
                channels.append(np.random.default_rng(seed + i).standard_normal(shape).astype(np.float32))
        batch.append(np.stack(channels))
    return torch.from_numpy(np.stack(batch).astype(np.float32))
