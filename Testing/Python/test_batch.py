"""``tuckerseg batch`` on a local Ray instance, with the real small CT and TotalSegmentator-layout
test models (3 mm, width 0.125): bad cases are recorded and the batch goes on, a killed worker
loses and duplicates nothing, an interrupted batch continues where it stopped, and each output
equals what ``segment`` writes for that case.

One Ray instance (2 CPUs, small object store, no dashboard, loopback) serves the module and is
shut down at its end. Compression is ``uniform`` with layer forms as-is and the torch engine, so
that the first (cold) case costs seconds, not minutes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("ray")

from TuckerSegLib.models import totalseg_layout  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OPTIONS = dict(ratio=0.5, policy="uniform", fast=True, ml=True, engine="torch", layer_forms="as-is",
               device="cpu")
GOOD = ("ct_a", "ct_crop", "ct_flip")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.getbasetemp() / "totalseg_home" / "nnunet" / "results"
    totalseg_layout.build_models(root, [297], width_scale=0.125)
    return root


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=80 * 1024 * 1024, include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def cohort(shared_data, tmp_path_factory) -> Path:
    """Three small CTs derived from example_ct_sm, a truncated file and a 2D image."""
    folder = tmp_path_factory.mktemp("cohort")
    img = nib.load(str(shared_data / "example_ct_sm.nii.gz"))
    a = np.asarray(img.dataobj)
    nib.save(img, folder / "ct_a.nii.gz")
    nib.save(nib.Nifti1Image(a[::-1].copy(), img.affine, img.header), folder / "ct_flip.nii.gz")
    nib.save(nib.Nifti1Image(a[:, :, : a.shape[2] * 2 // 3].copy(), img.affine, img.header),
             folder / "ct_crop.nii.gz")
    raw = (folder / "ct_a.nii.gz").read_bytes()
    (folder / "corrupt.nii.gz").write_bytes(raw[: len(raw) // 3])
    nib.save(nib.Nifti1Image(a[:, :, 10].copy(), img.affine), folder / "flat2d.nii.gz")
    return folder


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("batch_cache")


def _good(cohort: Path):
    return [cohort / f"{c}.nii.gz" for c in GOOD]


@pytest.fixture(scope="module")
def mixed_batch(models, ray_local, cohort, cache_dir, tmp_path_factory):
    """The whole cohort folder (3 good, 1 corrupt, 1 2D) with statistics."""
    import TuckerSegLib

    out = tmp_path_factory.mktemp("mixed") / "out"
    events = []
    with pytest.MonkeyPatch.context() as mp:  # module fixtures run before conftest's per-test home
        mp.setenv("TOTALSEG_HOME_DIR", str(models.parents[1]))
        df = TuckerSegLib.batch([cohort], out, statistics=True, cache_dir=cache_dir,
                                callback=events.append, **OPTIONS)
    return df, out, events


def _data(path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def test_bad_cases_are_recorded_and_good_cases_written(mixed_batch):
    import pandas as pd

    from TuckerSegLib.cohort.manifest import Manifest

    df, out, events = mixed_batch
    status = dict(zip(df["case_id"], df["status"]))
    assert status == {"corrupt": "failed", "flat2d": "failed", "ct_a": "done", "ct_crop": "done",
                      "ct_flip": "done"}
    errors = dict(zip(df["case_id"], df["error"]))
    assert "cannot be read" in errors["corrupt"] and "\n" not in errors["corrupt"]
    assert "2D image" in errors["flat2d"]
    for case in GOOD:
        row = df[df["case_id"] == case].iloc[0]
        assert Path(row["output"]) == out / "cases" / case / "segmentation.nii.gz"
        assert Path(row["output"]).is_file() and (out / "cases" / case / "statistics.json").is_file()
        assert row["macs"] < row["macs_original"] and row["network"].startswith("297:torch")
        assert row["seconds"] > 0 and (out / "logs" / f"{case}.log").read_text().count("=== done") == 1
    assert "liver_volume_mm3" in df.columns and "liver_mean_hu" in df.columns
    assert pd.isna(df["predicted_agreement"]).all()  # no quality target yet
    # the networks were built once, before the workers, in one task
    assert [e["type"] for e in events].count("built") == 1
    assert events.index(next(e for e in events if e["type"] == "built")) < \
        events.index(next(e for e in events if e["type"] == "worker"))
    # CSV and Parquet hold the same table; the summary counts it
    csv = pd.read_csv(out / "results.csv")
    pq = pd.read_parquet(out / "results.parquet")
    assert list(csv["case_id"]) == list(pq["case_id"]) == list(df["case_id"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == 3 and summary["failed"] == 2 and summary["cases_per_hour"] > 0
    assert not list((out / "cases").glob(".tmp-*"))
    assert all(n == 1 for n in Manifest(out).done_count.values())
    # the first worker said when its engines were ready: the others did not wait for a whole case
    from TuckerSegLib.cohort.worker import engines_ready_marker
    assert engines_ready_marker(out).read_text().strip() in set(df["worker"])


def test_outputs_equal_segment_case_by_case(mixed_batch, cohort, cache_dir, tmp_path):
    import torch

    from TuckerSegLib import segment

    df, out, _ = mixed_batch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the batch's 1-CPU workers run
    try:
        for case in GOOD:
            ref = tmp_path / f"{case}.nii.gz"
            segment(cohort / f"{case}.nii.gz", ref, cache_dir=cache_dir, quiet=True, **OPTIONS)
            assert np.array_equal(_data(out / "cases" / case / "segmentation.nii.gz"), _data(ref)), case
    finally:
        torch.set_num_threads(threads)


def test_killed_worker_loses_no_case_and_duplicates_none(models, ray_local, cohort, cache_dir, tmp_path):
    import TuckerSegLib
    from TuckerSegLib.cohort.manifest import Manifest

    out = tmp_path / "out"
    events, killed = [], []

    def on_event(event):
        events.append(event)
        if event["type"] == "dispatch" and not killed:
            killed.append((event["case_id"], event["pid"]))
            # kill the worker's process while it segments (cases take several seconds here)
            threading.Timer(2.0, os.kill, (event["pid"], signal.SIGKILL)).start()

    df = TuckerSegLib.batch(_good(cohort), out, cache_dir=cache_dir, callback=on_event, **OPTIONS)
    victim = killed[0][0]
    assert any(e["type"] == "worker_died" and e["pid"] == killed[0][1] for e in events)
    assert list(df["status"]) == ["done"] * 3
    rows = {r.case_id: r for r in df.itertuples()}
    assert rows[victim].attempts == 2 and str(killed[0][1]) not in rows[victim].worker
    manifest = Manifest(out)
    assert manifest.done_count == {c: 1 for c in GOOD}
    assert [e["row"]["case_id"] for e in events if e["type"] == "case"].count(victim) == 1
    assert not list((out / "cases").glob(".tmp-*"))
    assert sorted(p.name for p in (out / "cases").iterdir()) == sorted(GOOD)


def test_interrupted_batch_reruns_only_the_remaining_cases(models, ray_local, cohort, cache_dir, tmp_path):
    import TuckerSegLib
    from TuckerSegLib.errors import Cancelled

    out = tmp_path / "out"
    first = []

    def interrupt_after_first(event):
        if event["type"] == "case":
            first.append(event["row"]["case_id"])
            raise KeyboardInterrupt  # what Ctrl-C does in the driver loop

    with pytest.raises(Cancelled, match="rerun the same command"):
        TuckerSegLib.batch(_good(cohort), out, cache_dir=cache_dir, callback=interrupt_after_first,
                           **OPTIONS)
    partial = json.loads((out / "summary.json").read_text())
    assert partial["done"] == 1 and partial["pending"] == 2 and partial["interrupted"]

    dispatched = []
    df = TuckerSegLib.batch(_good(cohort), out, cache_dir=cache_dir, **OPTIONS,
                            callback=lambda e: e["type"] == "dispatch" and dispatched.append(e["case_id"]))
    assert sorted(dispatched) == sorted(set(GOOD) - set(first))
    assert list(df["status"]) == ["done"] * 3
    assert df.attrs["summary"]["skipped_already_done"] == 1


def test_rerun_with_other_settings_is_refused(tmp_path):
    from TuckerSegLib.cohort.manifest import check_settings
    from TuckerSegLib.errors import InputError

    check_settings(tmp_path, {"ratio": 0.5, "task": "total"})
    check_settings(tmp_path, {"ratio": 0.5, "task": "total"})
    with pytest.raises(InputError, match="ratio 0.5 -> 0.3"):
        check_settings(tmp_path, {"ratio": 0.3, "task": "total"})


def test_manifest_ignores_a_torn_last_line(tmp_path):
    from TuckerSegLib.cohort.cases import Case
    from TuckerSegLib.cohort.manifest import Manifest

    seg = tmp_path / "seg.nii.gz"
    seg.write_bytes(b"x")
    m = Manifest(tmp_path)
    m.record({"case_id": "a", "input": "/in/a.nii.gz", "status": "done", "output": str(seg)})
    with open(m.path, "a") as f:
        f.write('{"case_id": "b", "sta')  # a crash mid-write
    m2 = Manifest(tmp_path)
    assert m2.is_done(Case("a", Path("/in/a.nii.gz"))) and m2.get("b") is None
    m2.record({"case_id": "b", "input": "/in/b.nii.gz", "status": "failed", "error": "x"})
    assert Manifest(tmp_path).get("b")["status"] == "failed"
    seg.unlink()  # an output that vanished is not done
    assert not Manifest(tmp_path).is_done(Case("a", Path("/in/a.nii.gz")))


def test_collect_cases_from_folders_globs_and_csv(tmp_path):
    from TuckerSegLib.cohort.cases import collect_cases
    from TuckerSegLib.errors import InputError

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ct1.nii.gz").write_bytes(b"")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "ct1.nii.gz").write_bytes(b"")
    dicom = tmp_path / "a" / "series7"
    dicom.mkdir()
    for i in range(3):
        (dicom / f"IM{i}").write_bytes(b"")
    out = tmp_path / "a" / "out"  # the batch's own output folder is never searched
    out.mkdir()
    (out / "seg.nii.gz").write_bytes(b"")
    cases = collect_cases([tmp_path / "a", str(tmp_path / "b" / "*.nii.gz")], skip=[out])
    assert [(c.case_id, c.path.name) for c in cases] == [("ct1", "ct1.nii.gz"), ("series7", "series7"),
                                                          ("b_ct1", "ct1.nii.gz")]
    csv = tmp_path / "cases.csv"
    csv.write_text("subject,path\nS 01,a/ct1.nii.gz\nS02,b/ct1.nii.gz\n")
    assert [(c.case_id, c.path) for c in collect_cases([csv])] == [
        ("S_01", tmp_path / "a" / "ct1.nii.gz"), ("S02", tmp_path / "b" / "ct1.nii.gz")]
    (tmp_path / "bad.csv").write_text("name\nx\n")
    with pytest.raises(InputError, match="no path column"):
        collect_cases([tmp_path / "bad.csv"])
    with pytest.raises(InputError, match="no file matches"):
        collect_cases([str(tmp_path / "nothing*.nii.gz")])


def test_cli_bad_input_is_one_line_and_non_zero(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "TuckerSegLib", "batch", str(tmp_path / "missing.nii.gz"),
                           "-o", str(tmp_path / "out"), "--ratio", "0.5"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"tuckerseg batch: error: input not found: {tmp_path / 'missing.nii.gz'}"]
    proc = subprocess.run([sys.executable, "-m", "TuckerSegLib", "batch", str(tmp_path), "-o",
                           str(tmp_path / "out"), "--ratio", "1.5"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "ratio must be in (0, 1]" in proc.stderr
    assert "Traceback" not in proc.stderr
