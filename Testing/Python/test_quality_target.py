"""Quality targets: the curve a model's choice is read from, and the choice itself.

The search runs on a TotalSegmentator-layout test model (random weights, width 4..40) with the
``paper`` policy (fast to compress, every layer factorised) at two ratios; the pipeline test in ``test_segment_pipeline.py`` runs it
inside TotalSegmentator's pipeline.
"""
from __future__ import annotations

import json

import pytest
import torch

from TuckerSegLib.compression.quality_curve import (MAX_FRACTION, REFINE_STEPS, SEARCH_FRACTIONS, QualityCurve,
                                                   QualityPoint, curves, next_fraction, register_distilled)
from TuckerSegLib.errors import InputError
from TuckerSegLib.pipeline.quality_target import choose_for_target, pooled_mean_dice
from TuckerSegLib.specs import CompressionSpec

FRACTIONS = (0.7, 0.4)


def _curve(*points) -> QualityCurve:
    return QualityCurve({"phantoms": [1]}, None, [QualityPoint(f, a, ratio=f) for f, a in points])


def test_envelope_is_monotone_and_target_picks_the_cheapest_point_that_meets_it():
    curve = _curve((0.9, 0.97), (0.8, 0.93), (0.7, 0.95), (0.6, 0.80))
    env = curve.envelope()
    assert [p.macs_fraction for p in env] == [0.9, 0.8, 0.7, 0.6]
    assert all(a.agreement >= b.agreement for a, b in zip(env, env[1:]))  # fewer MACs never promise more
    assert [p.agreement for p in env] == [0.97, 0.93, 0.93, 0.80]
    assert curve.best_for(0.95).macs_fraction == 0.9  # 0.7's 0.95 lies below a miss: not trusted
    assert curve.best_for(0.90).macs_fraction == 0.7
    assert curve.best_for(0.99) is None
    assert curve.best_for(0.5, max_fraction=0.65).macs_fraction == 0.6
    # agreements compare at 3 decimals: float noise between engines does not flip a choice
    assert _curve((0.5, 0.94996)).best_for(0.95) is not None
    # interpolation between measured points, 1.0 at the original, unknown below the last point
    assert curve.predicted(1.0) == 1.0
    assert curve.predicted(0.95) == pytest.approx(0.985)
    assert curve.predicted(0.75) == pytest.approx(0.93)
    assert curve.predicted(0.5) is None
    back = QualityCurve.from_dict(json.loads(json.dumps(curve.as_dict())))
    assert back.best_for(0.90).macs_fraction == 0.7


def test_search_walks_down_then_bisects_between_the_last_hit_and_the_first_miss():
    """With agreement = MAC fraction and target 0.75: 0.9, 0.8 meet, 0.7 misses; then 0.75 meets
    and 0.725 misses; the choice is 0.75. The top fraction missing, or none, stops at once."""
    def search(agreement, target, fractions=SEARCH_FRACTIONS):
        curve, order = QualityCurve({}), []
        while (f := next_fraction(curve, target, fractions)) is not None:
            order.append(f)
            curve.points.append(QualityPoint(f, agreement(f), ratio=f))
        return order, curve.best_for(target)

    order, best = search(lambda f: f, 0.75)
    assert order == [0.9, 0.8, 0.7, 0.75, 0.725] and best.ratio == 0.75
    order, best = search(lambda f: 0.5, 0.9)
    assert order == [0.9] and best is None  # only the original meets it: one point
    order, best = search(lambda f: 1.0, 0.9, fractions=(0.9, 0.5))
    assert order == [0.9, 0.5] and best.ratio == 0.5  # nothing missed: nothing to refine


def test_distilled_points_compete_with_zero_shot():
    curve = _curve((0.9, 0.97), (0.8, 0.85))
    curve.points.append(QualityPoint(0.3, 0.96, source="distilled", folder="/x"))
    assert curve.best_for(0.95).folder == "/x"


