"""Synthetic abdominal CT phantoms with ground truth, so that the demo and its model need no data.

A phantom is a body outline (air outside, a subcutaneous fat layer, a muscle wall, a fat/bowel
mixture inside) holding organ-like structures with typical HU values of a portal-venous contrast CT: lungs,
liver, spleen, kidneys in perirenal fat, the aorta and a vertebral column of bone bodies
separated by discs. Every phantom is drawn from a seed: organ sizes and positions vary, the whole
anatomy is smoothly deformed, and the image gets partial-volume blur and noise.

``torso=True`` adds the thorax and back that TotalSegmentator's other parts segment: ribs that
descend anteriorly into costal cartilages, a sternum, the heart (myocardium around contrast-filled
chambers), a neural arch around the spinal cord, and the paraspinal (autochthon) muscles. Why:
a quality target judges a network only on data where the original finds its structures, and
the ribs, cardiac and muscle networks find little in an abdomen. The additions come from their
own random stream, so the abdominal anatomy of a seed (the demo model's training data) is the
same either way.

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
TORSO_LABEL_NAMES: Dict[int, str] = {
    **LABEL_NAMES,
    9: "heart",
    10: "ribs",
    11: "costal_cartilages",
    12: "sternum",
    13: "spinal_cord",
    14: "autochthon",
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
                 spacing: Sequence[float] = DEFAULT_SPACING, noise_hu: float = 15.0,
                 torso: bool = False) -> Phantom:
    """Draw one phantom from ``seed`` (same seed, same phantom); ``torso``: with the thorax and
    back added (labels in ``TORSO_LABEL_NAMES``)."""
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
    muscle_thick = u(6, 12)
    muscle = body & ~subcut & (r_body > 1.0 - (fat_thick + muscle_thick) / by)

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
    liver_top = c[2] + r[2]
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
    if torso:
        torso_hu = _add_torso(np.random.default_rng([seed, 1]), labels, (x, y, z), body, r_body,
                              dict(cx=cx, cy=cy, bx=bx_z, by=by, wall=fat_thick + muscle_thick, s=s,
                                   half_z=half_z, lung_top=lung_top, liver_top=liver_top,
                                   vert_c=vert_c, vert_r=vert_r))

    # Intensities (HU), with per-phantom jitter of each tissue.
    image = np.full(shape, -1000.0, dtype=np.float32)
    interior = body & ~subcut & ~muscle
    mixture = _smooth_field(rng, shape, 10, 1.0)
    image[interior] = np.where(mixture[interior] > 0.2, u(15, 35), u(-110, -80))
    image[subcut] = u(-110, -90)
    muscle_hu = u(45, 60)
    image[muscle] = muscle_hu
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
    if torso:
        for label in sorted(set(TORSO_LABEL_NAMES) - set(LABEL_NAMES)):
            image[labels == label] = muscle_hu + torso_hu[label] if label == 14 else torso_hu[label]
        for label in (10, 12):  # cortical bone on the surface of ribs and sternum
            bone = labels == label
            image[bone & ~ndimage.binary_erosion(bone, iterations=1)] = torso_hu["cortex"]
        image[(labels == 9) & ~torso_hu["chambers"]] = torso_hu["myocardium"]
    image = ndimage.gaussian_filter(image, sigma=0.6)
    image += rng.normal(0.0, noise_hu, size=shape).astype(np.float32) * body
    image += rng.normal(0.0, 3.0, size=shape).astype(np.float32) * ~body
    image = np.clip(image, -1024, 3071).astype(np.int16)

    affine = np.diag([spacing[0], spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [-e / 2 for e in extent]
    return Phantom(image=image, labels=labels, spacing=spacing, affine=affine,
                   label_names=dict(TORSO_LABEL_NAMES if torso else LABEL_NAMES), seed=seed)


def _add_torso(rng: np.random.Generator, labels: np.ndarray, coords: Sequence[np.ndarray],
               body: np.ndarray, r_body: np.ndarray, g: dict) -> dict:
    """Draw the thorax and back into ``labels`` (geometry ``g`` of the abdominal phantom); return
    their HU: per label, plus ``cortex``, ``myocardium`` and the heart's ``chambers`` mask."""
    x, y, z = coords
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    cx, cy, bx, by, s = g["cx"], g["cy"], g["bx"], g["by"], g["s"]
    (vx, vy), vr = g["vert_c"], g["vert_r"]
    free = lambda *keep: ~np.isin(labels, keep)  # noqa: E731  (voxels not held by ``keep``)

    # Neural arch around the spinal canal, behind each vertebral body; the cord inside it.
    canal_y = vy - 1.2 * vr
    d_canal = np.sqrt((x - vx) ** 2 + (y - canal_y) ** 2)
    labels[(d_canal <= 0.7 * vr) & (d_canal > 0.38 * vr) & body & free(5)] = 6
    labels[(d_canal <= 0.38 * vr) & body] = 13
    # Paraspinal muscles either side of the arch, the whole height, inside the muscle wall.
    wall_inner = 1.0 - g["wall"] / by
    beside = (np.abs(x - vx) > 0.7 * vr) & (np.abs(x - vx) < u(2.2, 2.8) * vr)
    labels[beside & (y < vy - 0.5 * vr) & (r_body <= wall_inner) & body & (labels == 0)] = 14

    # Heart: above the liver's dome, left of the midline, anterior; it displaces the lungs.
    hz = min(g["liver_top"] + u(30, 45), g["half_z"] - 25.0)
    hc = (cx + bx * u(0.05, 0.15), cy + by * u(0.10, 0.25), hz)
    hr = np.array([u(48, 60), u(40, 50), u(42, 52)]) * s
    heart = _ellipsoid((x, y, z), hc, hr) & body & free(5, 6)
    labels[heart] = 9
    chambers = _ellipsoid((x, y, z), hc, hr - u(8, 12)) & heart

    # Ribs: bands just inside the muscle wall that descend anteriorly, from above the lungs' base
    # to the lower ribs beside the liver and spleen; cartilage joins them to the sternum.
    theta = np.arctan2(y - cy, (x - cx) * by / bx)
    anterior = (1.0 + np.sin(theta)) / 2.0  # 0 at the back, 1 at the front
    depth = u(7, 10) / by
    shell = (r_body <= wall_inner) & (r_body > wall_inner - depth) & body
    pitch, height, drop = u(22, 27), u(8, 11), u(30, 45)
    level = z + drop * anterior
    bottom = g["lung_top"] - g["half_z"] * u(0.35, 0.55)
    band = shell & (np.mod(level - u(0, pitch), pitch) < height) & (level > bottom)
    band &= ~((np.abs(x - vx) < 1.8 * vr) & (y < vy))  # ribs start beside the spine
    sternum_w = u(12, 17)
    cartilage_from = u(0.82, 0.88)
    # (over lungs, liver, spleen and muscle, which the ribs enclose; never over other bone or vessels)
    labels[band & (anterior < cartilage_from) & np.isin(labels, (0, 1, 2, 7, 8, 14))] = 10
    labels[band & (anterior >= cartilage_from) & (np.abs(x - cx) >= sternum_w) & (labels == 0)] = 11
    sternum = shell & (anterior >= cartilage_from) & (np.abs(x - cx) < sternum_w) & \
        (z > hz - hr[2]) & (labels == 0)
    labels[sternum] = 12

    return {9: u(140, 190), 10: u(250, 400), 11: u(90, 160), 12: u(250, 400), 13: u(20, 40),
            14: u(-5, 5), "cortex": u(650, 900), "myocardium": u(90, 120), "chambers": chambers}


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
