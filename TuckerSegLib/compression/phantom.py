"""Synthetic abdominal CT phantoms with ground truth, so that the demo and its model need no data.

A phantom is a body outline (air outside, a subcutaneous fat layer, a muscle wall, a fat/bowel
mixture inside) holding organ-like structures with typical HU values of a portal-venous contrast CT: lungs,
liver, spleen, kidneys in perirenal fat, the aorta and a vertebral column of bone bodies
separated by discs. Every phantom is drawn from a seed: organ sizes and positions vary, the whole
anatomy is smoothly deformed, and the image gets partial-volume blur and noise.

Arrays are in NIfTI voxel order (i, j, k) = (patient left-right, posterior-anterior,
inferior-superior) with a RAS affine: +i towards the patient's left, +j anterior, +k superior.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np
from scipy import ndimage

LABEL_NAMES: Dict[int, str] = {
    0: "background",
    1: "liver",
    2: "spleen",
    3: "kidney_left",
    4: "kidney_right",
    5: "aorta",
    6: "vertebrae",
    7: "lung_left",
    8: "lung_right",
}

DEFAULT_SHAPE: Tuple[int, int, int] = (120, 90, 80)
DEFAULT_SPACING: Tuple[float, float, float] = (3.0, 3.0, 3.0)


@dataclass
class Phantom:
    """One synthetic CT: ``image`` in HU (int16), ``labels`` (uint8, ids in ``label_names``)."""

    image: np.ndarray
    labels: np.ndarray
    spacing: Tuple[float, float, float]
    affine: np.ndarray
    label_names: Dict[int, str]
    seed: int


def _ellipsoid(coords: Sequence[np.ndarray], centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Mask of an axis-aligned ellipsoid in millimetre coordinates."""
    acc = np.zeros(coords[0].shape, dtype=np.float32)
    for c, m, r in zip(coords, centre, radii):
        acc += ((c - m) / r) ** 2
    return acc <= 1.0


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], coarse: int, amplitude: float) -> np.ndarray:
    """A smooth random field (cubic upsampling of coarse noise), values roughly +-amplitude."""
    low = rng.standard_normal((coarse, coarse, coarse)).astype(np.float32)
    zoom = [s / coarse for s in shape]
    field = ndimage.zoom(low, zoom, order=3, mode="nearest")
    field = field[: shape[0], : shape[1], : shape[2]]
    return amplitude * field