def test_a_lower_precision_runs_only_where_it_meets_the_target_and_is_faster_here():
    """bf16 points never move the ranks (the f32 curve alone chooses them); a target runs the
    chosen network or the original at bf16 only where that run's own agreement meets the target
    and it was timed faster than f32 here."""
    curve = _curve((0.9, 0.96), (0.8, 0.85))
    curve.reference_seconds_per_patch = 6.0
    curve.points[0].seconds_per_patch = 5.5
    assert curve.fastest_for(0.95, ("f32", "bf16")) == curve.points[0]  # nothing measured in bf16 yet
    curve.points.append(QualityPoint(1.0, 0.97, source="original", seconds_per_patch=3.5, precision="bf16"))
    curve.points.append(QualityPoint(0.9, 0.94, ratio=0.9, seconds_per_patch=3.2, precision="bf16"))
    curve.points.append(QualityPoint(0.8, 0.99, ratio=0.8, seconds_per_patch=2.0, precision="bf16"))
    assert curve.best_for(0.95).macs_fraction == 0.9 and curve.best_for(0.90).macs_fraction == 0.9
    assert [p.macs_fraction for p in curve.envelope()] == [0.9, 0.8]  # f32 only
    assert curve.predicted(0.8) == 0.85
    # 0.95: 90 % in bf16 misses (0.94); the original in bf16 meets it and beats 90 % in f32
    chosen = curve.fastest_for(0.95, ("f32", "bf16"))
    assert (chosen.source, chosen.precision) == ("original", "bf16")
    # 0.90: 90 % in bf16 meets it and is fastest; 80 % in bf16 is no candidate (the ranks are f32's)
    chosen = curve.fastest_for(0.90, ("f32", "bf16"))
    assert (chosen.macs_fraction, chosen.precision) == (0.9, "bf16")
    assert curve.fastest_for(0.90) == curve.best_for(0.90)  # f32 only when bf16 is not allowed
    assert curve.fastest_for(0.98, ("f32", "bf16")) is None  # only the original f32 meets it
    # slower in bf16 here (a CPU without native bf16 arithmetic): f32 stays
    for p in curve.points:
        if p.precision == "bf16":
            p.seconds_per_patch = 9.0
    assert curve.fastest_for(0.95, ("f32", "bf16")) == curve.points[0]
    back = QualityCurve.from_dict(json.loads(json.dumps(curve.as_dict())))
    assert [p.precision for p in back.points] == [p.precision for p in curve.points]


def test_the_original_on_a_faster_engine_runs_only_where_nothing_compressed_does_and_it_meets_the_target():
    """Stock's PyTorch made the reference; the original on OpenVINO f32 is one more way to run a
    target that falls back to the original, taken only when allowed, meeting the target and faster."""
    curve = _curve((0.9, 0.90), (0.8, 0.85))
    curve.reference_seconds_per_patch = 9.0
    fast = QualityPoint(1.0, 0.997, source="original", seconds_per_patch=6.0, engine="openvino")
    curve.points.append(fast)
    assert curve.original_f32() == fast
    assert [p.macs_fraction for p in curve.envelope()] == [0.9, 0.8]  # not a point of the curve
    assert curve.fastest_for(0.95) is None  # not allowed: stock's PyTorch
    assert curve.fastest_for(0.95, fast_original=True) == fast
    assert curve.fastest_for(0.999, fast_original=True) is None  # its own agreement misses
    fast.seconds_per_patch = 12.0
    assert curve.fastest_for(0.95, fast_original=True) is None  # slower than PyTorch here
    fast.seconds_per_patch = 6.0
    # bf16 of the original still wins where it is faster and meets the target
    curve.points.append(QualityPoint(1.0, 0.97, source="original", seconds_per_patch=3.0, precision="bf16"))
    assert curve.fastest_for(0.95, ("f32", "bf16"), fast_original=True).precision == "bf16"
    # where a compressed network meets the target, the original is no candidate
    assert curve.fastest_for(0.90, fast_original=True).macs_fraction == 0.9
    assert curve.predicted(0.95) == pytest.approx(0.95)  # interpolated to 1.0 at the original, as before


