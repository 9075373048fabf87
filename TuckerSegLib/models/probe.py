"""A default probe input for a model: what its network sees, without the user's data.

For CT models (nnU-Net's ``CTNormalization``) the probe is a patch of the built-in synthetic CT
phantom at the model's spacing, normalised with the model's own intensity statistics, so that
activations look like real ones. Other models get standard-normal noise (their inputs are
z-scored). Large patches are probed at half size per axis: sensitivities are ratios and barely
change, while eight times less compute keeps compression of a 1.5 mm network fast.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from TuckerSegLib.models.nnunet_folder import NnUNetModel, _plans_manager

MAX_PROBE_VOXELS = 80 ** 3


def probe_shape(patch_size: Sequence[int]) -> tuple:
    shape = tuple(int(p) for p in patch_size)
    if np.prod(shape) > MAX_PROBE_VOXELS:
        shape = tuple(max(1, s // 2) for s in shape)
    return shape


def _ct_patch(shape: Sequence[int], spacing: Sequence[float], props: dict, seed: int) -> np.ndarray:
    from scipy import ndimage

    from TuckerSegLib.demo.phantom import DEFAULT_SPACING, make_phantom

    ph = make_phantom(seed).image.astype(np.float32)
    zoom = [d / s for d, s in zip(DEFAULT_SPACING, spacing)]
    img = ndimage.zoom(ph, zoom, order=1)
    pads = [(max(0, (t - n + 1) // 2 + 1),) * 2 for t, n in zip(shape, img.shape)]
    img = np.pad(img, pads, constant_values=-1000.0)
    starts = [(n - t) // 2 for n, t in zip(img.shape, shape)]
    img = img[tuple(slice(s, s + t) for s, t in zip(starts, shape))]
    lo, hi = props.get("percentile_00_5", -1000.0), props.get("percentile_99_5", 1500.0)
    img = np.clip(img, lo, hi)
    return (img - props.get("mean", 0.0)) / max(props.get("std", 1.0), 1e-8)


def default_probe(model: NnUNetModel, seed: int = 0) -> torch.Tensor:
    """A (1, C, *probe_shape) input tensor for ``model``'s network."""
    shape = probe_shape(model.patch_size)
    pm = _plans_manager(model.plans)
    cm = pm.get_configuration(model.configuration)
    schemes = list(cm.normalization_schemes)
    props = pm.foreground_intensity_properties_per_channel
    channels = []
    for c in range(model.num_input_channels):
        scheme = schemes[c] if c < len(schemes) else schemes[-1]
        if scheme == "CTNormalization" and len(shape) == 3:
            spacing = [float(s) for s in cm.spacing]
            channels.append(_ct_patch(shape, spacing, props.get(str(c), {}), seed))
        else:
            channels.append(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))
    return torch.from_numpy(np.stack(channels)[None].astype(np.float32))
