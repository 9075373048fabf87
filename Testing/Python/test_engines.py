"""Inference engines on a small compressed nnU-Net network: agreement, caches, choice, errors.

Real parts throughout: nnU-Net's PlainConvUNet, our compression, real OpenVINO conversion and
compilation, nnU-Net's own predictor and sliding window.
"""
import json
import os
import sys

import pytest
import torch
from torch import nn

from TuckerSegLib.compression.compress import compress_network
from TuckerSegLib.engines import prepare_network
from TuckerSegLib.engines.agreement import compare_logits
from TuckerSegLib.engines.layer_forms import FORMS, make_form
from TuckerSegLib.network.surgery import factorised_layers
from TuckerSegLib.errors import EngineError, InputError
from TuckerSegLib.specs import CompressionSpec, RunSpec

from dynamic_network_architectures.architectures.unet import PlainConvUNet

PATCH = (32, 32, 32)


def small_unet(n_out=4):
    features = (8, 16, 32, 32)
    n = len(features)
    net = PlainConvUNet(1, n, list(features), nn.Conv3d, 3, [1] + [2] * (n - 1), 2, n_out, 2, True,
                        nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU,
                        {"inplace": True})
    with torch.no_grad():  # non-trivial biases, like a trained network
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


@pytest.fixture(scope="module")
def compressed():
    torch.manual_seed(0)
    return compress_network(small_unet(), CompressionSpec(0.3, "budget"), patch_size=PATCH).network.eval()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("engine_cache")


@pytest.fixture(scope="module")
def patch_input():
    return torch.randn(1, 1, *PATCH, generator=torch.Generator().manual_seed(5))


def _run(module, x):
    with torch.inference_mode():
        return module(x)


def test_openvino_f32_matches_torch_f32(compressed, cache_dir, patch_input):
    ref, ref_info = prepare_network(compressed, PATCH, 1, "cpu", RunSpec("torch", "f32", "as-is"), cache_dir)
    ov_mod, info = prepare_network(compressed, PATCH, 1, "cpu", RunSpec("openvino", "f32", "as-is"), cache_dir)
    assert (ref_info.name, info.name, info.precision) == ("torch", "openvino", "f32")
    agr = compare_logits(_run(ov_mod, patch_input), _run(ref, patch_input))
    assert agr.argmax_agreement >= 0.9999
    assert agr.max_abs_diff < 1e-3
    assert "inference precision f32" in " ".join(info.notes)


def test_conversion_without_trace_check_is_openvinos_own_conversion(compressed, patch_input):
    """Skipping torch's check_trace changes the time of a conversion, not the IR."""
    import numpy as np
    import openvino as ov

    from TuckerSegLib.engines.openvino_engine import convert_static

    ours = convert_static(compressed, patch_input.shape)
    with torch.no_grad():
        theirs = ov.convert_model(compressed, example_input=patch_input)
    assert [o.get_type_name() for o in ours.get_ordered_ops()] == [o.get_type_name() for o in theirs.get_ordered_ops()]
    core = ov.Core()
    x = patch_input.numpy()
    a, b = (np.asarray(core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]) for m in (ours, theirs))
    assert np.array_equal(a, b)


def test_openvino_bf16_agreement_is_measured_and_reported(compressed, cache_dir, patch_input):
    mod, info = prepare_network(compressed, PATCH, 1, "cpu", RunSpec("openvino", "bf16", "as-is"), cache_dir)
    assert info.precision == "bf16"
    assert info.agreement is not None and 0.5 < info.agreement <= 1.0
    assert any("argmax agreement with f32" in n for n in info.notes)
    ref = _run(compressed, patch_input)
    out = _run(mod, patch_input)
    agr = compare_logits(out, ref)
    print(f"OpenVINO bf16 vs f32 argmax agreement {100 * agr.argmax_agreement:.3f} %, "
          f"max |diff| {agr.max_abs_diff:.3g}")
    assert agr.max_abs_diff > 0  # really ran in bf16 (an f32 run would be near-identical)
    # the measurement is cached beside the model: a second prepare reports it without measuring
    store = cache_dir / "engine_agreement.json"
    assert store.is_file()
    _, again = prepare_network(compressed, PATCH, 1, "cpu", RunSpec("openvino", "bf16", "as-is"), cache_dir)
    assert again.agreement == info.agreement


