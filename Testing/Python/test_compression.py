"""Network surgery, rank policies and cost accounting on real nnU-Net architectures."""

import pytest
import torch
from torch import nn

from TuckerSegLib.compression.compress import compress_network
from TuckerSegLib.network.surgery import factorise_structure
from TuckerSegLib.errors import InputError
from TuckerSegLib.network.cost import count_cost
from TuckerSegLib.network.surgery import factorised_layers, find_sites
from TuckerSegLib.network.tucker_conv import TuckerConv
from TuckerSegLib.specs import CompressionSpec
from TuckerSegLib.compression.probe_data import CompressionData

from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet


def plain_unet(features=(8, 16, 32, 32), n_out=4, conv=nn.Conv3d, norm=nn.InstanceNorm3d):
    n = len(features)
    return PlainConvUNet(1, n, list(features), conv, 3, [1] + [2] * (n - 1), 2, n_out, 2, True, norm,
                         {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True})


def totalseg_unet(stages, features, n_out):
    with torch.device("meta"):
        return plain_unet(features, n_out)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return plain_unet().eval()


def test_each_physical_layer_found_once(net):
    sites = find_sites(net)
    n_conv_modules = len({id(m) for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))})
    assert len(sites) == n_conv_modules
    # nnU-Net keeps convs under .conv and .all_modules.0: both paths are recorded
    assert any(len(s.aliases) == 2 for s in sites)


def test_full_rank_network_reproduces_original(net):
    res = compress_network(net, CompressionSpec(0.9999, "paper", rank_min=10_000), patch_size=(32, 32, 32))
    layers = factorised_layers(res.network)
    unused_heads = len(net.decoder.seg_layers) - 1  # deep-supervision heads do not run at inference
    assert len(layers) == len(find_sites(net)) - unused_heads  # every conv that runs, replaced once
    assert sum(e.get("reason") == "not executed at this patch size" for e in res.report["layers"]) == unused_heads
    # both nnU-Net references point at the same factorised module
    for site in find_sites(res.network, include_factorised=True):
        if not site.name.startswith("decoder.seg_layers"):
            assert isinstance(site.module, TuckerConv)
            assert all(res.network.get_submodule(p) is site.module for p in site.aliases)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(res.network(x), net(x), atol=1e-4)
    # the deduped parameter count of the forward path (no double counting through aliases)
    assert res.report["compressed"]["params"] == sum(
        p.numel() for p in res.network.parameters()) - sum(
        p.numel() for m in res.network.decoder.seg_layers[:-1] for p in m.parameters())


def test_ratio_one_is_unchanged(net):
    res = compress_network(net, CompressionSpec(1.0, "budget"), patch_size=(32, 32, 32))
    assert not factorised_layers(res.network)
    assert res.report["macs_ratio"] == 1.0


def test_default_selection_skips_stem_and_1x1(net):
    res = compress_network(net, CompressionSpec(0.3, "uniform"), patch_size=(32, 32, 32))
    by_name = {e["name"]: e for e in res.report["layers"]}
    stem = by_name["encoder.stages.0.0.convs.0.conv"]
    assert stem["status"] == "dense" and "single input channel" in stem["reason"]
    head = by_name[f"decoder.seg_layers.{len(net.decoder.seg_layers) - 1}"]
    assert head["status"] == "dense" and "1x1" in head["reason"]
    # the study's preset factorises everything, stem and head included
    paper = compress_network(net, CompressionSpec(0.3, "paper"), patch_size=(32, 32, 32))
    assert all(e["status"] == "factorised" for e in paper.report["layers"]
               if e["macs_before"] > 0)


@pytest.mark.parametrize("ratio", [0.2, 0.35, 0.5, 0.7])
def test_budget_hits_mac_target(ratio):
    torch.manual_seed(0)
    net = plain_unet((16, 32, 64, 128, 128)).eval()
    res = compress_network(net, CompressionSpec(ratio, "budget"), patch_size=(64, 64, 64))
    achieved = res.report["macs_ratio"]
    assert abs(achieved - ratio) <= 0.02 * ratio, achieved
    # and what the report claims is what the network runs
    assert count_cost(res.network, (1, 1, 64, 64, 64)).macs == res.report["compressed"]["macs"]


def test_budget_leaves_a_layer_dense_when_factorising_would_not_pay():
    torch.manual_seed(0)
    net = plain_unet((16, 32, 64, 128, 128)).eval()
    res = compress_network(net, CompressionSpec(0.9, "budget"), patch_size=(64, 64, 64))
    for e in res.report["layers"]:
        if e["status"] == "factorised":
            assert e["macs_after"] < e["macs_before"]
    assert any(e["status"] == "dense" and e["reason"] == "kept dense by the policy"
               for e in res.report["layers"])


