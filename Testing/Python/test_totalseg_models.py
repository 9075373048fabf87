"""TotalSegmentator architectures as data, weights resolution, and the test-model builder."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from TuckerSegLib.errors import InputError, WeightsMissingError
from TuckerSegLib.models import totalseg, totalseg_archs
from TuckerSegLib.models.nnunet_folder import build_network

from TuckerSegLib.models import totalseg_layout


def _cost(dataset_id: int):
    """Params, conv MACs and InstanceNorm output elements of the full-width network per patch."""
    with torch.device("meta"):
        net = totalseg_archs.build_totalseg_network(dataset_id)
    norm_elems, ran = [], {}
    hooks = [m.register_forward_hook(lambda m, i, o: norm_elems.append(o.numel()) and None)
             for m in net.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    # Params of the modules that run (nnU-Net's unused deep-supervision heads excluded).
    hooks += [m.register_forward_hook(lambda m, i, o: ran.update({id(m): m}))
              for m in net.modules() if not list(m.children())]
    x = torch.empty(1, 1, *totalseg_archs.patch_size(dataset_id), device="meta")
    with FlopCounterMode(display=False) as counter:
        net(x)
    for h in hooks:
        h.remove()
    params = sum(p.numel() for m in ran.values() for p in m.parameters(recurse=False))
    return params, counter.get_total_flops() / 2, sum(norm_elems), net


@pytest.mark.parametrize("dataset_id,params_m,gmacs_fvcore,n_out", [
    (291, 31.19, 480.6, 25), (297, 16.55, 369.1, 118)])
def test_full_width_cost_matches_published_figures(dataset_id, params_m, gmacs_fvcore, n_out):
    params, macs, norm_elems, net = _cost(dataset_id)
    assert net.decoder.seg_layers[-1].out_channels == n_out
    # The paper counts the final head only (nnU-Net builds unused deep-supervision heads too).
    assert round(params / 1e6, 2) == params_m
    assert sum(p.numel() for p in net.parameters()) > params
    # The paper's MACs are fvcore counts: conv MACs plus 5 per InstanceNorm output element.
    assert abs((macs + 5 * norm_elems) / 1e9 - gmacs_fvcore) < 0.1
    assert 470e9 < macs < 480e9 if dataset_id == 291 else 360e9 < macs < 369e9


def test_old_format_plans_are_converted_by_nnunet():
    plans, dj = totalseg_archs.totalseg_plans(292, width_scale=0.125)
    cfg = plans["configurations"]["3d_fullres"]
    assert "architecture" not in cfg and cfg["UNet_class_name"] == "PlainConvUNet"
    net = build_network(plans, dj, "3d_fullres", "nnUNetTrainerNoMirroring")
    assert type(net).__name__ == "PlainConvUNet"
    feats = list(net.encoder.output_channels)
    assert feats == [4, 8, 16, 32, 40, 40]
    assert dj["labels"]["background"] == 0 and len(dj["labels"]) == 27
    assert dj["labels"]["vertebrae_L5"] in totalseg_archs.class_map(292)


def test_class_maps_cover_totalsegmentator_117_classes():
    names = set()
    for i in totalseg_archs.TASK_DATASETS["total"]:
        names |= set(totalseg_archs.class_map(i).values())
    assert len(names) == 117
    assert set(totalseg_archs.class_map(297).values()) == names
    assert not totalseg_archs.is_verified(298) and totalseg_archs.is_verified(297)


def test_task_models_come_from_totalsegmentator_table():
    assert totalseg.task_models("total").dataset_ids == (291, 292, 293, 294, 295)
    fast = totalseg.task_models("total", fast=True)
    assert fast.dataset_ids == (297,) and fast.trainer == "nnUNetTrainer_4000epochs_NoMirroring"
    assert totalseg.task_models("total", fastest=True).dataset_ids == (298,)
    with pytest.raises(InputError):
        totalseg.task_models("no_such_task")


def test_weights_dir_follows_totalsegmentator_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "home"))
    assert totalseg.weights_dir() == tmp_path / "home" / "nnunet" / "results"
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "w"))
    assert totalseg.weights_dir() == tmp_path / "w"
    folder = totalseg.model_folder(297)
    assert folder == (tmp_path / "w" / "Dataset297_TotalSegmentator_total_3mm_1559subj" /
                      "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres")


def test_built_models_have_totalsegmentator_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path))
    assert totalseg.installed_tasks() == {}
    totalseg_layout.build_models(tmp_path, [297], width_scale=0.125)
    assert totalseg.weights_present(297)
    assert totalseg.installed_tasks().get("total --fast") == [297]
    assert totalseg.ensure_weights([297], allow_download=False) == [totalseg.model_folder(297)]
    folder = totalseg.model_folder(297)
    ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=True)
    assert ckpt["trainer_name"] == "nnUNetTrainer_4000epochs_NoMirroring"
    assert ckpt["init_args"]["configuration"] == "3d_fullres"
    dj = json.loads((folder / "dataset.json").read_text())
    net = build_network(json.loads((folder / "plans.json").read_text()), dj, "3d_fullres",
                        ckpt["trainer_name"])
    net.load_state_dict(ckpt["network_weights"])  # the stored weights fit nnU-Net's network
    head = ckpt["network_weights"]["decoder.seg_layers.3.bias"]
    assert head.shape == (118,) and int((head > -50).sum()) == 8  # 8 classes can win


def test_missing_weights_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path))
    with pytest.raises(WeightsMissingError) as info:
        totalseg.ensure_weights([297], allow_download=False)
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path) in msg and "totalseg_import_weights -i" in msg


def test_uninitialised_build_loads_to_the_same_network():
    """``initialise=False`` skips nnU-Net's random init; after a strict load the network is the same."""
    import torch

    plans, dj = totalseg_archs.totalseg_plans(292, width_scale=0.125)
    ref = build_network(plans, dj, "3d_fullres", "nnUNetTrainerNoMirroring").eval()
    fast = build_network(plans, dj, "3d_fullres", "nnUNetTrainerNoMirroring", initialise=False).eval()
    assert not any(p.is_meta for p in fast.parameters())
    fast.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ref(x), fast(x))


def test_uninitialised_build_skips_nnunets_initialisation(monkeypatch):
    """``initialise=False`` does not run nnU-Net's He initialisation (a fifth of a second per
    full-width model), whichever signature this nnU-Net's ``build_network_architecture`` has."""
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He

    def refuse(self, module):
        raise AssertionError("nnU-Net's initialisation ran")

    monkeypatch.setattr(InitWeights_He, "__call__", refuse)
    plans, dj = totalseg_archs.totalseg_plans(297, width_scale=0.125)
    net = build_network(plans, dj, "3d_fullres", "nnUNetTrainer_4000epochs_NoMirroring", initialise=False)
    assert sum(p.numel() for p in net.parameters()) > 0
    with pytest.raises(AssertionError, match="initialisation ran"):
        build_network(plans, dj, "3d_fullres", "nnUNetTrainer_4000epochs_NoMirroring")