def test_candidates_prefer_f32_on_ties_and_a_copy_updates_its_stored_point():
    curve = _curve((0.9, 0.96), (0.8, 0.85))
    curve.reference_seconds_per_patch = 6.0
    curve.points[0].seconds_per_patch = 3.0
    curve.points.append(QualityPoint(1.0, 0.97, source="original", seconds_per_patch=3.0, precision="bf16"))
    cands = curve.candidates(0.95, ("f32", "bf16"))
    assert [(t, p.source, p.precision) for t, p in cands] == [(3.0, "zero-shot", "f32"), (3.0, "original", "bf16")]
    assert curve.fastest_for(0.95, ("f32", "bf16")).precision == "f32"  # equal times: the f32 choice
    best = curve.best_for(0.95)  # a copy (the envelope caps agreements)
    curve.update(best, seconds_in_turns=2.5)
    assert curve.points[0].seconds_in_turns == 2.5 and curve.points[0].seconds_per_patch == 3.0
    assert curve.points[0].agreement == 0.96  # only the asked fields change
    # close candidates all timed in turns are compared by those times, not by their lone times
    curve.update(curve.points[-1], seconds_in_turns=2.0)
    assert curve.fastest_for(0.95, ("f32", "bf16")).source == "original"
    # a candidate far slower alone is no contender, whatever the others were timed at in turns
    curve.update(curve.points[-1], seconds_per_patch=9.0)
    assert curve.fastest_for(0.95, ("f32", "bf16")).precision == "f32"
    with pytest.raises(KeyError):
        curve.update(QualityPoint(0.5, 0.5, ratio=0.5), seconds_per_patch=1.0)
    stored = curve.as_dict()
    stored["points"][0]["field_of_a_later_version"] = 1
    assert QualityCurve.from_dict(stored).points == curve.points


def test_a_curve_whose_original_labels_nothing_judges_nothing():
    """Two empty label maps agree perfectly: where the original finds (almost) no foreground on
    every source, no point is evidence, so only the original as stock runs it may run."""
    curve = _curve((0.9, 1.0), (0.67, 1.0))
    curve.reference_seconds_per_patch = 9.0
    curve.points.append(QualityPoint(1.0, 1.0, source="original", seconds_per_patch=3.0, precision="bf16"))
    curve.points.append(QualityPoint(0.67, 1.0, ratio=0.67, seconds_per_patch=1.0, precision="int8"))
    curve.points.append(QualityPoint(1.0, 1.0, source="original", seconds_per_patch=6.0, engine="openvino"))
    curve.points.append(QualityPoint(0.3, 1.0, source="distilled", folder="/x"))
    assert curve.judged and curve.judged_sources() is None  # not known (an older curve): trusted as before
    assert curve.best_for(0.95).folder == "/x"
    assert curve.fastest_for(0.95, ("f32", "bf16", "int8")).source == "distilled"
    curve.reference_foreground = {"phantoms": 0.0004, "mine.nii.gz": 0.0}
    assert not curve.judged and curve.judged_sources() == []
    assert curve.envelope() == [] and curve.best_for(0.5) is None and curve.predicted(0.9) is None
    assert curve.fastest_for(0.95, ("f32", "bf16", "int8"), fast_original=True) is None
    assert curve.candidates(0.95, ("f32", "bf16", "int8"), fast_original=True) == [(9.0, None)]
    # one source with enough foreground is evidence; the other is left out of the judging
    curve.reference_foreground["mine.nii.gz"] = 0.02
    assert curve.judged and curve.judged_sources() == ["mine.nii.gz"]
    assert curve.best_for(0.95).folder == "/x"
    back = QualityCurve.from_dict(json.loads(json.dumps(curve.as_dict())))
    assert back.reference_foreground == curve.reference_foreground


def test_timed_in_turns_gives_each_module_its_fastest_call():
    import time as _time

    from TuckerSegLib.pipeline.quality_target import timed_in_turns

    class Sleep(torch.nn.Module):
        def __init__(self, seconds):
            super().__init__()
            self.seconds, self.calls = seconds, 0

        def forward(self, x):
            self.calls += 1
            _time.sleep(self.seconds)
            return x

    slow, fast = Sleep(0.03), Sleep(0.005)
    t_slow, t_fast = timed_in_turns([slow, fast], torch.zeros(1), rounds=3)
    assert t_slow >= 0.03 and 0.005 <= t_fast < t_slow
    assert slow.calls == fast.calls == 4  # one warm-up, three timed