def test_uniform_ranks_are_rounded_and_energy_monotone(net):
    res = compress_network(net, CompressionSpec(0.3, "uniform"), patch_size=(32, 32, 32))
    for e in res.report["layers"]:
        if e["ranks"]:
            for r, c in zip(e["ranks"], (e["out_channels"], e["in_channels"])):
                assert r == c or r % 8 == 0
    lo = compress_network(net, CompressionSpec(0.5, "energy"), patch_size=(32, 32, 32)).report
    hi = compress_network(net, CompressionSpec(0.95, "energy"), patch_size=(32, 32, 32)).report
    assert lo["compressed"]["params"] <= hi["compressed"]["params"]


def test_error_falls_as_ratio_rises(net):
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        ref = net(x)
        errs = []
        for r in (0.3, 0.6, 0.9):
            out = compress_network(net, CompressionSpec(r, "paper"), patch_size=(32, 32, 32)).network(x)
            errs.append(float((out - ref).norm() / ref.norm()))
    assert errs[0] > errs[1] > errs[2]


def test_residual_encoder_unet_and_2d():
    torch.manual_seed(0)
    res_net = ResidualEncoderUNet(1, 4, [8, 16, 32, 32], nn.Conv3d, 3, [1, 2, 2, 2], [1, 2, 2, 2], 3,
                                  [2, 2, 2], True, nn.InstanceNorm3d, {"eps": 1e-5, "affine": True},
                                  None, None, nn.LeakyReLU, {"inplace": True}).eval()
    r = compress_network(res_net, CompressionSpec(0.9999, "paper", rank_min=10_000), patch_size=(32, 32, 32))
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(r.network(x), res_net(x), atol=1e-4)
    net2d = plain_unet((8, 16, 32), 3, nn.Conv2d, nn.InstanceNorm2d).eval()
    r2 = compress_network(net2d, CompressionSpec(0.5, "budget"), patch_size=(64, 64))
    assert factorised_layers(r2.network)
    assert r2.network(torch.randn(1, 1, 64, 64)).shape == (1, 3, 64, 64)


def test_factorise_structure_roundtrip(net):
    res = compress_network(net, CompressionSpec(0.4, "budget"), patch_size=(32, 32, 32))
    shell = factorise_structure(plain_unet().eval(), res.layer_ranks)
    shell.load_state_dict(res.network.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(shell(x), res.network(x))
    with pytest.raises(KeyError):
        factorise_structure(plain_unet(), {"no.such.layer": [2, 2]})


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), "x"])
def test_bad_ratio(net, bad):
    with pytest.raises(InputError):
        compress_network(net, CompressionSpec(bad, "budget"), patch_size=(32, 32, 32))


def test_unknown_policy(net):
    with pytest.raises(InputError):
        compress_network(net, CompressionSpec(0.5, "magic"), patch_size=(32, 32, 32))


# --- The exact TotalSegmentator architectures (NOTES section 2), on the meta device -----------

TOTALSEG = {
    "1.5mm": ((32, 64, 128, 256, 320, 320), 25, (128, 128, 128), 31.19, 480.6, 3.69),
    "3mm": ((32, 64, 128, 256, 320), 118, (112, 112, 128), 16.55, 369.1, 1.98),
}


@pytest.mark.parametrize("key", list(TOTALSEG))
def test_totalsegmentator_architecture_costs(key):
    features, n_out, patch, params_m, macs_g, paper03_m = TOTALSEG[key]
    with torch.device("meta"):
        net = plain_unet(features, n_out)
    cost = count_cost(net, (1, 1, *patch))
    assert round(cost.params / 1e6, 2) == params_m
    assert round(cost.macs / 1e9, 1) == macs_g
    # the study's preset at 0.3 (parameter count of the factorised network)
    from TuckerSegLib.compression.ranks import choose_ranks
    from TuckerSegLib.network.cost import layer_shapes, trace

    tr = trace(net, (1, 1, *patch))
    shapes = layer_shapes(net, tr)
    ranks = choose_ranks(list(shapes.values()), 0.3, "paper")
    params = cost.params - sum(s.dense_params() for s in shapes.values()) + sum(
        shapes[n].params(r) for n, r in ranks.items())
    assert abs(params / 1e6 - paper03_m) < 0.01, params