def make_phantom(seed: int = 0, shape: Sequence[int] = DEFAULT_SHAPE,
                 spacing: Sequence[float] = DEFAULT_SPACING, noise_hu: float = 15.0) -> Phantom:
    """Draw one phantom from ``seed`` (same seed, same phantom)."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    extent = [n * s for n, s in zip(shape, spacing)]
    # Millimetre coordinates centred on the volume, then a smooth deformation of the anatomy.
    axes = [(np.arange(n, dtype=np.float32) + 0.5) * s - e / 2 for n, s, e in zip(shape, spacing, extent)]
    grid = np.meshgrid(*axes, indexing="ij")
    x, y, z = [g + _smooth_field(rng, shape, 4, 6.0) for g in grid]
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731

    half_z = extent[2] / 2
    # Body: elliptic cylinder, slightly varying along z, centred a little anterior.
    bx, by = u(0.38, 0.45) * extent[0], u(0.33, 0.40) * extent[1]
    bx_z = bx * (1 + 0.05 * z / half_z)
    body_c = (u(-8, 8), u(0, 12))
    r_body = np.sqrt(((x - body_c[0]) / bx_z) ** 2 + ((y - body_c[1]) / by) ** 2)
    body = r_body <= 1.0
    fat_thick = u(8, 20)
    subcut = body & (r_body > 1.0 - fat_thick / by)
    muscle = body & ~subcut & (r_body > 1.0 - (fat_thick + u(6, 12)) / by)

    labels = np.zeros(shape, dtype=np.uint8)
    # Organ centres relative to the body; sizes scaled per phantom.
    s = u(0.85, 1.15)
    cx, cy = body_c
    spine_y = cy - by * u(0.45, 0.55)

    # Lungs: upper part of the volume, both sides, posterior-weighted.
    lung_top = half_z * u(0.3, 0.5)
    for label, side in ((7, +1), (8, -1)):
        c = (cx + side * bx * u(0.42, 0.52), cy - by * 0.1, lung_top + half_z * 0.6)
        r = (bx * u(0.32, 0.38) * s, by * u(0.55, 0.65), half_z * u(0.75, 0.9))
        labels[_ellipsoid((x, y, z), c, r) & body] = label
    # Liver: large, patient right (-x), below the right lung, wedge cut on its medial-inferior side.
    c = (cx - bx * u(0.35, 0.45), cy + by * u(-0.05, 0.15), lung_top - half_z * u(0.05, 0.2))
    r = (bx * u(0.40, 0.48) * s, by * u(0.55, 0.7) * s, half_z * u(0.35, 0.45) * s)
    liver = _ellipsoid((x, y, z), c, r) & ((x - c[0]) - 0.8 * (z - c[2]) < r[0] * 0.6)
    labels[liver & body] = 1
    # Spleen: patient left, posterior, level with the upper liver.
    c = (cx + bx * u(0.5, 0.62), spine_y + by * u(0.3, 0.45), lung_top - half_z * u(0.05, 0.2))
    r = (bx * u(0.13, 0.17) * s, by * u(0.25, 0.32) * s, half_z * u(0.2, 0.28) * s)
    labels[_ellipsoid((x, y, z), c, r) & body] = 2
    # Kidneys: beside the spine, posterior, below the liver; perirenal fat around them.
    kidney_z = lung_top - half_z * u(0.45, 0.6)
    perirenal = np.zeros(shape, dtype=bool)
    for label, side in ((3, +1), (4, -1)):
        c = (cx + side * bx * u(0.3, 0.38), spine_y + by * u(0.2, 0.3), kidney_z + side * u(0, 10))
        r = np.array([bx * u(0.13, 0.16), by * u(0.16, 0.2), half_z * u(0.3, 0.4)]) * s
        perirenal |= _ellipsoid((x, y, z), c, r + 6.0)
        labels[_ellipsoid((x, y, z), c, r) & body & (labels == 0)] = label
    # Vertebral column: bone bodies separated by discs, posterior midline, full height.
    vert_c = (cx + u(-4, 4), spine_y)
    vert_r = u(14, 19) * s
    column = ((x - vert_c[0]) ** 2 + (y - vert_c[1]) ** 2) <= vert_r ** 2
    period = u(26, 32)
    phase = u(0, period)
    disc = np.mod(z + phase, period) < u(5, 7)
    vertebrae = column & ~disc
    # Posterior process: a block behind each body.
    process = (np.abs(x - vert_c[0]) < vert_r * 0.35) & (y < vert_c[1] - vert_r * 0.8) & \
              (y > vert_c[1] - vert_r * 2.2) & ~disc
    vertebrae = (vertebrae | process) & body
    labels[vertebrae] = 6
    # Aorta: tube left-anterior of the spine along the whole height.
    ao_c = (vert_c[0] + u(8, 16), vert_c[1] + vert_r + u(8, 14))
    ao_r = u(9, 13)
    aorta = (((x - ao_c[0]) ** 2 + (y - ao_c[1]) ** 2) <= ao_r ** 2) & body
    labels[aorta & (labels != 6)] = 5

    # Intensities (HU), with per-phantom jitter of each tissue.
    image = np.full(shape, -1000.0, dtype=np.float32)
    interior = body & ~subcut & ~muscle
    mixture = _smooth_field(rng, shape, 10, 1.0)
    image[interior] = np.where(mixture[interior] > 0.2, u(15, 35), u(-110, -80))
    image[subcut] = u(-110, -90)
    image[muscle] = u(45, 60)
    image[perirenal & interior & (labels == 0)] = u(-110, -90)
    # Portal-venous contrast phase (as in most abdominal CTs): enhanced liver, spleen, kidneys
    # and aorta; bone, lungs and fat as without contrast.
    tissue_hu = {1: u(95, 115), 2: u(110, 130), 3: u(150, 190), 4: u(150, 190), 5: u(160, 210),
                 6: u(400, 700), 7: u(-870, -830), 8: u(-870, -830)}
    for label, hu in tissue_hu.items():
        image[labels == label] = hu
    # Cortical rim of the vertebrae: denser bone on their surface.
    rim = (labels == 6) & ~ndimage.binary_erosion(labels == 6, iterations=1)
    image[rim] = u(700, 900)
    image = ndimage.gaussian_filter(image, sigma=0.6)
    image += rng.normal(0.0, noise_hu, size=shape).astype(np.float32) * body
    image += rng.normal(0.0, 3.0, size=shape).astype(np.float32) * ~body
    image = np.clip(image, -1024, 3071).astype(np.int16)

    affine = np.diag([spacing[0], spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [-e / 2 for e in extent]
    return Phantom(image=image, labels=labels, spacing=spacing, affine=affine,
                   label_names=dict(LABEL_NAMES), seed=seed)


def _atomic_save(nifti, path: Path) -> None:
    """Write a NIfTI through a temporary file in the same folder, then rename."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        nib.save(nifti, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """Save an array as NIfTI with ``affine`` (atomic write)."""
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    if np.issubdtype(array.dtype, np.integer):
        img.header.set_data_dtype(array.dtype)
    _atomic_save(img, Path(path))
    return Path(path)


def write_phantom(phantom: Phantom, image_path: Path, labels_path: Path | None = None) -> Tuple[Path, Path | None]:
    """Write the phantom's CT (and its ground-truth labels) as NIfTI files."""
    save_nifti(phantom.image, phantom.affine, image_path)
    if labels_path is not None:
        save_nifti(phantom.labels, phantom.affine, labels_path)
    return Path(image_path), (Path(labels_path) if labels_path is not None else None)
