"""Shared pytest fixtures.

Real data lives outside the repo. ``TUCKERSEG_TEST_DATA`` points at it; by default it is the
``shared/data`` folder beside the checkout (``<repo>/../shared/data``). Tests that need it skip
with the reason when it is absent.

Slicer's own Python, CMake macros and Extensions Index checks (for the Slicer module's tests) are
found the same way: ``TUCKERSEG_SLICER_DIR``, default ``<repo>/../shared/slicer``
(``slicer_app.SLICER_DIR``).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = Path(os.environ.get("TUCKERSEG_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder with the real CT and TotalSegmentator's reference segmentations."""
    if not (DATA_DIR / "example_ct_sm.nii.gz").exists():
        pytest.skip(f"real CT test data not found in {DATA_DIR} (set TUCKERSEG_TEST_DATA to the "
                    f"folder holding example_ct_sm.nii.gz)")
    return DATA_DIR


@pytest.fixture(autouse=True)
def _isolated_totalseg_home(tmp_path_factory, monkeypatch):
    """Never touch the user's ~/.totalsegmentator: each test session gets its own home."""
    home = tmp_path_factory.getbasetemp() / "totalseg_home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(home))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    # TotalSegmentator would otherwise try to send usage statistics over the network.
    import json
    cfg = home / "config.json"
    if not cfg.exists():
        cfg.write_text(json.dumps({"totalseg_id": "totalseg_tests", "send_usage_stats": False,
                                   "prediction_counter": 0, "statistics_disclaimer_shown": True}))


@pytest.fixture(autouse=True)
def _cold_models():
    """Each test starts without models a previous test prepared in this process (the pipeline keeps
    them warm for later runs of the same process), so that what a test measures is its own."""
    import sys

    yield
    hook = sys.modules.get("TuckerSegLib.pipeline.predictor_hook")
    if hook is not None:
        hook.clear_warm_models()
