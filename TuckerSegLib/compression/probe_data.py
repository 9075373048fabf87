"""What compression measures on (``CompressionData``), and its defaults without the user's data.

``CompressionData`` holds a probe batch and validation volumes (the ``budget`` policy) or
activation statistics of the user's CTs (``Calibration``, see ``compression.calibration``).

For CT models (nnU-Net's ``CTNormalization``) the probe is a patch of the built-in synthetic CT
phantom at the model's spacing, normalised with the model's own intensity statistics, so that
activations look like real ones. Other models get standard-normal noise (their inputs are
z-scored). Large patches are probed at half size per axis: sensitivities are ratios and barely
change, while eight times less compute keeps compression of a 1.5 mm network fast. Small patches
(under ``MAX_PROBE_VOXELS`` together) are probed as a batch of up to ``MAX_PROBE_PATCHES``: the
centre of one phantom and windows anywhere in others (body edges and air included, as nnU-Net's
sliding window sees them), so that choices made on the probe do not fit one centred patch.

``default_validation`` gives whole phantom CTs, preprocessed by nnU-Net's own preprocessor: what
the budget policy's refinement must also improve before it keeps a trade (the probe proposes,
whole volumes through the sliding window decide; see ``compression.search``).
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from TuckerSegLib.compression.search import ValidationSet
from TuckerSegLib.decomposition.tucker import ModeSpectra, Tucker2
from TuckerSegLib.models.nnunet_folder import NnUNetModel, plans_manager


class Calibration(Protocol):
    """Data-aware factorisation (e.g. ``TuckerSegLib.compression.calibration.CalibrationStats``).

    Each method may return None for a layer it has no data for; plain HOSVD is used there.
    """

    def spectra(self, name: str, conv: nn.Module) -> Optional[ModeSpectra]:
        """Spectra that drive rank allocation (``budget``, ``energy``) for this layer."""

    def factorise(self, name: str, conv: nn.Module, ranks: Tuple[int, int]) -> Optional[Tucker2]:
        """Factors of this layer at ``ranks`` (conv layout)."""

    def output_error(self, name: str, conv: nn.Module, factors: Tucker2) -> Optional[float]:
        """Estimated relative output error of the factors on the calibration data."""

    def describe(self) -> dict:
        """JSON summary recorded as the report's ``calibration``."""


@dataclass
class CompressionData:
    """What ranks and factors are measured on (all optional; see ``compress_network``)."""

    probe: Optional[torch.Tensor] = None
    validation: Optional[ValidationSet] = None
    calibration: Optional[Calibration] = None
    # ``{layer: (s_out, s_in)}`` measured on ``probe`` (``compression.sensitivity``). They do not
    # depend on the ratio: given here, they are used instead of probing again; measured, they are
    # stored here, so that a caller can keep them for the model's next ratio.
    sensitivities: Optional[Dict[str, Tuple[float, float]]] = None


MAX_PROBE_VOXELS = 80 ** 3
MAX_PROBE_PATCHES = 4
# Whole phantoms for validation: seeds apart from the probe's (0-3), the demo model's training
# (0-39) and validation (10000-10003) phantoms, the demo's CT (2024) and compare_policies' (20000+).
VALIDATION_SEEDS = (300, 301, 302, 303)


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

    from TuckerSegLib.compression.phantom import DEFAULT_SPACING, make_phantom

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
    pm = plans_manager(model.plans)
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


def default_validation(model: NnUNetModel, seeds: Sequence[int] = VALIDATION_SEEDS,
                       torso: bool = False) -> ValidationSet:
    """Phantom CTs preprocessed as nnU-Net's predictor does (transpose, crop, resample, CT
    normalisation with the model's statistics); empty for models that are not 3-D single-channel CT.
    ``torso``: phantoms with the thorax and back (``phantom.make_phantom``), for measurements that
    must see the structures of every part of ``total`` (quality curves, INT8)."""
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    from TuckerSegLib.compression.phantom import DEFAULT_SHAPE, DEFAULT_SPACING, make_phantom

    pm = plans_manager(model.plans)
    cm = pm.get_configuration(model.configuration)
    if model.num_input_channels != 1 or len(cm.patch_size) != 3 or \
            list(cm.normalization_schemes)[:1] != ["CTNormalization"]:
        return ValidationSet((), list)
    order = list(pm.transpose_forward)
    nnunet_shape = [DEFAULT_SHAPE[::-1][i] for i in order]  # nnU-Net reads NIfTI as (z, y, x)
    nnunet_spacing = [DEFAULT_SPACING[::-1][i] for i in order]
    shape = tuple(int(n) for n in compute_new_shape(nnunet_shape, nnunet_spacing, cm.spacing))

    def build() -> List[torch.Tensor]:
        preprocessor = cm.preprocessor_class(verbose=False)
        volumes = []
        for seed in seeds:
            ph = make_phantom(seed, torso=torso)
            image = np.asarray(ph.image, dtype=np.float32).transpose(2, 1, 0)[None]
            props = {"spacing": [float(s) for s in ph.spacing[::-1]]}
            with contextlib.redirect_stdout(io.StringIO()):
                data, _, _ = preprocessor.run_case_npy(image, None, props, pm, cm, model.dataset_json)
            volumes.append(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)))
        return volumes

    return ValidationSet(tuple((1, *shape) for _ in seeds), build)


def budget_inputs(model: NnUNetModel) -> CompressionData:
    """What the ``budget`` policy measures on for ``model``: the probe and the validation volumes."""
    return CompressionData(probe=default_probe(model), validation=default_validation(model))
