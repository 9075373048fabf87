"""The warm worker (``tuckerseg serve``) with the real pipeline and TotalSegmentator-layout test
models (3 mm, width 0.125): two requests share one model load, a cancelled request leaves the
worker usable and writes nothing, a bad request gets the command line's one-line error, and a
cancel reaches a running prediction between two patches.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from TuckerSegLib.errors import Cancelled
from TuckerSegLib.models import totalseg_layout
from TuckerSegLib.progress import NullProgress, parse_event
from TuckerSegLib.serve import ServeClient

REPO = Path(__file__).resolve().parents[2]
FAST = ["--fast", "--device", "cpu", "--engine", "torch", "--layer-forms", "as-is",
        "--ratio", "0.5", "--policy", "uniform"]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    home = tmp_path_factory.getbasetemp() / "totalseg_home"
    totalseg_layout.build_models(home / "nnunet" / "results", [297], width_scale=0.125)
    return home


@pytest.fixture(scope="module")
def cts(shared_data, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("serve_cts")
    img = nib.load(str(shared_data / "example_ct_sm.nii.gz"))
    a = np.asarray(img.dataobj)
    nib.save(img, folder / "a.nii.gz")
    nib.save(nib.Nifti1Image(a[::-1].copy(), img.affine, img.header), folder / "flip.nii.gz")
    nib.save(nib.Nifti1Image(a[:, :, a.shape[2] // 2].copy(), img.affine), folder / "flat.nii.gz")
    return {p.stem.split(".")[0]: p for p in folder.glob("*.nii.gz")}


def _env(home: Path) -> dict:
    return dict(os.environ, TOTALSEG_HOME_DIR=str(home),
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


@pytest.fixture(scope="module")
def client(home, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_log") / "stderr.txt"
    with open(log, "w") as err, ServeClient(env=_env(home), stderr=err) as c:
        yield c
    assert c.process.returncode == 0, log.read_text()[-2000:]


def _labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def test_two_requests_share_one_model_load(client, cts, home, tmp_path):
    cache = ["--cache-dir", str(tmp_path / "cache")]
    first = client.segment(["-i", cts["a"], "-o", tmp_path / "a.nii.gz", *FAST, *cache])
    second = client.segment(["-i", cts["flip"], "-o", tmp_path / "flip.nii.gz", *FAST, *cache])
    assert [m["warm"] for m in first["models"]] == [False]
    assert [m["warm"] for m in second["models"]] == [True]  # neither loaded nor prepared again
    assert client.alive
    # the warm worker writes what a fresh `tuckerseg segment` process writes
    fresh = tmp_path / "fresh.nii.gz"
    proc = subprocess.run([sys.executable, "-m", "TuckerSegLib", "segment", "-i", str(cts["flip"]), "-o",
                           str(fresh), *FAST, *cache, "--progress", "none"], env=_env(home),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_array_equal(_labels(tmp_path / "flip.nii.gz"), _labels(fresh))


def test_cancel_leaves_the_worker_usable_and_writes_nothing(client, cts, tmp_path):
    out = tmp_path / "cancelled.nii.gz"
    # budget compression of a new model takes seconds and reports progress throughout
    rid = client.submit(["-i", cts["a"], "-o", out, *FAST[:-4], "--ratio", "0.4", "--policy", "budget",
                         "--cache-dir", tmp_path / "cache"])
    stages = []
    for event in client.events(rid, timeout=600):
        if event["type"] == "stage":
            stages.append(event["stage"])
            if event["stage"] not in ("check", "weights") and len(stages) == 3:
                client.cancel(rid)
        if event["type"] == "done":
            done = event
    assert done["returncode"] == Cancelled.exit_code, stages
    assert not out.exists() and not list(tmp_path.glob("*.nii*"))
    again = client.segment(["-i", cts["a"], "-o", tmp_path / "after.nii.gz", *FAST,
                            "--cache-dir", tmp_path / "cache"])
    assert (tmp_path / "after.nii.gz").is_file() and again["models"]


def _cli_error(args, home: Path):
    proc = subprocess.run([sys.executable, "-m", "TuckerSegLib", "segment", *map(str, args), "--progress", "json"],
                          env=_env(home), capture_output=True, text=True)
    events = [e for e in map(parse_event, proc.stdout.splitlines()) if e and e["type"] == "error"]
    return proc.returncode, events[-1]["message"] if events else proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("case", ["missing", "flat", "no_output"])
def test_bad_request_gets_the_command_lines_one_line_error(client, cts, home, tmp_path, case):
    args = {"missing": ["-i", tmp_path / "nope.nii.gz", "-o", tmp_path / "x.nii.gz", *FAST],
            "flat": ["-i", cts["flat"], "-o", tmp_path / "x.nii.gz", *FAST],
            "no_output": ["-i", cts["a"]]}[case]
    reply = client.wait(client.submit(args), timeout=300)
    code, message = _cli_error(args, home)
    assert reply.returncode == code != 0
    if case == "no_output":  # argparse's complaint, without its usage lines
        assert message.endswith(reply.error), (message, reply.error)
    else:
        assert reply.error == message and "\n" not in message
    assert not (tmp_path / "x.nii.gz").exists() and client.alive


class _CancelAtFirstPatch(NullProgress):
    def __init__(self):
        self.checks = 0

    def check(self) -> None:  # only the predictor's per-patch hook calls this
        self.checks += 1
        raise Cancelled("cancelled")


def test_a_cancel_reaches_the_running_prediction(home, cts, tmp_path, monkeypatch):
    from TuckerSegLib.pipeline import predictor_hook
    from TuckerSegLib.pipeline.segment import segment
    from TuckerSegLib.specs import CompressionSpec, RunSpec

    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(home))
    progress = _CancelAtFirstPatch()
    out = tmp_path / "seg.nii.gz"
    with pytest.raises(Cancelled):
        segment(cts["a"], out, CompressionSpec(ratio=0.5, policy="uniform"),
                RunSpec(engine="torch", layer_forms="as-is", device="cpu"), mode="fast",
                cache_dir=tmp_path / "cache", progress=progress, quiet=True)
    assert progress.checks == 1 and not out.exists() and not list(tmp_path.glob("*.nii*"))
    warm = list(predictor_hook._warm.values())
    assert warm, "the prepared model stays warm for the next run"
    assert all(not module._forward_pre_hooks for _, module, *_ in warm)  # no stale cancel hook


def test_a_one_shot_command_keeps_no_network_while_the_api_keeps_it_warm(home, cts, tmp_path, monkeypatch):
    """``tuckerseg segment`` as a process (``console_main``: one command, then exit) frees each
    network once it has predicted (``total`` would otherwise hold its five at the end); the same
    command in a process that goes on (the API, the warm worker) keeps it for the next run."""
    from TuckerSegLib.cli.main import main
    from TuckerSegLib.pipeline import predictor_hook

    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(home))
    args = ["segment", "-i", str(cts["a"]), *FAST, "--cache-dir", str(tmp_path / "cache"), "--progress", "none"]
    assert main([*args, "-o", str(tmp_path / "one_shot.nii.gz")], one_shot=True) == 0
    assert (tmp_path / "one_shot.nii.gz").is_file() and not predictor_hook._warm
    assert main([*args, "-o", str(tmp_path / "kept.nii.gz")]) == 0
    assert len(predictor_hook._warm) == 1
    assert np.array_equal(_labels(tmp_path / "one_shot.nii.gz"), _labels(tmp_path / "kept.nii.gz"))
