"""Segmentation agreement metrics: per-class Dice and normalised surface Dice (NSD).

Conventions (chosen so that averages over classes stay meaningful):

- Both masks empty (the structure is absent in both): Dice = NSD = 1.0 (perfect agreement).
- Exactly one mask empty: Dice = NSD = 0.0.

NSD follows Nikolov et al. (2021) on a voxel grid: the surface of a mask is its set of voxels
with at least one 6-neighbour outside the mask (voxels on the image border count as surface);
distances are Euclidean in millimetres (``spacing`` aware, scipy's exact distance transform).
NSD = (surface voxels of A within ``tolerance_mm`` of B's surface + those of B within tolerance
of A's surface) / (surface voxels of A + surface voxels of B).
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

_SIX_CONNECTED = ndimage.generate_binary_structure(3, 1)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty, 0.0 when only one is."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    size = int(a.sum()) + int(b.sum())
    if size == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / size


def surface(mask: np.ndarray) -> np.ndarray:
    """Boolean mask of the surface voxels of ``mask`` (voxels with a 6-neighbour outside)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        structure = ndimage.generate_binary_structure(mask.ndim, 1)
    else:
        structure = _SIX_CONNECTED
    eroded = ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return mask & ~eroded


def _crop_box(a: np.ndarray, b: np.ndarray, margin: Sequence[int]) -> Tuple[slice, ...]:
    """The bounding box of a | b grown by ``margin`` voxels per axis (clipped to the image)."""
    union = a | b
    coords = [np.flatnonzero(union.any(axis=tuple(j for j in range(union.ndim) if j != i)))
              for i in range(union.ndim)]
    return tuple(slice(max(int(c[0]) - m, 0), min(int(c[-1]) + m + 1, n))
                 for c, m, n in zip(coords, margin, union.shape))


def surface_dice(a: np.ndarray, b: np.ndarray, spacing: Sequence[float],
                 tolerance_mm: float = 2.0) -> float:
    """Normalised surface Dice of two boolean masks at ``tolerance_mm`` (see module docstring)."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != a.ndim:
        raise ValueError(f"spacing has {len(spacing)} values for a {a.ndim}-D mask")
    any_a, any_b = bool(a.any()), bool(b.any())
    if not any_a and not any_b:
        return 1.0
    if not any_a or not any_b:
        return 0.0
    # Only the neighbourhood of the two masks matters: crop (with a margin beyond the tolerance
    # so that the image border does not create false surface or cut distances short).
    margin = [int(np.ceil(tolerance_mm / s)) + 2 for s in spacing]
    box = _crop_box(a, b, margin)
    a, b = a[box], b[box]
    # Surface voxels at the crop border are real image border only where the crop touches it;
    # the margin keeps the masks away from artificial crop edges.
    sa, sb = surface(a), surface(b)
    dist_to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
    dist_to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)
    close_a = int((dist_to_b[sa] <= tolerance_mm).sum())
    close_b = int((dist_to_a[sb] <= tolerance_mm).sum())
    return (close_a + close_b) / float(sa.sum() + sb.sum())


def per_class_scores(pred: np.ndarray, ref: np.ndarray, labels: Iterable[int],
                     spacing: Sequence[float], tolerance_mm: float = 2.0,
                     with_nsd: bool = True) -> Dict[int, Dict[str, float]]:
    """Dice (and NSD) of each label id in ``labels`` between two integer label maps.

    Returns ``{label: {"dice": float, "nsd": float, "pred_voxels": int, "ref_voxels": int}}``.
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"label map shapes differ: {pred.shape} vs {ref.shape}")
    scores: Dict[int, Dict[str, float]] = {}
    for label in labels:
        label = int(label)
        a = pred == label
        b = ref == label
        entry: Dict[str, float] = {"dice": dice(a, b), "pred_voxels": int(a.sum()),
                                   "ref_voxels": int(b.sum())}
        if with_nsd:
            entry["nsd"] = surface_dice(a, b, spacing, tolerance_mm)
        scores[label] = entry
    return scores


def mean_score(scores: Dict[int, Dict[str, float]], key: str = "dice",
               present_only: bool = False) -> Optional[float]:
    """Mean of ``key`` over classes; ``present_only`` skips classes empty in both maps."""
    values = [s[key] for s in scores.values()
              if key in s and (not present_only or s["pred_voxels"] + s["ref_voxels"] > 0)]
    return float(np.mean(values)) if values else None
