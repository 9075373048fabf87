"""INT8 (OpenVINO + NNCF) with accuracy control: cache, stored agreement, CPU check, data split.

Real parts: NNCF's ``quantize_with_accuracy_control`` on a real OpenVINO IR of nnU-Net's
PlainConvUNet (small), nnU-Net's preprocessor for the phantom calibration data, TotalSegmentator's
pipeline with a TotalSegmentator-layout test model.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from TuckerSegLib.engines import int8 as int8_mod
from TuckerSegLib.engines import prepare_network
from TuckerSegLib.engines.int8_data import model_int8_data, random_int8_data
from TuckerSegLib.errors import EngineError, InputError
from TuckerSegLib.network.channel_scaling import scalable_groups
from TuckerSegLib.specs import PRECISIONS, RunSpec

from test_engines import PATCH, small_unet

pytestmark = pytest.mark.skipif(int8_mod.int8_support_reason() is not None,
                                reason=f"this CPU has no fast INT8: {int8_mod.int8_support_reason()}")


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return small_unet()


@pytest.fixture(scope="module")
def quantised_once(net, tmp_path_factory):
    """One INT8 quantisation of the small network (the expensive step), shared by the tests."""
    cache = tmp_path_factory.mktemp("int8_cache")
    run = RunSpec("openvino", "int8", "as-is", int8_min_agreement=0.95)
    t0 = time.perf_counter()
    module, info = prepare_network(net, PATCH, 1, "cpu", run, cache)
    return cache, run, module, info, time.perf_counter() - t0


def test_int8_is_a_precision_and_its_target_is_validated():
    assert "int8" in PRECISIONS
    assert RunSpec(precision="int8").int8_min_agreement == 0.99
    for bad in (0, 1.5, -1, "x"):
        with pytest.raises(InputError, match="agreement"):
            RunSpec(precision="int8", int8_min_agreement=bad)
    assert RunSpec(int8_calibration=["a.nii.gz"]).int8_calibration == ("a.nii.gz",)


def test_int8_quantises_measures_and_stores_agreement(quantised_once, net):
    cache, run, module, info, _ = quantised_once
    assert (info.name, info.precision, info.cache_hit) == ("openvino", "int8", False)
    report = info.int8
    assert report is not None and 0.0 < info.agreement <= 1.0
    assert info.agreement == report["agreement"]
    assert report["quantised_layers"] > 0  # INT8 really used
    assert "seg_layers" in " ".join(report["ignored_scope"])  # the head stays f32
    # every norm and transposed convolution had its channel ranges smoothed before quantising
    assert report["smoothing"]["alpha"] == int8_mod.SMOOTHING_ALPHA
    assert report["smoothing"]["activations"] == len(scalable_groups(net)) > 10
    stored = json.loads((Path(info.cache_path) / "int8.json").read_text())
    assert stored["agreement"] == info.agreement and stored["min_agreement"] == 0.95
    assert stored["meets_target"] == (stored["agreement"] >= 0.95)
    assert stored["accuracy_control"] is True  # a real target: NNCF's accuracy control ran
    assert "argmax agreement with f32" in " ".join(info.notes)
    assert info.as_dict()["agreement"] == info.agreement and info.as_dict()["int8"]["agreement"] == info.agreement
    # the module runs and gives logits of the right shape, close to f32's labels
    x = torch.randn(1, 1, *PATCH, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        out, ref = module(x), net(x)
    assert out.shape == ref.shape
    assert (out.argmax(1) == ref.argmax(1)).float().mean() > 0.8


def test_int8_cache_is_reloaded_without_quantising_again(quantised_once, net, monkeypatch):
    cache, run, _, first, seconds_first = quantised_once
    import nncf

    def refuse(*a, **k):
        raise AssertionError("quantised again")

    monkeypatch.setattr(nncf, "quantize_with_accuracy_control", refuse)
    monkeypatch.setattr(nncf, "quantize", refuse)
    t0 = time.perf_counter()
    module, info = prepare_network(net, PATCH, 1, "cpu", run, cache)
    seconds = time.perf_counter() - t0
    assert info.cache_hit and info.cache_path == first.cache_path
    assert info.agreement == first.agreement and info.int8 == first.int8
    assert any("from the cache" in n for n in info.notes)
    assert seconds < seconds_first / 3, (seconds, seconds_first)
    # another target is another INT8 model (not the cached one)
    other = int8_mod.int8_key("k", random_int8_data(PATCH), 0.9)
    assert other != int8_mod.int8_key("k", random_int8_data(PATCH), 0.99)


def test_cpu_without_int8_gets_one_line(net, tmp_path, monkeypatch):
    message = "--precision int8 needs a CPU with VNNI or AMX (simulated)"
    monkeypatch.setattr(int8_mod, "int8_support_reason", lambda: message)
    for engine in ("auto", "openvino"):
        with pytest.raises(EngineError) as err:
            prepare_network(net, PATCH, 1, "cpu", RunSpec(engine, "int8", "as-is"), tmp_path)
        assert str(err.value) == message and "\n" not in str(err.value)
    with pytest.raises(EngineError, match="torch engine has no INT8"):
        prepare_network(net, PATCH, 1, "cpu", RunSpec("torch", "int8", "as-is"), tmp_path)
    assert not list(tmp_path.glob("openvino/int8-*"))  # nothing quantised


def test_cpu_flags_decide_support(monkeypatch):
    monkeypatch.setattr(int8_mod, "cpu_int8_flags", lambda: [])
    monkeypatch.setattr(int8_mod.platform, "machine", lambda: "x86_64")
    assert "VNNI or AMX" in int8_mod.int8_support_reason()
    monkeypatch.setattr(int8_mod, "cpu_int8_flags", lambda: ["amx_int8"])
    assert int8_mod.int8_support_reason() is None


def test_agreement_metric_is_mean_dice_over_reference_classes():
    import numpy as np

    ref = np.zeros((4, 4), dtype=np.int16)
    ref[:2] = 1
    same = int8_mod.mean_dice([int8_mod.dice_counts(ref.copy(), ref)])
    assert same == 1.0
    lab = ref.copy()
    lab[0, :2] = 0  # 2 of 8 class-1 voxels lost
    d = int8_mod.mean_dice([int8_mod.dice_counts(lab, ref)])
    assert d == pytest.approx(np.mean([2 * 8 / (8 + 10), 2 * 6 / (6 + 8)]))


def _tiny_plans(tmp_path_factory):
    from TuckerSegLib.models import totalseg_layout

    root = tmp_path_factory.mktemp("int8_models")
    totalseg_layout.build_models(root, [297], width_scale=0.125)
    folder = totalseg_layout.model_dir(root, 297)
    plans = json.loads((folder / "plans.json").read_text())
    dataset = json.loads((folder / "dataset.json").read_text())
    return plans, dataset


def test_calibration_data_from_phantoms_and_never_the_evaluation_ct(tmp_path_factory, shared_data):
    plans, dataset = _tiny_plans(tmp_path_factory)
    patch = (32, 48, 48)
    data = model_int8_data(plans, "3d_fullres", dataset, 1, patch, n_calibration=4, n_validation=2)
    cal, val = data.calibration(), data.validation()
    assert len(cal) == 4 and len(val) == 2
    assert all(tuple(p.shape) == (1, *patch) for p in cal + val)
    assert all(torch.isfinite(p).all() for p in cal + val)
    assert float(cal[0].std()) > 0.1  # a CT, not a constant
    assert data.sources == ()
    ct = shared_data / "example_ct_sm.nii.gz"
    with pytest.raises(InputError, match="being evaluated"):
        model_int8_data(plans, "3d_fullres", dataset, 1, patch, cts=[str(ct)], exclude=[str(ct)])
    user = model_int8_data(plans, "3d_fullres", dataset, 1, patch, cts=[str(ct)])
    assert user.sources == (str(ct),) and user.identity != data.identity


def test_benchmark_split_keeps_the_evaluation_ct_out():
    """bench_int8's explicit data split: calibration sources never include the evaluated CT."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_int8.py"
    spec = importlib.util.spec_from_file_location("bench_int8", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    split = bench.data_split(Path("/data/held_out.nii.gz"), calibration_cts=[Path("/data/other.nii.gz")])
    assert Path("/data/held_out.nii.gz") not in [Path(p) for p in split["calibration_cts"]]
    assert split["evaluation_ct"] == str(Path("/data/held_out.nii.gz"))
    with pytest.raises(ValueError, match="evaluation CT"):
        bench.data_split(Path("/data/held_out.nii.gz"), calibration_cts=[Path("/data/held_out.nii.gz")])


@pytest.mark.slow
def test_segment_reports_the_int8_agreement(shared_data, tmp_path, tmp_path_factory, monkeypatch):
    """TotalSegmentator's pipeline with --precision int8: quantised from the model's plans
    (phantoms through nnU-Net's preprocessor), agreement in the result's engine info; a second run
    reads the cache."""
    from TuckerSegLib import segment
    from TuckerSegLib.models import totalseg_layout
    from TuckerSegLib.pipeline.predictor_hook import clear_warm_models

    home = tmp_path_factory.getbasetemp() / "totalseg_home"
    totalseg_layout.build_models(home / "nnunet" / "results", [297], width_scale=0.125)
    kwargs = dict(ratio=1.0, fast=True, device="cpu", quiet=True, precision="int8", layer_forms="as-is",
                  int8_min_agreement=0.05, cache_dir=tmp_path / "cache")  # no reverting: fast
    first = segment(shared_data / "example_ct_sm.nii.gz", tmp_path / "a.nii.gz", **kwargs)
    engine = first.models[0]["engine"]
    assert (engine["name"], engine["precision"], engine["cache_hit"]) == ("openvino", "int8", False)
    assert engine["agreement"] is not None and engine["agreement"] == engine["int8"]["agreement"]
    assert "phantom" in engine["int8"]["calibration"]
    clear_warm_models()
    second = segment(shared_data / "example_ct_sm.nii.gz", tmp_path / "b.nii.gz", **kwargs)
    assert second.models[0]["engine"]["cache_hit"]
    assert second.models[0]["engine"]["agreement"] == engine["agreement"]


def test_cached_report_is_found_without_quantising(quantised_once, net, tmp_path):
    cache, run, _, info, _ = quantised_once
    found = int8_mod.cached_report(net, PATCH, 1, cache, random_int8_data(PATCH), 0.95)
    assert found is not None and found["agreement"] == info.agreement
    assert int8_mod.cached_report(net, PATCH, 1, tmp_path, random_int8_data(PATCH), 0.95) is None