def test_budget_with_probe_weighs_layers_by_output_effect():
    """On the trained demo model, measured sensitivities make the budget allocation agree better
    with the original network (on held-out phantom input) than kernel error alone, at equal MACs."""
    from TuckerSegLib.demo.demo_model import materialize_demo_model
    from TuckerSegLib.models.nnunet_folder import load_model_folder
    from TuckerSegLib.compression.probe_data import default_probe

    model = load_model_folder(materialize_demo_model())
    probe = default_probe(model, seed=0)
    held_out = default_probe(model, seed=100)  # other phantoms than the probe's
    with torch.no_grad():
        ref = model.network(held_out).argmax(1)
    agreement = {}
    for name, p in (("weighted", probe), ("kernel-only", None)):
        res = compress_network(model.network, CompressionSpec(0.5, "budget"), patch_size=model.patch_size, data=CompressionData(probe=p))
        assert abs(res.report["macs_ratio"] - 0.5) <= 0.01
        with torch.no_grad():
            agreement[name] = float((res.network(held_out).argmax(1) == ref).float().mean())
        if p is not None:
            sens = [e["sensitivity"] for e in res.report["layers"] if "sensitivity" in e]
            assert sens and all(len(s) == 2 and min(s) >= 0 for s in sens)
            assert res.report["probe"] == list(probe.shape)
    assert agreement["weighted"] > agreement["kernel-only"], agreement


def test_budget_never_worse_than_the_study_rule_on_its_probe():
    """At the MACs of a uniform allocation, budget's probe error is at most uniform's."""
    from TuckerSegLib.demo.demo_model import materialize_demo_model
    from TuckerSegLib.models.nnunet_folder import load_model_folder
    from TuckerSegLib.compression.probe_data import default_probe

    model = load_model_folder(materialize_demo_model())
    probe = default_probe(model)
    uniform = compress_network(model.network, CompressionSpec(0.5, "uniform"), patch_size=model.patch_size)
    budget = compress_network(model.network, CompressionSpec(uniform.report["macs_ratio"], "budget"), patch_size=model.patch_size, data=CompressionData(probe=probe))
    assert budget.report["macs_ratio"] <= uniform.report["macs_ratio"] + 1e-9
    alloc = budget.report["allocation"]
    assert set(alloc["probe_error"]) == {"greedy", "uniform-seeded"}
    assert alloc["probe_error"][alloc["chosen"]] == min(alloc["probe_error"].values())
    from TuckerSegLib.compression.search import output_error

    with torch.no_grad():
        ref = torch.softmax(model.network(probe), 1)
        err = {name: output_error(r.network(probe), ref) for name, r in (("uniform", uniform), ("budget", budget))}
    assert err["budget"] <= err["uniform"] * (1 + 1e-4), err
    refined = alloc["refined"]
    assert refined["probe_error"] <= alloc["probe_error"][alloc["chosen"]]
    assert err["budget"] == pytest.approx(refined["probe_error"], rel=1e-3)  # the report is what runs


def test_refinement_trades_macs_by_measured_error_and_keeps_the_target():
    """Closed-loop refinement lowers the measured probe error at the same MAC target."""
    from TuckerSegLib.compression.ranks import rank_ladders
    from TuckerSegLib.decomposition.tucker import mode_spectra
    from TuckerSegLib.demo.demo_model import materialize_demo_model
    from TuckerSegLib.models.nnunet_folder import load_model_folder
    from TuckerSegLib.compression.probe_data import default_probe
    from TuckerSegLib.network.cost import layer_shapes, trace
    from TuckerSegLib.compression.search import ProbeScorer, refine_on_probe
    from TuckerSegLib.network.tucker_conv import conv_layout_weight

    model = load_model_folder(materialize_demo_model())
    net = model.network.eval()
    tr = trace(net, (1, 1, *model.patch_size))
    layers = [l for l in layer_shapes(net, tr).values() if l.worth_factorising()]
    sites = {s.name: s for s in find_sites(net)}
    spectra = {l.name: mode_spectra(conv_layout_weight(sites[l.name].module)) for l in layers}
    ladders = rank_ladders(layers, spectra)
    assert all(l.macs(ladders[l.name][-1]) == l.dense_macs() for l in layers)  # dense on top
    assert all(l.macs(a) < l.macs(b) for l in layers for a, b in zip(ladders[l.name], ladders[l.name][1:]))
    # start: every layer one rung below dense; the target is what that costs
    start = {l.name: ladders[l.name][-2] if len(ladders[l.name]) > 1 else None for l in layers}
    fixed = tr.cost.macs - sum(l.dense_macs() for l in layers)
    target = fixed + sum(l.macs(start[l.name]) for l in layers)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    scorer = ProbeScorer(net, sites, spectra, default_probe(model))
    try:
        ranks, history = refine_on_probe(scorer, layers, ladders, start, target, fixed, max_rounds=2)
        assert history["probe_error"] < history["probe_error_start"], history
        assert history["trades"] >= 1 and history["evaluations"] > len(layers)
        assert 0.98 * target <= fixed + sum(l.macs(ranks[l.name]) for l in layers) <= target
        assert scorer.error(ranks) == pytest.approx(history["probe_error"], rel=1e-5)
        # a budget of forwards too small for one round: no round, the start comes back
        movable = sum(len(ladders[l.name]) > 1 for l in layers)
        same, short = refine_on_probe(scorer, layers, ladders, start, target, fixed, max_rounds=2,
                                      max_evaluations=2 * movable + 1)
        assert short["stopped"] == "evaluation budget" and short["rounds"] == 0 and same == start
        assert short["evaluations"] == 0  # nothing measured beyond the start
    finally:
        scorer.restore()
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # network restored
    assert not any(isinstance(m, TuckerConv) for m in net.modules())


