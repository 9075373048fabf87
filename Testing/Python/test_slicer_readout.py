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
    assert line == "Params: 9.4 M of 31.2 M   MACs: 120 G of 400 G   expected speed-up: 2.80x"
    assert "n/a" in cost_readout.format_readout(None)


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
n = 0
for quality in specs.MODES:
    for policy in specs.POLICIES:
        for k in range(5, 101):
            cost = cost_readout.estimate("total", quality, k / 100, policy)
            assert cost is not None and cost["macs"] > 0, (quality, policy, k)
            n += 1
seconds = time.perf_counter() - t0
heavy = [m for m in ("torch", "nnunetv2", "numpy") if m in sys.modules]
print(n, seconds, heavy)
"""


def test_readout_imports_no_torch_and_follows_the_slider_instantly():
    """The panel computes the read-out on the GUI thread on entry and on every slider move."""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(MODULE_DIR)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n, seconds, heavy = proc.stdout.split(" ", 2)
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
