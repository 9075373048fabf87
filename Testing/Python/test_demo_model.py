"""The shipped demo model: a real nnU-Net folder that nnU-Net's predictor runs, and it is good."""
from __future__ import annotations

import json

import numpy as np
import pytest

from TuckerSegLib.demo.demo_model import RESOURCE_DIR, materialize_demo_model
from TuckerSegLib.compression.phantom import LABEL_NAMES, make_phantom
from TuckerSegLib.errors import InputError, ModelError


def test_shipped_files_are_small_and_pickle_free():
    files = [p for p in RESOURCE_DIR.rglob("*") if p.is_file()]
    names = {p.relative_to(RESOURCE_DIR).as_posix() for p in files}
    assert {"plans.json", "dataset.json", "trainer.json", "fold_0/model.safetensors"} <= names
    assert all(p.suffix in (".json", ".safetensors") for p in files), names
    assert sum(p.stat().st_size for p in files) < 10 * 1024 * 1024


def test_materialize_writes_nnunet_folder(tmp_path):
    import torch

    folder = materialize_demo_model(tmp_path)
    assert folder.name == "nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres"
    ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=True)
    assert ckpt["trainer_name"] == "nnUNetTrainerNoMirroring"
    assert ckpt["init_args"]["configuration"] == "3d_fullres"
    assert "inference_allowed_mirroring_axes" in ckpt
    plans = json.loads((folder / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["CTNormalization"]
    # Second call reuses the folder; nothing temporary is left behind.
    mtime = (folder / "fold_0" / "checkpoint_final.pth").stat().st_mtime_ns
    assert materialize_demo_model(tmp_path) == folder
    assert (folder / "fold_0" / "checkpoint_final.pth").stat().st_mtime_ns == mtime
    assert not list(folder.parent.glob(".tmp-*"))


def test_materialize_reports_incomplete_source(tmp_path):
    with pytest.raises(ModelError):
        materialize_demo_model(tmp_path / "dest", source=tmp_path / "nothing")


def test_nnunet_predictor_segments_heldout_phantom(tmp_path):
    """nnU-Net's own predictor with the shipped weights reaches > 0.9 mean Dice on a phantom
    it never saw, and an array input gives the same result as the NIfTI file."""
    from TuckerSegLib.compression.phantom import write_phantom
    from TuckerSegLib.evaluation.metrics import mean_score, per_class_scores
    from TuckerSegLib.pipeline.nnunet_predict import load_predictor, predict_volume

    folder = materialize_demo_model(tmp_path)
    predictor = load_predictor(folder, device="cpu")
    p = make_phantom(10_001)
    ct, _ = write_phantom(p, tmp_path / "ct.nii.gz")
    seg = predict_volume(predictor, ct)
    assert seg.shape == p.labels.shape
    scores = per_class_scores(seg, p.labels, range(1, len(LABEL_NAMES)), p.spacing, 3.0)
    assert mean_score(scores) > 0.9, scores
    seg2 = predict_volume(predictor, p.image, p.affine)
    assert np.array_equal(seg, seg2)


def test_predict_volume_rejects_bad_input(tmp_path):
    from TuckerSegLib.pipeline.nnunet_predict import predict_volume

    folder = materialize_demo_model(tmp_path)
    with pytest.raises(InputError):
        predict_volume(folder, tmp_path / "missing.nii.gz", device="cpu")
    with pytest.raises(ModelError):
        predict_volume(tmp_path, tmp_path / "missing.nii.gz", device="cpu")