def test_volume_scorer_predicts_as_nnunets_sliding_window():
    """The validation volumes are nnU-Net's own preprocessing of the phantoms, and the batched
    tiles give nnU-Net's predictor's logits (same steps, same Gaussian)."""
    from TuckerSegLib.demo.demo_model import materialize_demo_model
    from TuckerSegLib.models.nnunet_folder import load_model_folder
    from TuckerSegLib.compression.probe_data import default_probe, default_validation
    from TuckerSegLib.compression.search import ProbeScorer, VolumeScorer, volume_cost
    from TuckerSegLib.pipeline.nnunet_predict import load_predictor

    folder = materialize_demo_model()
    model = load_model_folder(folder)
    validation = default_validation(model, seeds=(300,))
    volumes = validation.build()
    assert [tuple(v.shape) for v in volumes] == list(validation.shapes)
    net = model.network.eval()
    probe = default_probe(model)
    scorer = ProbeScorer(net, {s.name: s for s in find_sites(net)}, {}, probe)
    volume_scorer = VolumeScorer(scorer, volumes, model.patch_size)
    assert volume_scorer.cost == volume_cost(validation.shapes, model.patch_size, probe.shape)
    assert scorer.evaluations == volume_scorer.cost  # the reference is paid for
    predictor = load_predictor(folder, device="cpu")
    predictor.network = net
    small = volumes[0][:, :20, 5:30, :].contiguous()  # under one patch on two axes: padded, then cropped
    for ours, volume in ((volume_scorer._predict(0), volumes[0]),
                         (VolumeScorer(scorer, [small], model.patch_size)._predict(0), small)):
        with torch.no_grad():
            expected = predictor.predict_sliding_window_return_logits(volume).float()
        assert ours.shape == expected.shape
        # nnU-Net accumulates the weighted tiles in float16 (steps of up to 1/2 at these values); we in float32
        assert torch.allclose(ours, expected, atol=0.75)
        assert float((ours.argmax(0) == expected.argmax(0)).float().mean()) > 0.999
    assert volume_scorer.error({}) == pytest.approx(0.0, abs=1e-9)  # the original agrees with itself