def test_openvino_ir_cache_is_reused(compressed, tmp_path, patch_input):
    _, first = prepare_network(compressed, PATCH, 1, "cpu", RunSpec("openvino", "f32", "as-is"), tmp_path)
    assert not first.cache_hit
    ir = os.path.join(first.cache_path, "model.xml")
    stamp = os.stat(ir).st_mtime_ns
    blobs = tmp_path / "openvino" / "compiled"
    assert blobs.is_dir() and any(blobs.iterdir())  # the compiled blob is cached too
    mod, second = prepare_network(compressed, PATCH, 1, "cpu", RunSpec("openvino", "f32", "as-is"), tmp_path)
    assert second.cache_hit and second.cache_path == first.cache_path
    assert os.stat(ir).st_mtime_ns == stamp  # not converted again
    # different weights -> a different cache entry, never a stale model
    other = compress_network(small_unet(), CompressionSpec(0.3, "budget"), patch_size=PATCH).network
    _, third = prepare_network(other, PATCH, 1, "cpu", RunSpec("openvino", "f32", "as-is"), tmp_path)
    assert not third.cache_hit and third.cache_path != first.cache_path


def test_auto_is_exact_on_cpu_and_measured(compressed, cache_dir):
    for precision in ("auto", "f32"):
        _, info = prepare_network(compressed, PATCH, 1, "cpu", RunSpec("auto", precision, "as-is"), cache_dir)
        assert info.precision == "f32"
        assert info.agreement is None
        # both engines were timed on a patch and the faster one kept; the choice is cached
        assert any(n.startswith("engine auto:") and "torch" in n and "openvino" in n for n in info.notes)
    choices = json.loads((cache_dir / "engine_choice.json").read_text())
    assert len(choices) == 1 and next(iter(choices.values()))["engine"] == info.name
    assert any(n.endswith("(cached)") for n in info.notes)
    # static order when not measuring: OpenVINO first on CPU
    _, static = prepare_network(compressed, PATCH, 1, "cpu", RunSpec("auto", "auto", "as-is"), cache_dir, measure_auto=False)
    assert (static.name, static.precision) == ("openvino", "f32")


def test_explicit_unsupported_engine_is_refused(compressed, cache_dir):
    with pytest.raises(EngineError, match="fp16"):
        prepare_network(compressed, PATCH, 1, "cpu", RunSpec("torch", "fp16", "as-is"), cache_dir)
    with pytest.raises(EngineError, match="openvino"):
        prepare_network(compressed, PATCH, 1, "cuda", RunSpec("openvino", "f32", "as-is"), cache_dir)
    with pytest.raises(InputError, match="unknown engine"):  # refused where the options enter

        prepare_network(compressed, PATCH, 1, "cpu", RunSpec("tensorrt", "f32", "as-is"), cache_dir)
    with pytest.raises(InputError, match="unknown precision"):
        prepare_network(compressed, PATCH, 1, "cpu", RunSpec("auto", "int4", "as-is"), cache_dir)
    # one line, for the command line
    try:
        prepare_network(compressed, PATCH, 1, "cpu", RunSpec("torch", "fp16", "as-is"), cache_dir)
    except EngineError as exc:
        assert "\n" not in str(exc)


