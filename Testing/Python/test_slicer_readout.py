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
