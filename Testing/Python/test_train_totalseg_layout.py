"""Training a TotalSegmentator-layout network on the real CT (TuckerSegLib.models.train_totalseg_layout).

Why: the trained reference network is what every speed-up is judged on; its split must never leak
held-out slices into training, its folder must load like TotalSegmentator's, and the safetensors
pieces that bring a GPU-trained network back must rebuild the same weights. Tiny width and crop
keep this under a minute on 2 cores.
"""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from TuckerSegLib.models import train_totalseg_layout as T
from TuckerSegLib.models.nnunet_folder import build_network, load_model_folder
from TuckerSegLib.models.totalseg_archs import TRAINERS
from TuckerSegLib.models.totalseg_layout import model_dir


@pytest.fixture(scope="module")
def bundle(shared_data) -> T.Bundle:
    return T.prepare(297, 0.125, shared_data)


def test_split_parts_are_disjoint_and_written_where_they_lie(shared_data, tmp_path):
    z = [set(r) for r in (T.TRAIN_SLICES, T.HELDOUT_SLICES, T.UNLABELLED_SLICES)]
    assert not (z[0] & z[1]) and not (z[0] & z[2]) and not (z[1] & z[2])
    assert z[0] | z[1] == set(T.LABELLED_SLICES) and z[0] | z[1] | z[2] == set(range(112))
    ct = nib.load(str(shared_data / "example_ct.nii.gz"))
    seg = np.asanyarray(nib.load(str(shared_data / "example_seg_fast.nii.gz")).dataobj)
    ct_path, seg_path = T.write_heldout_ct(tmp_path, shared_data)
    part = nib.load(str(ct_path))
    assert part.shape == (122, 101, 10)
    np.testing.assert_array_equal(np.asanyarray(part.dataobj), np.asanyarray(ct.dataobj)[:, :, 102:112])
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(seg_path)).dataobj), seg[:, :, 20:30])
    # the part's first voxel lies where slice 102 of example_ct lies
    np.testing.assert_allclose(part.affine @ [0, 0, 0, 1], ct.affine @ [0, 0, 102, 1])
    assert nib.load(str(T.write_unlabelled_ct(tmp_path, shared_data))).shape == (122, 101, 82)


def test_bundle_matches_labels_and_nnunet_network(bundle, shared_data, tmp_path):
    seg = np.asanyarray(nib.load(str(shared_data / "example_seg_fast.nii.gz")).dataobj)
    # nnU-Net axis order (z, y, x); example_seg_fast ids are dataset 297's output channels
    np.testing.assert_array_equal(bundle.train_seg, seg[:, :, :20].transpose(2, 1, 0))
    np.testing.assert_array_equal(bundle.heldout_seg, seg[:, :, 20:].transpose(2, 1, 0))
    assert bundle.network["num_classes"] == 118
    ours = T.build_training_network(bundle.network).state_dict()
    nnunet = build_network(bundle.plans, bundle.dataset_json, "3d_fullres", TRAINERS[297],
                           deep_supervision=True).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in nnunet.items()}
    path = bundle.save(tmp_path / "bundle.npz")
    again = T.Bundle.load(path)
    assert again.network == bundle.network and np.array_equal(again.train_data, bundle.train_data)


def test_training_lowers_loss_writes_folder_and_round_trips_safetensors(bundle, tmp_path):
    torch.set_num_threads(2)
    weights, summary = T.train(bundle, steps=8, crop=[16, 48, 48], device="cpu", seed=0,
                               lr=1e-2, eval_every=0, log_every=1, eval_context=False,
                               log=lambda _: None)
    losses = [row[1] for row in summary["losses"]]
    assert len(losses) == 8 and np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    assert 0.0 <= summary["heldout"]["mean_dice"] <= 1.0 and summary["heldout"]["n_classes"] == 32
    folder = T.write_trained_folder(tmp_path / "root", bundle, weights, summary)
    assert folder == model_dir(tmp_path / "root", 297)
    ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=True)
    assert ckpt["trainer_name"] == TRAINERS[297] and ckpt["init_args"]["configuration"] == "3d_fullres"
    assert ckpt["inference_allowed_mirroring_axes"] is None
    assert json.loads((folder / "fold_0" / "training.json").read_text())["steps"] == 8
    model = load_model_folder(folder)
    assert model.num_classes == 118 and model.patch_size == (112, 112, 128)
    for k, v in model.network.state_dict().items():
        assert torch.equal(v, weights[k]), k

    for dtype in ("fp32", "fp16"):
        out = tmp_path / f"export_{dtype}"
        files = T.export_safetensors(folder, out, max_file_mb=0.3, dtype=dtype)
        shards = [f for f in files if f.suffix == ".safetensors"]
        assert len(shards) > 1 and all(f.stat().st_size <= 300_000 for f in shards)
        rebuilt = T.import_safetensors(out, tmp_path / f"imported_{dtype}")
        state = load_model_folder(rebuilt).network.state_dict()
        for k, v in weights.items():
            expected = v if dtype == "fp32" else v.half().float()
            assert torch.equal(state[k], expected), (dtype, k)


def test_a_diverging_run_stops_with_one_line_instead_of_writing_nan_weights(bundle):
    # lr 1e30 overflows float32 within a step or two: the loss turns NaN. Before the guard the
    # loop stepped on with NaN gradients and wrote a folder of NaN weights.
    torch.set_num_threads(2)
    with pytest.raises(T.ModelError, match="diverged at step"):
        T.train(bundle, steps=40, crop=[16, 48, 48], device="cpu", seed=0, lr=1e30, amp="none",
                eval_every=0, log_every=1, eval_context=False, log=lambda _: None)