def test_missing_openvino_explicit_errors_auto_falls_back(compressed, cache_dir, monkeypatch):
    # OpenVINO absent: importing it fails as it would on a machine without the package
    for name in [m for m in sys.modules if m == "openvino" or m.startswith("openvino.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(EngineError, match="not installed"):
        prepare_network(compressed, PATCH, 1, "cpu", RunSpec("openvino", "f32", "as-is"), cache_dir)
    module, info = prepare_network(compressed, PATCH, 1, "cpu", RunSpec("auto", "auto", "as-is"), cache_dir)
    assert info.name == "torch" and info.precision == "f32"
    assert any("openvino skipped" in n and "not installed" in n for n in info.notes)


def test_engine_module_state_dict_contract(compressed, cache_dir):
    module, _ = prepare_network(compressed, PATCH, 1, "cpu", RunSpec("openvino", "f32", "as-is"), cache_dir)
    assert module.state_dict() == {}
    module.load_state_dict(module.state_dict())  # what the pipeline gives the predictor
    module.load_state_dict(compressed.state_dict())  # the very weights compiled in
    changed = {k: v.clone() for k, v in compressed.state_dict().items()}
    first = next(k for k, v in changed.items() if v.is_floating_point())
    changed[first] += 1.0
    with pytest.raises(EngineError, match="compiled in"):
        module.load_state_dict(changed)


def test_openvino_runs_tiles_in_flight_in_order_with_its_one_thread_numbers(compressed, tmp_path, monkeypatch):
    """``map_tiles`` keeps two tiles in flight and yields each tile's output in order, the very
    numbers of the model compiled for one thread (a stream's share); a tile of another shape, a
    consumer that stops early and ``TUCKERSEG_TILE_STREAMS`` behave."""
    from TuckerSegLib.engines.base import predict_tiles
    from TuckerSegLib.engines.openvino_engine import TILE_STREAMS_ENV, OpenVINOModule

    monkeypatch.setenv(TILE_STREAMS_ENV, "2")
    module, info = prepare_network(compressed, PATCH, 1, "cpu", RunSpec("openvino", "f32", "as-is"), tmp_path)
    assert module.tile_streams == 2 and any("tiles 2 at a time" in n for n in info.notes)
    one_thread = OpenVINOModule(module.ir_path, module.ir_shape, "CPU",
                                {**module.config, "INFERENCE_NUM_THREADS": 1}, module._source_fp)
    gen = torch.Generator().manual_seed(3)
    tiles = [torch.randn(1, 1, *PATCH, generator=gen) for _ in range(5)]
    tiles.insert(3, torch.randn(1, 1, 32, 32, 64, generator=gen))  # another shape mid-way
    started = []
    pool = module._stream_pool

    def counting_pool(shape):
        started.append(shape)
        return pool(shape)

    module._stream_pool = counting_pool
    with torch.inference_mode():
        outputs = list(predict_tiles(module, iter(tiles), len(tiles)))
        expected = [one_thread(t) for t in tiles]
    assert [o.shape for o in outputs] == [e.shape for e in expected]
    assert all(torch.equal(o, e) for o, e in zip(outputs, expected))
    assert started == [(1, 1, *PATCH), (1, 1, 32, 32, 64), (1, 1, *PATCH)]
    assert len(pool((1, 1, *PATCH))) == 2  # two requests: two tiles in flight
    # one tile: one call on every thread (the model nnU-Net's own calls run)
    with torch.inference_mode():
        assert torch.equal(next(iter(predict_tiles(module, iter(tiles[:1]), 1))), module(tiles[0]))
        stopped = predict_tiles(module, iter(tiles), len(tiles))
        next(stopped)
        stopped.close()  # the tile still in flight is waited for
        assert torch.equal(module(tiles[1]), module(tiles[1]))
    monkeypatch.setenv(TILE_STREAMS_ENV, "1")
    single, info = prepare_network(compressed, PATCH, 1, "cpu", RunSpec("openvino", "f32", "as-is"), tmp_path)
    assert single.tile_streams == 1 and not any("at a time" in n for n in info.notes)
    monkeypatch.setenv(TILE_STREAMS_ENV, "two")
    with pytest.raises(EngineError, match="TUCKERSEG_TILE_STREAMS must be a whole number"):
        prepare_network(compressed, PATCH, 1, "cpu", RunSpec("openvino", "f32", "as-is"), tmp_path)


def test_openvino_inside_nnunet_sliding_window(tmp_path, compressed):
    """The engine module as predictor.network in nnU-Net's real sliding window (odd image size)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_models import write_model_folder

    folder = write_model_folder(tmp_path / "model", patch=PATCH, n_classes=4)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=(0,))
    net = compress_network(predictor.network, CompressionSpec(0.3, "budget"), patch_size=PATCH).network.eval()
    data = torch.randn(1, 45, 38, 20, generator=torch.Generator().manual_seed(2))  # < patch in z
    predictor.network, predictor.list_of_parameters = net, [net.state_dict()]
    ref = predictor.predict_logits_from_preprocessed_data(data)
    module, info = prepare_network(net, PATCH, 1, "cpu", RunSpec("openvino", "f32", "as-is"), tmp_path / "cache")
    predictor.network, predictor.list_of_parameters = module, [module.state_dict()]
    out = predictor.predict_logits_from_preprocessed_data(data)
    assert out.shape == ref.shape
    agr = compare_logits(out[None], ref[None])
    assert agr.argmax_agreement >= 0.9999
    # nnU-Net accumulates Gaussian-weighted logits in fp16: differences of about one fp16 step
    assert agr.mean_abs_diff < 1e-3
    assert agr.max_abs_diff < 2e-3 * float(ref.abs().max()) + 1e-2


def test_layer_forms_compute_the_same_function():
    """Padded (zero rank channels), fused (first 1x1 folded into the core) and dense forms equal
    the factorised layer."""
    torch.manual_seed(1)  # the study's rule factorises every layer, transposed convs included
    layers = factorised_layers(compress_network(small_unet(), CompressionSpec(0.3, "paper"), patch_size=PATCH).network)
    kinds = {tc.transposed for tc in layers.values()}
    assert kinds == {False, True}  # convs and transposed convs both covered
    g = torch.Generator().manual_seed(0)
    for name, tc in layers.items():
        c_in = tc.first.in_channels
        x = torch.randn(1, c_in, 8, 8, 8, generator=g)
        with torch.no_grad():
            ref = tc(x)
            for form in FORMS:
                assert torch.allclose(make_form(tc, form)(x), ref, atol=1e-5), (name, form)
            padded = make_form(tc, "padded", 16)
            assert all(r % 16 == 0 or r == c for r, c in zip(padded.ranks, (tc.last.out_channels, tc.first.in_channels)))


def test_hardware_aware_shapes_with_torch(compressed, tmp_path, patch_input, monkeypatch):
    module, info = prepare_network(compressed, PATCH, 1, "cpu", RunSpec("torch", "f32", "auto"), tmp_path)
    assert set(info.layer_forms) == set(factorised_layers(compressed))
    assert set(info.layer_forms.values()) <= set(FORMS)
    agr = compare_logits(_run(module, patch_input), _run(compressed, patch_input))
    assert agr.argmax_agreement >= 0.9999 and agr.max_abs_diff < 1e-3
    timings = tmp_path / "layer_timings.json"
    measured = json.loads(timings.read_text())
    # every form of every layer timed once (layers with the same signature share an entry)
    assert 3 <= len(measured) <= len(FORMS) * len(info.layer_forms)
    assert all(v > 0 for v in measured.values())
    stamp = timings.stat().st_mtime_ns
    from TuckerSegLib.engines import layer_form_choice

    def fail(*a, **k):
        raise AssertionError("a warm start neither traces nor times")

    with monkeypatch.context() as m:  # the network's forms are remembered: nothing traced or timed
        m.setattr(layer_form_choice, "trace", fail)
        m.setattr(layer_form_choice, "time_layer", fail)
        again_module, again = prepare_network(compressed, PATCH, 1, "cpu", RunSpec("torch", "f32", "auto"), tmp_path)
    assert again.layer_forms == info.layer_forms
    assert torch.equal(_run(again_module, patch_input), _run(module, patch_input))
    (tmp_path / layer_form_choice.CHOICES_FILE).unlink()  # choices lost: rebuilt from cached timings
    _, again = prepare_network(compressed, PATCH, 1, "cpu", RunSpec("torch", "f32", "auto"), tmp_path)
    assert again.layer_forms == info.layer_forms
    assert timings.stat().st_mtime_ns == stamp  # cached per device: nothing timed again
    module.load_state_dict(compressed.state_dict())  # the user's weights still load


def test_torch_channels_last_layout_is_the_same_function(compressed, patch_input):
    """The channels-last candidate (tried on CUDA) computes the same logits in standard layout."""
    import copy

    from TuckerSegLib.engines.torch_engine import TorchEngineModule

    cpu = torch.device("cpu")
    plain = TorchEngineModule(copy.deepcopy(compressed), "f32", cpu)
    net_cl = copy.deepcopy(compressed).to(memory_format=torch.channels_last_3d)
    ndhwc = TorchEngineModule(net_cl, "f32", cpu, channels_last=True)
    a, b = _run(plain, patch_input), _run(ndhwc, patch_input)
    assert b.is_contiguous()
    assert compare_logits(b, a).argmax_agreement >= 0.9999
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_layer_form_timing_is_bounded_and_later_runs_time_nothing(compressed, tmp_path, monkeypatch):
    """Over its budget a first run times only the largest layers (the rest run factorised); the
    forms are remembered, so a later run neither times nor changes them; a new cache with the
    timings kept times only what the first run left out."""
    from TuckerSegLib.engines import layer_form_choice
    from TuckerSegLib.engines.select import IMPLEMENTATIONS

    timed = []
    original = layer_form_choice.time_layer
    monkeypatch.setattr(layer_form_choice, "time_layer",
                        lambda engine, module, shape, *a, **k: timed.append((repr(module), tuple(shape)))
                        or original(engine, module, shape, *a, **k))
    args = (compressed, PATCH, 1, IMPLEMENTATIONS["torch"], torch.device("cpu"), "f32", tmp_path)
    _, first = layer_form_choice.choose_layer_forms(*args, budget_seconds=0.0)
    n_first = len(timed)
    assert set(first) == set(factorised_layers(compressed))
    assert 1 <= n_first < len(FORMS) * len(first)  # one layer's forms, not all
    _, second = layer_form_choice.choose_layer_forms(*args)
    assert second == first and len(timed) == n_first
    (tmp_path / layer_form_choice.CHOICES_FILE).unlink()  # forms forgotten, timings kept
    _, third = layer_form_choice.choose_layer_forms(*args)
    assert len(timed) > n_first and len(set(timed)) == len(timed)  # only what was left out
    assert set(third) == set(first)


def test_weights_fingerprints_are_hashed_once_and_follow_every_change_of_the_weights():
    """Engine files and state checks are keyed by the weights' hash, taken once per prepare and
    again whenever a tensor is written in place, replaced or the structure changes."""
    import hashlib

    from TuckerSegLib.engines import base

    net = nn.Sequential(nn.Conv3d(2, 4, 3), nn.Conv3d(4, 3, 1))
    bare = base.state_fingerprint(net.state_dict())
    assert base.network_state_fingerprint(net) == bare
    first = base.weights_fingerprint(net)
    assert first == hashlib.sha256(repr(net).encode() + b"\0" + bare.encode()).hexdigest() and first != bare
    assert base.weights_fingerprint(net) == first  # memoised: same tensors, same versions
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0, 0] += 1.0  # in place: the version counter moves
    assert base.weights_fingerprint(net) != first
    assert base.network_state_fingerprint(net) == base.state_fingerprint(net.state_dict()) != bare
    second = base.weights_fingerprint(net)
    net[1].weight = nn.Parameter(net[1].weight.detach().clone() * 2)  # replaced
    assert base.weights_fingerprint(net) not in (first, second)


def test_fingerprints_of_weights_from_a_file_are_hashed_once_per_file(tmp_path, monkeypatch):
    """A network loaded from a checkpoint gets the fingerprints its file's weights had when they
    were last hashed (same path, size, time and structure); a changed file, another structure or a
    write into the loaded weights is hashed again."""
    from TuckerSegLib.engines import base

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(2, 4, 3), nn.Conv3d(4, 3, 1))
    hashed = []
    state_fingerprint = base.state_fingerprint
    monkeypatch.setattr(base, "state_fingerprint", lambda state: hashed.append(1) or state_fingerprint(state))
    truth = (base.weights_fingerprint(net), base.network_state_fingerprint(net))

    def loaded(identity, module=None):
        module = module or nn.Sequential(nn.Conv3d(2, 4, 3), nn.Conv3d(4, 3, 1))
        module.load_state_dict(net.state_dict())
        base.fingerprints_from_file(module, identity, tmp_path)
        return module

    hashed.clear()
    first = loaded("ckpt|100-1")
    assert len(hashed) == 1 and (tmp_path / base.FINGERPRINTS_FILE).is_file()
    second = loaded("ckpt|100-1")  # a later process: read, not hashed
    assert (base.weights_fingerprint(second), base.network_state_fingerprint(second)) == truth
    assert (base.weights_fingerprint(first), base.network_state_fingerprint(first)) == truth
    assert len(hashed) == 1
    loaded("ckpt|100-2")  # the file changed
    assert len(hashed) == 2
    other = nn.Sequential(nn.Conv3d(2, 4, 3), nn.Conv3d(4, 3, 1), nn.ReLU())
    other.load_state_dict(net.state_dict())
    base.fingerprints_from_file(other, "ckpt|100-1", tmp_path)  # another structure
    assert len(hashed) == 3 and base.weights_fingerprint(other) != truth[0]
    with torch.no_grad():
        second[0].weight[0, 0, 0, 0, 0] += 1.0
    assert base.network_state_fingerprint(second) == state_fingerprint(second.state_dict()) != truth[1]
