"""The panel's read-outs and the dependency check, which need neither Slicer nor MRML."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[2] / "TuckerSeg"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from TuckerSegUtils import cost_readout, dependencies  # noqa: E402


def test_readout_numbers_and_missing_estimate():
    assert cost_readout.human(31_200_000) == "31.2 M"
    assert cost_readout.human(1.5e12, "MAC") == "1.5 TMAC"
    assert cost_readout.human(None) == "n/a"
    line = cost_readout.format_readout({"params": 9.4e6, "params_original": 31.2e6, "macs": 1.2e11,
                                        "macs_original": 4e11, "expected_speedup": 2.8})
    assert line.splitlines()[0] == "Params: 9.4 M of 31.2 M   MACs: 120 G of 400 G (30 %)"
    assert "speed-up" not in line  # a MAC ratio is not a speed-up
    assert "n/a" in cost_readout.format_readout(None)


def _write_curve(root, dataset_id, points, reference_seconds=0.8, policy="budget", foreground=None):
    """A ``quality_curve.json`` as a quality-target run leaves it, beside a (dummy) checkpoint in
    a TotalSegmentator weights root."""
    from TuckerSegLib.compression.quality_curve import QualityCurve, QualityPoint, save_curve
    from TuckerSegLib.estimate import installed_model_folder

    folder = installed_model_folder(dataset_id, Path(root))
    ckpt = folder / "fold_0" / "checkpoint_final.pth"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_bytes(b"weights")
    st = ckpt.stat()
    curve = QualityCurve({"phantoms": ["p1", "p2"]}, reference_seconds,
                         [QualityPoint(f, a, "zero-shot", policy, f, None, s, "openvino") for f, a, s in points],
                         foreground)
    save_curve(folder, f"{st.st_size}-{st.st_mtime_ns}|{policy}|hosvd|8|None|0123abcd", curve)
    return folder


CURVE = [(0.9, 0.991, 0.62), (0.8, 0.972, 0.55), (0.7, 0.931, 0.47), (0.6, 0.874, 0.40)]


def test_readout_shows_predicted_agreement_and_measured_speed_from_the_quality_curve(tmp_path, monkeypatch):
    monkeypatch.delenv("TUCKERSEG_CACHE_DIR", raising=False)
    _write_curve(tmp_path, 297, CURVE)
    text = cost_readout.readout("total", "fast", 0.8, "budget", weights_root=tmp_path)
    sizes, quality, speed = text.splitlines()
    assert sizes.startswith("Params: ") and "MACs: " in sizes
    assert quality == "Predicted agreement 0.972"
    assert speed == "Speed: 0.55 s/patch measured (original 0.80 s, openvino)"
    assert "speed-up" not in text and "\u26a0" not in text
    between = cost_readout.quality("total", "fast", 0.75, "budget", weights_root=tmp_path)
    assert 0.931 < between["predicted_agreement"] < 0.972  # interpolated on the curve
    # TotalSegmentator's own rule finds the same folder: $TOTALSEG_WEIGHTS_PATH
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path))
    assert cost_readout.readout("total", "fast", 0.8, "budget") == text
    # the quality target: what the curve says 0.95 picks (the cheapest point that meets it)
    target = cost_readout.readout("total", "fast", 0.3, "budget", min_agreement=0.95)
    assert "Predicted agreement 0.972\nSpeed: 0.55 s/patch measured" in target
    assert "MACs:" in target.splitlines()[0]  # at the fraction the target picks


def test_readout_says_not_measured_yet_without_a_curve(tmp_path, monkeypatch):
    monkeypatch.delenv("TUCKERSEG_CACHE_DIR", raising=False)
    text = cost_readout.readout("total", "fast", 0.5, "budget", weights_root=tmp_path)
    assert "Agreement not measured yet" in text and "Speed not measured yet" in text
    assert "speed-up" not in text
    target = cost_readout.readout("total", "fast", 0.5, "budget", min_agreement=0.95, weights_root=tmp_path)
    assert "Agreement not measured yet: the first run runs the original and measures it in the background" in target
    # other weights (a new checkpoint) or another policy: their curves do not count
    _write_curve(tmp_path, 297, CURVE, policy="uniform")
    assert "not measured yet" in cost_readout.readout("total", "fast", 0.8, "budget", weights_root=tmp_path)
    # default mode runs five networks: one without a curve means not measured
    _write_curve(tmp_path, 291, CURVE)
    q = cost_readout.quality("total", "default", 0.8, "budget", weights_root=tmp_path)
    assert q["predicted_agreement"] is None and not q["measured"]


def test_readout_says_when_a_network_finds_too_little_on_the_validation_data_to_judge(tmp_path, monkeypatch):
    """A curve whose original labels almost nothing (no points: nothing was compressed) is
    measured; ratio mode cannot predict there and says why, the target runs the original."""
    monkeypatch.delenv("TUCKERSEG_CACHE_DIR", raising=False)
    _write_curve(tmp_path, 297, [], foreground={"phantoms": 0.0})
    q = cost_readout.quality("total", "fast", 0.5, "budget", weights_root=tmp_path)
    assert q["measured"] and q["unjudged"] == [297] and q["predicted_agreement"] is None
    text = cost_readout.readout("total", "fast", 0.5, "budget", weights_root=tmp_path)
    assert "Agreement cannot be judged for 1 network(s)" in text and "not measured yet" not in text.splitlines()[1]
    target = cost_readout.quality("total", "fast", 0.5, "budget", min_agreement=0.95, weights_root=tmp_path)
    assert target["models"][0]["fallback"] and target["macs_fraction"] == 1.0
    # a judged curve of the same model reads as before
    _write_curve(tmp_path, 297, CURVE, foreground={"phantoms": 0.05})
    assert cost_readout.quality("total", "fast", 0.8, "budget", weights_root=tmp_path)["unjudged"] == []


def test_readout_says_when_a_curve_is_being_measured_in_the_background(tmp_path, monkeypatch):
    """While a detached search holds the model's lock (as ``background_search.main`` does), the
    target read-out says so; reading creates no lock file, and a released lock reads as idle."""
    from filelock import FileLock

    from TuckerSegLib.estimate import installed_model_folder
    from TuckerSegLib.pipeline import background_search

    monkeypatch.delenv("TUCKERSEG_CACHE_DIR", raising=False)
    args = ("total", "fast", 0.5, "budget")
    idle = cost_readout.readout(*args, min_agreement=0.95, weights_root=tmp_path)
    assert cost_readout.MEASURING not in idle and "not measured yet" in idle
    assert not list(tmp_path.rglob("*.lock"))
    lock = background_search.lock_path(installed_model_folder(297, tmp_path))
    with FileLock(str(lock)):
        busy = cost_readout.readout(*args, min_agreement=0.95, weights_root=tmp_path)
        assert cost_readout.MEASURING in busy.splitlines()
        assert cost_readout.quality(*args, min_agreement=0.95, weights_root=tmp_path)["measuring"]
        # the other task's networks are not being measured
        assert not cost_readout.quality("total", "default", 0.5, "budget", min_agreement=0.95,
                                        weights_root=tmp_path)["measuring"]
    assert lock.is_file()  # left behind by the search, released
    assert cost_readout.readout(*args, min_agreement=0.95, weights_root=tmp_path) == idle


def test_readout_warns_below_090_and_takes_the_lowest_network(tmp_path, monkeypatch):
    from TuckerSegLib.compression.quality_curve import WARN_BELOW

    monkeypatch.delenv("TUCKERSEG_CACHE_DIR", raising=False)
    for dataset_id in (291, 292, 293, 294, 295):
        worse = 0.05 if dataset_id == 293 else 0.0
        _write_curve(tmp_path, dataset_id, [(f, a - worse, s) for f, a, s in CURVE])
    q = cost_readout.quality("total", "default", 0.7, "budget", weights_root=tmp_path)
    assert q["predicted_agreement"] == 0.931 - 0.05 and q["warn"]  # the minimum over the five
    assert q["seconds_per_patch"] == 5 * 0.47  # the task runs all five per patch
    text = cost_readout.readout("total", "default", 0.7, "budget", weights_root=tmp_path)
    assert "lowest of the task's networks" in text
    assert text.splitlines()[-1] == f"\u26a0 below {WARN_BELOW:.2f}: segmentations may be unusable"
    assert "\u26a0" not in cost_readout.readout("total", "default", 0.9, "budget", weights_root=tmp_path)
    # below every measured point: the envelope bounds it, and that bound is already too low
    low = cost_readout.readout("total", "default", 0.3, "budget", weights_root=tmp_path)
    assert "at most 0.824" in low and "\u26a0" in low
    # a target the user sets below 0.90 warns as well
    assert "\u26a0" in cost_readout.readout("total", "default", 0.3, "budget", min_agreement=0.8,
                                            weights_root=tmp_path)


def test_estimate_follows_the_ratio_when_the_core_provides_it():
    cost = cost_readout.estimate("total", "fast", 0.3, "budget")
    if importlib.util.find_spec("TuckerSegLib.estimate") is None:
        assert cost is None  # the panel then shows n/a
        return
    assert cost is not None
    full = cost_readout.estimate("total", "fast", 1.0, "budget")
    assert cost["macs"] < full["macs"] and cost["expected_speedup"] > 1.0


def test_summary_text():
    text = cost_readout.format_summary({"seconds": 12.34, "segments": 41, "ratio": 0.3,
                                        "policy": "budget", "quality": "fast", "params": 9e6,
                                        "params_original": 31e6, "macs": 1e11, "macs_original": 4e11})
    assert text.splitlines()[0] == "Finished in 12.3 s (41 structures found)"
    assert "Params: 9 M (original 31 M)" in text and "MACs: 100 G (original 400 G)" in text
    assert "Compression ratio: 0.3" in text and "Predicted agreement: not measured" in text
    target = cost_readout.format_summary({"seconds": 5, "segments": 3, "ratio": 0.7, "min_agreement": 0.95,
                                          "predicted_agreement": 0.9612, "policy": "budget", "quality": "fast",
                                          "agreement_source": "measured on 2 phantom CT(s)"})
    assert "Quality target: agreement \u2265 0.95 (budget, fast, 70 % of the MACs kept)" in target
    assert "Predicted agreement: 0.961 (measured on 2 phantom CT(s))" in target and "\u26a0" not in target
    assert "\u26a0" in cost_readout.format_summary({"ratio": 0.2, "predicted_agreement": 0.7})


def test_dependency_check_reports_what_is_not_importable(monkeypatch):
    monkeypatch.setitem(dependencies.REQUIREMENTS, "tuckerseg_no_such_module", "no-such-pkg>=1")
    missing = dependencies.missing_requirements()
    assert "no-such-pkg>=1" in missing
    assert all(r.split(">")[0] != "numpy" for r in missing)  # installed here


NO_TORCH = r"""
import importlib.abc, sys, time
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "nnunetv2", "totalsegmentator", "openvino", "tensorly"):
            raise ImportError("blocked: the panel must not import " + name)
