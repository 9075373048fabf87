"""The module under Slicer 5.6.2, 5.8.1 and 5.10.0's own Python: ``slicer_tag_checks.py`` in one
process per tag (Slicer's Python files are appended to ``slicer.__path__`` and cannot be swapped
inside a process). Skips with the reason when ``TUCKERSEG_SLICER_DIR`` or slicer-core is absent."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import slicer_app

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("tag", slicer_app.TAGS)
def test_module_under_slicer_release(tag, tmp_path):
    reason = slicer_app.missing_reason(tag)
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, TUCKERSEG_SLICER_TAG=tag)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(slicer_app.REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t"),
         str(HERE / "slicer_tag_checks.py")],
        cwd=str(slicer_app.REPO), env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"Slicer {tag}:\n{tail}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.split("\n")[-2], tail