def test_lower_precisions_only_where_the_user_left_the_choice_to_us():
    from TuckerSegLib.engines.select import why_not
    from TuckerSegLib.pipeline.quality_target import lower_precisions
    from TuckerSegLib.specs import RunSpec

    here = tuple(p for p in ("bf16", "int8") if not why_not("openvino", torch.device("cpu"), p))
    assert lower_precisions(RunSpec(), "cpu") == ("f32", *here)
    assert lower_precisions(RunSpec(engine="openvino"), "cpu") == lower_precisions(RunSpec(), "cpu")
    for run in (RunSpec(precision="f32"), RunSpec(engine="torch"), RunSpec(precision="bf16")):
        assert lower_precisions(run, "cpu") == ("f32",)
    assert lower_precisions(RunSpec(), "cuda") == ("f32",)


def test_pooled_mean_dice():
    ref = torch.tensor([[0, 1, 1, 2], [0, 0, 2, 2]])
    assert pooled_mean_dice(ref, ref.clone(), 3) == 1.0
    test = torch.tensor([[0, 1, 0, 2], [0, 0, 2, 2]])  # class 1: 2*1/(2+1); class 2: 1.0
    assert pooled_mean_dice(ref, test, 3) == pytest.approx((2 / 3 + 1.0) / 2)
    assert pooled_mean_dice(torch.zeros(5), torch.zeros(5), 3) == 1.0  # no foreground anywhere
    with_missing = torch.tensor([0, 0, 3, 3])  # a class only one map has counts as Dice 0
    assert pooled_mean_dice(torch.tensor([0, 0, 1, 1]), with_missing, 4) == 0.0


def test_spec_refuses_bad_targets(tmp_path):
    for bad in (0, 1.5, "x"):
        with pytest.raises(InputError, match="minimum agreement"):
            CompressionSpec(min_agreement=bad)
    with pytest.raises(InputError, match="not found"):
        CompressionSpec(min_agreement=0.9, validate_on=(str(tmp_path / "missing.nii.gz"),))
    assert not CompressionSpec(ratio=1.0, min_agreement=0.9).is_original


@pytest.fixture(scope="module")
def model_297(tmp_path_factory):
    from TuckerSegLib.models import totalseg_layout

    root = tmp_path_factory.mktemp("weights")
    totalseg_layout.build_models(root, [297], width_scale=0.125)
    return totalseg_layout.model_dir(root, 297)


