"""Synthetic phantoms: seeded, anatomically ordered, realistic HU, valid NIfTI geometry."""
from __future__ import annotations

import numpy as np

from TuckerSegLib.compression.phantom import LABEL_NAMES, make_phantom, write_phantom


def test_phantom_is_seeded_and_varies():
    a, b, c = make_phantom(3), make_phantom(3), make_phantom(4)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)


def test_phantom_content_is_plausible():
    p = make_phantom(0)
    assert p.image.dtype == np.int16 and p.labels.dtype == np.uint8
    assert p.image.shape == p.labels.shape
    assert set(np.unique(p.labels)) == set(LABEL_NAMES)            # every structure present
    median = {LABEL_NAMES[k]: float(np.median(p.image[p.labels == k])) for k in LABEL_NAMES if k}
    assert 80 < median["liver"] < 130 and 90 < median["spleen"] < 150
    assert median["lung_left"] < -700 and median["lung_right"] < -700
    assert median["vertebrae"] > 300
    assert median["aorta"] > 120
    # Air outside the body in the corners; the liver is on the patient's right (-x, RAS).
    assert p.image[0, 0, 0] < -900
    xs_liver = np.nonzero(p.labels == 1)[0].mean()
    xs_spleen = np.nonzero(p.labels == 2)[0].mean()
    assert xs_liver < xs_spleen
    # Lungs sit above (superior, +z) the kidneys.
    assert np.nonzero(p.labels == 7)[2].mean() > np.nonzero(p.labels == 3)[2].mean()


def test_write_phantom_nifti_geometry(tmp_path):
    import nibabel as nib

    p = make_phantom(1)
    img_path, lab_path = write_phantom(p, tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz")
    img = nib.load(img_path)
    assert img.header.get_zooms()[:3] == p.spacing
    assert np.allclose(img.affine, p.affine)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert np.array_equal(np.asanyarray(nib.load(lab_path).dataobj), p.labels)
    assert not list(tmp_path.glob(".tmp-*"))