sys.meta_path.insert(0, Block())
sys.path.insert(0, sys.argv[1])
t0 = time.perf_counter()
from TuckerSegUtils import cost_readout
from TuckerSegLib import specs
root = sys.argv[2]
worst = 0.0
for k in range(5, 101):  # the whole read-out line, quality curves included, per slider move
    t = time.perf_counter()
    text = cost_readout.readout("total", "default", k / 100, "budget", weights_root=root)
    worst = max(worst, time.perf_counter() - t)
    assert "greement" in text, text
text = cost_readout.readout("total", "default", 0.8, "budget", weights_root=root)
assert "Predicted agreement 0.972" in text, text
n = 0
for quality in specs.MODES:
    for policy in specs.POLICIES:
        for k in range(5, 101):
            cost = cost_readout.estimate("total", quality, k / 100, policy)
            assert cost is not None and cost["macs"] > 0, (quality, policy, k)
            n += 1
seconds = time.perf_counter() - t0
heavy = [m for m in ("torch", "nnunetv2", "numpy") if m in sys.modules]
print(n, seconds, worst, heavy)
"""


def test_readout_imports_no_torch_and_follows_the_slider_instantly(tmp_path, monkeypatch):
    """The panel computes the read-out on the GUI thread on entry and on every slider move:
    architecture table and quality curves (five models in default mode) without torch."""
    import subprocess

    monkeypatch.delenv("TUCKERSEG_CACHE_DIR", raising=False)
    for dataset_id in (291, 292, 293, 294, 295):
        _write_curve(tmp_path, dataset_id, CURVE)
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(MODULE_DIR), str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n, seconds, worst, heavy = proc.stdout.split(" ", 3)
    assert float(worst) < 0.05, f"one read-out with quality curves took {worst} s"
    assert int(n) == 3 * 4 * 96
    assert float(seconds) < 1.0, f"{n} read-outs took {seconds} s (import included)"
    assert heavy.strip() == "[]"


def test_shipped_readout_table_matches_the_architectures():
    """The table is estimate_cost's output: regenerate it (python -m TuckerSegLib.estimate) when
    the architectures or the rank policies change."""
    import pytest

    from TuckerSegLib.estimate import estimate_cost, readout_cost

    for policy in ("budget", "uniform", "energy", "paper"):
        for ratio in (0.05, 0.3, 0.77, 1.0):
            live = estimate_cost("total", "fast", ratio, policy)
            table = readout_cost("total", "fast", ratio, policy)
            for key in ("params", "macs", "params_original", "macs_original"):
                assert table[key] == pytest.approx(live[key], rel=1e-9), (policy, ratio, key)
    between = readout_cost("total", "fast", 0.305, "uniform")["macs"]
    ends = sorted(readout_cost("total", "fast", r, "uniform")["macs"] for r in (0.30, 0.31))
    assert ends[0] <= between <= ends[1]
    full = readout_cost("total", "default", 1.0, "budget")
    assert full["macs"] == full["macs_original"] and full["expected_speedup"] == 1.0


def test_totalsegmentator_requirements_for_slicer_keep_simpleitk_torch_and_extras_out():
    import importlib.metadata

    import pytest

    try:
        requires = importlib.metadata.requires("TotalSegmentator")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("TotalSegmentator is not installed")
    kept = dependencies.filter_requirements(requires, python_version="3.9")
    names = {dependencies._canonical(dependencies._name(r)) for r in kept}
    assert "nnunetv2" in names and "nibabel" in names
    assert not names & {"simpleitk", "torch", "requests", "mcp", "uvicorn", "xgboost"}
    assert all(";" not in r for r in kept)
    marker = dependencies.filter_requirements(["a>=1; python_version<'3.10'", "b; python_version>='3.10'"],
                                              python_version="3.9")
    assert marker == ["a>=1"]


def test_install_puts_totalsegmentator_and_nnunet_in_without_deps_and_never_simpleitk():
    """The install plan, with the real installed metadata; ``pip`` records instead of installing
    (Slicer's pip_install is what runs inside Slicer)."""
    import importlib.metadata

    import pytest

    if importlib.util.find_spec("totalsegmentator") is None:
        pytest.skip("TotalSegmentator is not installed")
    calls = []
    dependencies.install(["TotalSegmentator>=2.4", "tensorly>=0.8", "openvino>=2024.0"],
                         log=lambda m: None, pip=calls.append, requires=importlib.metadata.requires)
    assert calls[0] == ["TotalSegmentator>=2.4", "--no-deps"]
    assert calls[1][0].startswith("nnunetv2") and calls[1][1:] == ["--no-deps"]
    plain = calls[2]
    assert len(calls) == 3 and "tensorly>=0.8" in plain and "openvino>=2024.0" in plain
    everything = [dependencies._canonical(dependencies._name(a)) for call in calls for a in call]
    assert "simpleitk" not in everything and "torch" not in everything
    assert "batchgenerators" in everything  # nnunetv2's own requirements, from its metadata


def test_engine_needs_are_offered_when_the_engine_changes_and_asked_once(monkeypatch):
    monkeypatch.setitem(dependencies.ENGINE_REQUIREMENTS, "openvino",
                        {"tuckerseg_no_such_openvino": "openvino>=2024.0"})
    assert "openvino>=2024.0" in dependencies.missing_requirements("openvino")
    assert "openvino>=2024.0" not in dependencies.missing_requirements("torch")
    gate = dependencies.DependencyGate()
    assert gate.to_offer("torch") == []  # everything else is installed here
    assert gate.to_offer("openvino") == ["openvino>=2024.0"]
    gate.answered(["openvino>=2024.0"])  # declined: not asked again on the next change
    assert gate.to_offer("openvino") == [] and gate.missing("openvino") == ["openvino>=2024.0"]