def test_choice_is_measured_once_cached_and_falls_back_to_the_original(model_297, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    spec = CompressionSpec(min_agreement=0.5, policy="paper")
    # not measured yet, and not allowed to measure (a background search will): no choice
    assert choose_for_target(model_297, spec, cache_dir=cache, fractions=FRACTIONS, measure=False) is None
    assert not (cache / "quality_curve.json").exists()
    choice = choose_for_target(model_297, spec, cache_dir=cache, fractions=FRACTIONS)
    (curve,) = curves(model_297, cache).values()
    measured = sorted(p.macs_fraction for p in curve.points)
    assert measured and curve.reference_seconds_per_patch > 0
    assert curve.validation["phantoms"] and curve.validation["patches"] == 4
    # the search walks down until the first miss, then bisects: the hits come before the misses
    env = curve.envelope()
    hits = [p.meets(0.5) for p in env]
    assert hits == sorted(hits, reverse=True) and len(env) <= len(FRACTIONS) + REFINE_STEPS
    if choice.fallback:
        assert not any(p.meets(0.5) for p in env if p.macs_fraction <= MAX_FRACTION)
    else:
        assert choice.point.macs_fraction <= MAX_FRACTION and choice.agreement >= 0.5
        assert choice.spec.ratio == choice.point.ratio and choice.spec.min_agreement is None
        assert "phantom" in choice.source
    # a second call reads the curve: nothing is measured again, and no network is even built
    from TuckerSegLib.models import nnunet_folder

    built = []
    real_network = nnunet_folder._network
    monkeypatch.setattr(nnunet_folder, "_network", lambda *a: built.append(a[0]) or real_network(*a))
    before = (cache / "quality_curve.json").stat().st_mtime_ns
    again = choose_for_target(model_297, spec, cache_dir=cache, fractions=FRACTIONS)
    assert again.spec == choice.spec and (cache / "quality_curve.json").stat().st_mtime_ns == before
    settled = choose_for_target(model_297, spec, cache_dir=cache, fractions=FRACTIONS, measure=False)
    assert settled is not None and settled.spec == choice.spec
    assert built == []
    # a target nothing compressed meets: the original, said in one line
    strict = choose_for_target(model_297, CompressionSpec(min_agreement=1.0, policy="paper"), cache_dir=cache,
                               fractions=FRACTIONS)
    assert strict.fallback and strict.spec.is_original and strict.agreement == 1.0
    assert "running the original network" in strict.summary(1.0)


def test_a_target_only_the_original_meets_measures_it_on_openvino_against_stock_pytorch(model_297, tmp_path):
    """The fallback's faster engine is measured once against the PyTorch reference, and the run
    uses the engine the choice names: OpenVINO where it was chosen, stock's PyTorch otherwise."""
    from TuckerSegLib.pipeline.predictor_hook import how_choice_runs
    from TuckerSegLib.pipeline.quality_target import original_on_fast_engine
    from TuckerSegLib.specs import RunSpec

    if not original_on_fast_engine(RunSpec(), "cpu"):
        pytest.skip("OpenVINO does not run f32 on this CPU")
    assert not original_on_fast_engine(RunSpec(engine="torch"), "cpu")
    assert not original_on_fast_engine(RunSpec(precision="f32"), "cpu")
    cache = tmp_path / "cache"
    spec = CompressionSpec(min_agreement=0.99, policy="paper")
    plain = choose_for_target(model_297, spec, cache_dir=cache, fractions=(0.4,))
    assert plain.fallback and plain.point is None
    (curve,) = curves(model_297, cache).values()
    assert curve.original_f32() is None  # not asked for: not measured
    assert how_choice_runs(plain, RunSpec())[2].engine == "torch"
    assert choose_for_target(model_297, spec, cache_dir=cache, fractions=(0.4,), measure=False,
                             fast_original=True) is None  # needs a measurement
    choice = choose_for_target(model_297, spec, cache_dir=cache, fractions=(0.4,), fast_original=True)
    (curve,) = curves(model_297, cache).values()
    fast = curve.original_f32()
    assert fast.engine == "openvino" and fast.seconds_per_patch > 0 and 0.9 <= fast.agreement <= 1.0
    assert choice.fallback and choice.point == curve.fastest_for(0.99, fast_original=True)
    run = how_choice_runs(choice, RunSpec())[2]
    if choice.point is None:
        assert run.engine == "torch"
        assert not fast.meets(0.99) or fast.seconds_per_patch >= curve.reference_seconds_per_patch
    else:
        assert run.engine == "openvino" and "openvino f32" in choice.summary(0.99)
        assert "than stock's PyTorch" in choice.summary(0.99)
    before = (cache / "quality_curve.json").stat().st_mtime_ns
    again = choose_for_target(model_297, spec, cache_dir=cache, fractions=(0.4,), measure=False, fast_original=True)
    assert again.point == choice.point and (cache / "quality_curve.json").stat().st_mtime_ns == before


def test_with_the_users_ct_each_point_is_judged_by_its_worst_source(model_297, tmp_path):
    """Phantoms can agree more than a real CT; a choice validated on the user's CT must hold there
    too, so a point's agreement is the worst of its sources and the result names them."""
    from TuckerSegLib.compression.phantom import make_phantom, write_phantom

    ct, _ = write_phantom(make_phantom(seed=77, shape=(60, 56, 48)), tmp_path / "mine.nii.gz")
    cache = tmp_path / "cache"
    spec = CompressionSpec(min_agreement=0.5, policy="paper", validate_on=(str(ct),))
    choice = choose_for_target(model_297, spec, cache_dir=cache, fractions=FRACTIONS)
    (curve,) = curves(model_297, cache).values()
    assert curve.validation["agreement"] == "worst source" and curve.validation["cts"] == ["mine.nii.gz"]
    assert curve.points
    for point in curve.points:
        assert set(point.by_source) == {"phantoms", "mine.nii.gz"}
        assert point.agreement == min(point.by_source.values())
    if not choice.fallback:
        assert "worst of phantoms" in choice.source and "mine.nii.gz" in choice.source
    # phantoms alone: one source, pooled as before, a curve of its own
    choose_for_target(model_297, CompressionSpec(min_agreement=0.5, policy="paper"), cache_dir=cache,
                      fractions=FRACTIONS)
    alone = [c for c in curves(model_297, cache).values() if not c.validation["cts"]]
    assert alone and all(p.by_source is None for p in alone[0].points)


def test_bf16_runs_are_measured_against_the_f32_reference_and_chosen_by_their_own_agreement(model_297, tmp_path):
    """Where this CPU runs bf16 natively: the chosen network and the original are measured in bf16
    once (stored in the curve, not measured again), and the choice is the curve's fastest."""
    from TuckerSegLib.engines.select import why_not

    if why_not("openvino", torch.device("cpu"), "bf16"):
        pytest.skip(f"no native bf16 here: {why_not('openvino', torch.device('cpu'), 'bf16')}")
    cache = tmp_path / "cache"
    spec = CompressionSpec(min_agreement=0.5, policy="paper")
    choice = choose_for_target(model_297, spec, cache_dir=cache, fractions=FRACTIONS, precisions=("f32", "bf16"))
    (curve,) = curves(model_297, cache).values()
    low = [p for p in curve.points if p.precision == "bf16"]
    best = curve.best_for(0.5)
    assert {p.source for p in low} >= {"original"} and len(low) == (1 if best is None else 2)
    assert all(0 <= p.agreement <= 1 and p.seconds_per_patch > 0 and p.engine == "openvino" for p in low)
    assert curve.fastest_for(0.5, ("f32", "bf16")) == choice.point or (choice.point is None and
                                                                       curve.fastest_for(0.5, ("f32", "bf16")) is None)
    assert choice.precision == (choice.point.precision if choice.point is not None else "f32")
    before = (cache / "quality_curve.json").stat().st_mtime_ns
    again = choose_for_target(model_297, spec, cache_dir=cache, fractions=FRACTIONS, precisions=("f32", "bf16"))
    assert (again.spec, again.precision) == (choice.spec, choice.precision)
    assert (cache / "quality_curve.json").stat().st_mtime_ns == before
    # the f32-only choice of the same curve keeps its ranks
    assert choose_for_target(model_297, spec, cache_dir=cache, fractions=FRACTIONS).spec.ratio == \
        (1.0 if best is None else best.ratio)


def test_close_ways_to_run_a_target_are_timed_again_in_turns_once(model_297, tmp_path, monkeypatch):
    """Times measured alone minutes apart decide nothing within their noise: the candidates within
    RACE_MARGIN of the fastest are timed again together, once (stored), and the choice is the
    fastest of those times."""
    from TuckerSegLib.compression import quality_curve
    from TuckerSegLib.engines.select import why_not

    if why_not("openvino", torch.device("cpu"), "bf16"):
        pytest.skip(f"no native bf16 here: {why_not('openvino', torch.device('cpu'), 'bf16')}")
    monkeypatch.setattr(quality_curve, "RACE_MARGIN", 1e9)  # every candidate is "close"
    cache = tmp_path / "cache"
    spec = CompressionSpec(min_agreement=0.01, policy="energy")  # below 90 % of the MACs here
    choice = choose_for_target(model_297, spec, cache_dir=cache, fractions=FRACTIONS, precisions=("f32", "bf16"))
    (curve,) = curves(model_297, cache).values()
    raced = [p for t, p in curve.close_candidates(0.01, ("f32", "bf16"))]
    assert len(raced) >= 2 and all(p is not None and p.seconds_in_turns > 0 for p in raced)
    assert choice.point == curve.fastest_for(0.01, ("f32", "bf16"))
    before = (cache / "quality_curve.json").stat().st_mtime_ns
    again = choose_for_target(model_297, spec, cache_dir=cache, fractions=FRACTIONS, precisions=("f32", "bf16"),
                              measure=False)
    assert again is not None and again.point == choice.point
    assert (cache / "quality_curve.json").stat().st_mtime_ns == before


def test_int8_is_measured_by_the_target_once_and_its_run_reuses_the_quantised_model(model_297, tmp_path,
                                                                                      monkeypatch):
    """On CPUs with VNNI or AMX, INT8 (plain, calibrated on phantoms the validation never uses) is
    a candidate like bf16: measured against the f32 reference once, stored in the curve, and
    the run of an INT8 choice loads the INT8 model the search quantised instead of quantising."""
    from dataclasses import replace

    from TuckerSegLib.engines import int8 as int8_mod
    from TuckerSegLib.pipeline.predictor_hook import how_choice_runs, prepare_for_run
    from TuckerSegLib.pipeline.quality_target import TARGET_INT8_MIN_AGREEMENT
    from TuckerSegLib.specs import RunSpec

    if int8_mod.int8_support_reason():
        pytest.skip(int8_mod.int8_support_reason())
    cache = tmp_path / "cache"
    spec = CompressionSpec(min_agreement=0.5, policy="paper")
    choice = choose_for_target(model_297, spec, cache_dir=cache, fractions=FRACTIONS, precisions=("f32", "int8"))
    (curve,) = curves(model_297, cache).values()
    low = [p for p in curve.points if p.precision == "int8"]
    original = curve.variant(None, "int8")
    # the compressed network is quantised only where the original in INT8 meets the target
    assert original is not None and len(low) == (2 if curve.best_for(0.5) is not None and original.meets(0.5) else 1)
    assert all(0 <= p.agreement <= 1 and p.seconds_per_patch > 0 and p.engine == "openvino" for p in low)
    assert choice.point == curve.fastest_for(0.5, ("f32", "int8"))
    stored = [int8_mod.read_int8(d) for d in (cache / "openvino").glob("int8-*") if d.is_dir()]
    assert stored and all(r["min_agreement"] == TARGET_INT8_MIN_AGREEMENT for r in stored)
    assert all(r["accuracy_control"] is False for r in stored)  # plain nncf.quantize: the target validates
    assert all(r["calibration"].startswith("8 patches at random positions of torso phantom CTs [400") for r in stored)
    # the original in INT8, as a run of that choice prepares it: no second quantisation
    as_int8 = replace(choice, spec=spec.concrete(1.0), fallback=True, point=original, precision="int8",
                      compressed_folder=None)
    run_spec, _, run = how_choice_runs(as_int8, RunSpec())
    assert (run.engine, run.precision, run.int8_min_agreement) == ("openvino", "int8", TARGET_INT8_MIN_AGREEMENT)

    def quantise_again(*args, **kwargs):
        raise AssertionError("the run quantised again instead of loading the search's INT8 model")

    monkeypatch.setattr(int8_mod, "quantise", quantise_again)
    _, _, info = prepare_for_run(model_297, [0], "checkpoint_final.pth", run_spec, run, torch.device("cpu"), cache)
    assert info.precision == "int8" and info.int8["min_agreement"] == TARGET_INT8_MIN_AGREEMENT


def test_deferred_precisions_are_left_for_later_and_named_as_pending(model_297, tmp_path):
    """A run that waits for its search leaves INT8 (minutes of quantising) to the background: the
    choice is made among the measured precisions and names INT8 as pending; a search without
    ``defer`` (the background one) measures it, after which nothing is pending."""
    cache = tmp_path / "cache"
    spec = CompressionSpec(min_agreement=0.5, policy="paper")
    both = ("f32", "int8")
    choice = choose_for_target(model_297, spec, cache_dir=cache, fractions=FRACTIONS, precisions=both,
                               defer=("int8",))
    (curve,) = curves(model_297, cache).values()
    assert choice.pending == ("int8",) and choice.precision != "int8"
    assert not [p for p in curve.points if p.precision == "int8"]
    assert [p for p in curve.points if p.precision == "f32"]  # the rest was measured now
    # what a later run reads without measuring: the same choice while INT8 is missing ...
    again = choose_for_target(model_297, spec, cache_dir=cache, fractions=FRACTIONS, precisions=both,
                              measure=False, defer=("int8",))
    assert again.point == choice.point and again.pending == ("int8",)
    # ... and no choice for a caller that needs every precision measured
    assert choose_for_target(model_297, spec, cache_dir=cache, fractions=FRACTIONS, precisions=both,
                             measure=False) is None
    # without INT8 among the precisions, nothing is pending
    assert choose_for_target(model_297, spec, cache_dir=cache, fractions=FRACTIONS, precisions=("f32",),
                             measure=False, defer=("int8",)).pending == ()


def test_registered_distilled_model_is_validated_and_chosen_when_it_meets_the_target(model_297, tmp_path):
    """A model that reproduces the original (here: the original itself, saved as a compressed
    folder at full rank) is measured on the same patches and wins at fewer MACs than offered."""
    from TuckerSegLib.compression.compress import compress_model
    from TuckerSegLib.models.compressed_file import save_compressed
    from TuckerSegLib.models.nnunet_folder import load_model_folder

    cache = tmp_path / "cache"
    model = load_model_folder(model_297)
    full = compress_model(model, CompressionSpec(ratio=0.9999, policy="paper", rank_min=10_000))
    full.report["macs_ratio"] = 0.05  # claims few MACs: the choice must still validate it
    save_compressed(tmp_path / "student", model, full)
    register_distilled(model_297, tmp_path / "student", cache)
    # 0.9: the student runs on OpenVINO, the reference is stock's PyTorch; on these random weights
    # (logits close together) the engines alone agree only about 0.97
    choice = choose_for_target(model_297, CompressionSpec(min_agreement=0.9, policy="paper"), cache_dir=cache,
                               fractions=(0.5,))
    assert choice.compressed_folder == (tmp_path / "student").resolve()
    assert choice.agreement >= 0.9 and choice.point.source == "distilled"


def test_a_network_that_finds_nothing_on_the_validation_data_runs_as_stock_without_a_search(model_297, tmp_path):
    """A real nnU-Net network whose head labels every voxel background: the target measures only
    the original's labels, compresses nothing, runs the original and says why in one line."""
    import shutil

    from TuckerSegLib.models.checkpoint import load_checkpoint
    from TuckerSegLib.pipeline.predictor_hook import how_choice_runs
    from TuckerSegLib.specs import RunSpec

    folder = tmp_path / model_297.parent.name / model_297.name
    shutil.copytree(model_297, folder)
    path = folder / "fold_0" / "checkpoint_final.pth"
    ckpt = load_checkpoint(path)
    for name, tensor in ckpt["network_weights"].items():
        if name.startswith("decoder.seg_layers."):
            tensor.zero_()
            if name.endswith(".bias"):
                tensor[0] = 10.0
    torch.save(ckpt, path)
    cache = tmp_path / "cache"
    spec = CompressionSpec(min_agreement=0.5, policy="paper")
    assert choose_for_target(folder, spec, cache_dir=cache, fractions=FRACTIONS, measure=False) is None
    choice = choose_for_target(folder, spec, cache_dir=cache, fractions=FRACTIONS,
                               precisions=("f32", "bf16", "int8"), fast_original=True)
    (curve,) = curves(folder, cache).values()
    assert curve.reference_foreground == {"phantoms": 0.0} and curve.points == []
    assert not list(cache.glob("**/manifest.json"))  # nothing was compressed
    assert choice.unjudged and choice.fallback and choice.point is None and choice.spec.is_original
    said = choice.summary(0.5)
    assert "too few voxels as foreground" in said and "--validate-on" in said and "\n" not in said
    assert how_choice_runs(choice, RunSpec())[2].engine == "torch"
    again = choose_for_target(folder, spec, cache_dir=cache, fractions=FRACTIONS, measure=False)
    assert again is not None and again.unjudged
    # the original network of the same layout finds foreground: its search measures points
    judged = choose_for_target(model_297, spec, cache_dir=tmp_path / "cache2", fractions=(0.7,))
    (curve,) = curves(model_297, tmp_path / "cache2").values()
    assert curve.reference_foreground["phantoms"] > 0.001 and curve.points and not judged.unjudged


def test_validation_patches_come_from_torso_phantoms_and_their_anatomy_keys_the_curve(model_297):
    """Quality curves are measured on phantoms with the thorax and back (ribs, sternum, heart,
    back muscles), so that every part of ``total`` meets its structures; the anatomy is part of
    the validation description, so curves measured on the abdomen alone are not reused."""
    from TuckerSegLib.compression.quality_curve import validation_id
    from TuckerSegLib.models.nnunet_folder import load_model_folder
    from TuckerSegLib.pipeline.quality_target import ValidationPatches

    model = load_model_folder(model_297)
    torso, abdomen = ValidationPatches(model), ValidationPatches(model, torso=False)
    assert torso.description["phantom_anatomy"] == "torso" and abdomen.description["phantom_anatomy"] == "abdomen"
    assert validation_id(torso.description) != validation_id(abdomen.description)
    assert torso.patches.shape == abdomen.patches.shape
    props = model.plans["foreground_intensity_properties_per_channel"]["0"]
    bone = (300.0 - props["mean"]) / props["std"]  # ribs and sternum add bone beside the spine's
    assert int((torso.patches > bone).sum()) > 1.2 * int((abdomen.patches > bone).sum())