def test_refinement_keeps_only_trades_the_volumes_confirm():
    """With validation volumes, every kept trade lowers the whole-volume error, the volumes'
    cost comes out of the evaluation budget, and the report says what was validated."""
    from TuckerSegLib.demo.demo_model import materialize_demo_model
    from TuckerSegLib.models.nnunet_folder import load_model_folder
    from TuckerSegLib.compression.probe_data import budget_inputs, default_validation

    model = load_model_folder(materialize_demo_model())
    uniform = compress_network(model.network, CompressionSpec(0.2, "uniform"), patch_size=model.patch_size)
    measured = budget_inputs(model)
    res = compress_network(model.network, CompressionSpec(uniform.report["macs_ratio"], "budget"),
                           patch_size=model.patch_size, data=measured)
    alloc = res.report["allocation"]
    assert alloc["validation"]["volumes"] == len(measured.validation.shapes) == 4
    assert alloc["chosen"] == min(alloc["volume_error"], key=alloc["volume_error"].get)
    refined = alloc["refined"]
    assert refined["volume_error"] <= refined["volume_error_start"] == alloc["volume_error"][alloc["chosen"]]
    assert (refined["trades"] == 0) == (refined["volume_error"] == refined["volume_error_start"])
    # what the report says is what the network does on the volumes
    from TuckerSegLib.compression.probe_data import default_probe
    from TuckerSegLib.compression.search import ProbeScorer, VolumeScorer

    net = res.network.eval()
    scorer = ProbeScorer(net, {s.name: s for s in find_sites(net)}, {}, default_probe(model))
    ours = VolumeScorer(scorer, measured.validation.build(), model.patch_size)
    ref_scorer = ProbeScorer(model.network.eval(), {}, {}, default_probe(model))
    original = VolumeScorer(ref_scorer, measured.validation.build(), model.patch_size)
    from TuckerSegLib.compression.search import output_error

    errors = [output_error(ours._predict(i)[None], ref[None]) for i, ref in enumerate(original.reference)]
    assert sum(errors) / len(errors) == pytest.approx(refined["volume_error"], rel=1e-3)
    # a budget that cannot pay for the volumes (40 phantoms, never built): the probe alone decides
    probe_only = compress_network(model.network, CompressionSpec(uniform.report["macs_ratio"], "budget"), patch_size=model.patch_size, data=CompressionData(probe=measured.probe, validation=default_validation(model, seeds=tuple(range(300, 340)))))
    assert probe_only.report["allocation"]["validation"]["volumes"] == 0
    assert "volume_error" not in probe_only.report["allocation"]


def test_trade_plan_pays_each_raise_with_cheaper_cuts():
    from TuckerSegLib.compression.search import _plan_trades

    ups = [(2.0, "a", (8, 8), 10), (0.1, "e", (8, 8), 4)]
    downs = [(0.5, "b", (4, 4), 6), (1.0, "c", (4, 4), 6), (3.0, "d", (4, 4), 50)]
    assert _plan_trades(ups, downs, slack=0) == [[("a", (8, 8)), ("b", (4, 4)), ("c", (4, 4))]]
    # slack under the target pays part of a raise; no cut dearer than the gain is taken
    assert _plan_trades(ups[:1], downs, slack=5) == [[("a", (8, 8)), ("b", (4, 4))]]
    assert _plan_trades(ups[:1], downs[2:], slack=0) == []
    assert _plan_trades([(-1.0, "a", (8, 8), 10)], downs, slack=100) == []


def test_default_probe_batches_small_patches_from_different_phantoms():
    from TuckerSegLib.demo.demo_model import materialize_demo_model
    from TuckerSegLib.models.nnunet_folder import load_model_folder
    from TuckerSegLib.compression.probe_data import MAX_PROBE_PATCHES, default_probe

    model = load_model_folder(materialize_demo_model())
    probe = default_probe(model)
    assert probe.shape == (MAX_PROBE_PATCHES, 1, *model.patch_size)
    assert all(not torch.equal(probe[0], probe[i]) for i in range(1, len(probe)))
    assert torch.isfinite(probe).all() and probe.std() > 0.1
    assert torch.equal(default_probe(model), probe)  # deterministic: cached compressions reproduce


def test_cache_probes_sensitivities_once_per_model_and_gives_the_same_ranks(tmp_path, monkeypatch):
    """A model's second ratio reuses the layer sensitivities the first measured (they do not depend
    on the ratio) and gets exactly the ranks a fresh cache gives it."""
    from TuckerSegLib.compression import cache, sensitivity
    from TuckerSegLib.demo.demo_model import materialize_demo_model
    from TuckerSegLib.specs import CompressionSpec

    folder = materialize_demo_model(tmp_path / "models")
    probes = []
    original = sensitivity.layer_sensitivities
    monkeypatch.setattr(sensitivity, "layer_sensitivities",
                        lambda *a, **k: probes.append(1) or original(*a, **k))
    spec = lambda r: CompressionSpec(ratio=r, policy="budget", refine=False)
    cache.get_compressed_model(folder, spec(0.5), cache_dir=tmp_path / "shared")
    second = cache.get_compressed_model(folder, spec(0.3), cache_dir=tmp_path / "shared")
    assert len(probes) == 1  # the second ratio did not probe
    fresh = cache.get_compressed_model(folder, spec(0.3), cache_dir=tmp_path / "fresh")
    assert len(probes) == 2
    ranks = lambda m: [(e["name"], e["ranks"]) for e in m.manifest["report"]["layers"]]
    assert ranks(second) == ranks(fresh)
    assert any(r is not None for _, r in ranks(second))
