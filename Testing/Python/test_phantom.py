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


def test_torso_phantom_adds_thorax_and_back_and_keeps_the_abdomen():
    from TuckerSegLib.compression.phantom import TORSO_LABEL_NAMES

    base, p = make_phantom(300), make_phantom(300, torso=True)
    assert set(np.unique(p.labels)) == set(TORSO_LABEL_NAMES)
    # The abdomen of the seed is the demo model's data: unchanged wherever nothing was added.
    # The torso writes only the neural arch (vertebrae) and its own labels.
    kept = (p.labels <= 8) & (p.labels != 6)
    assert np.array_equal(base.labels[kept], p.labels[kept])
    assert (p.labels[base.labels == 3] == 3).all() and (p.labels[base.labels == 5] == 5).all()
    assert make_phantom(300, torso=True).image.tobytes() == p.image.tobytes()
    name = {v: k for k, v in TORSO_LABEL_NAMES.items()}
    median = {n: float(np.median(p.image[p.labels == name[n]])) for n in
              ("heart", "ribs", "sternum", "autochthon", "costal_cartilages")}
    assert median["ribs"] > 300 and median["sternum"] > 300 and 100 < median["heart"] < 250
    assert 20 < median["autochthon"] < 80 and 40 < median["costal_cartilages"] < 200
    mean = {n: np.argwhere(p.labels == name[n]).mean(axis=0) for n in TORSO_LABEL_NAMES.values() if n != "background"}
    assert mean["heart"][2] > mean["liver"][2] and mean["heart"][1] > mean["vertebrae"][1]  # above the liver, anterior
    assert mean["sternum"][1] > mean["heart"][1] > mean["spinal_cord"][1]                    # front to back
    assert mean["autochthon"][1] < mean["vertebrae"][1] and mean["spinal_cord"][1] < mean["vertebrae"][1]
    ribs = np.argwhere(p.labels == name["ribs"])
    assert abs(ribs[:, 0].mean() - p.labels.shape[0] / 2) < 10                                 # both sides
    assert ribs[:, 0].min() < np.argwhere(p.labels == 8)[:, 0].min() + 3                       # lateral to the lungs
    front, back = ribs[ribs[:, 1] > ribs[:, 1].mean()], ribs[ribs[:, 1] <= ribs[:, 1].mean()]
    assert front[:, 2].mean() < back[:, 2].mean()                                              # they descend anteriorly
