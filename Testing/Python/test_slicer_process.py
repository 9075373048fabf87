"""The Slicer module's worker handling with real child processes.

A small worker script (``slicer_protocol_worker.py``) speaks the real progress protocol; with it
these tests check parsing, the result import, failures (one-line message, scene unchanged) and
Cancel (the whole process group ends, scene unchanged). The last test drives the real
``tuckerseg segment`` command when that command is present.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

from slicer_helpers import (REPO, WORKER_SCRIPT, load_volume, new_scene, scene_with_previous_result,
                            segment_array, synthetic_ct, worker_env)

from TuckerSegLib.errors import Cancelled, InputError, TuckerSegError
from TuckerSegLib.progress import format_event, parse_event
from TuckerSegUtils.run import RunCallbacks, SegmentationRequest, SegmentationRun, build_command
from TuckerSegUtils.segmentation_import import scene_snapshot
from TuckerSegUtils.worker import WorkerProcess

PREFIX = [sys.executable, str(WORKER_SCRIPT)]


class Recorder:
    """Collects what a run reports, as the widget would show it."""

    def __init__(self):
        self.progress, self.logs, self.finished, self.errors, self.cancelled = [], [], [], [], 0

    def callbacks(self) -> RunCallbacks:
        def cancelled():
            self.cancelled += 1
        return RunCallbacks(on_progress=lambda f, m: self.progress.append((f, m)),
                            on_log=self.logs.append, on_finished=self.finished.append,
                            on_error=self.errors.append, on_cancelled=cancelled)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/status") as handle:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in handle)
    except OSError:
        return True


# -- protocol ----------------------------------------------------------------------------------
def test_protocol_lines_from_a_real_child_are_parsed_in_order(tmp_path):
    scene = new_scene()
    ct = synthetic_ct(scene)
    from TuckerSegUtils import volume_io
    src = volume_io.export_volume(ct, tmp_path / "in.nii.gz")
    argv = build_command(SegmentationRequest(ratio=0.4, quality="fastest"), src,
                         tmp_path / "out.nii.gz", PREFIX)
    worker = WorkerProcess(argv, env=worker_env("ok")).start()
    events = []
    deadline = time.monotonic() + 60
    while worker.running and time.monotonic() < deadline:
        events += worker.wait_events(0.2)
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "exit" and events[-1]["returncode"] == 0
    assert "stage" in kinds and "result" in kinds
    assert {"type": "log", "message": "a line that is not a protocol event, as nnU-Net prints them"} in events
    fractions = [e["fraction"] for e in events if e["type"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    result = next(e["result"] for e in events if e["type"] == "result")
    assert Path(result["output"]).exists() and result["ratio"] == 0.4
    assert result["labels"] == {"5": "liver", "25": "sacrum"}


def test_parse_event_round_trip_and_rejects_other_lines():
    line = format_event({"type": "progress", "stage": "segment", "fraction": 0.5, "message": "x"})
    assert parse_event(line)["fraction"] == 0.5
    assert parse_event("TUCKERSEG_EVENT {not json") is None
    assert parse_event("100%|#####| 5/5 [00:01<00:00]") is None


def test_command_line_matches_the_segment_interface(tmp_path):
    req = SegmentationRequest(ratio=0.3, quality="fast", policy="uniform", device="cpu",
                              engine="openvino", subset=["liver", "spleen", "liver"]).check()
    argv = build_command(req, tmp_path / "i.nii.gz", tmp_path / "o.nii.gz", ["py", "-m", "x"])
    assert argv[:3] == ["py", "-m", "x"]
    tail = argv[3:]
    assert tail[:4] == ["-i", str(tmp_path / "i.nii.gz"), "-o", str(tmp_path / "o.nii.gz")]
    assert "--ml" in tail and "--fast" in tail and "--fastest" not in tail
    assert tail[tail.index("--ratio") + 1] == "0.3" and tail[tail.index("--policy") + 1] == "uniform"
    assert tail[tail.index("--roi-subset") + 1: tail.index("--progress")] == ["liver", "spleen"]
    assert tail[-2:] == ["--progress", "json"]
    default = build_command(SegmentationRequest(quality="default").check(), "i", "o")
    assert default[1:4] == ["-m", "TuckerSegLib", "segment"] and "--fast" not in default
    assert "--min-agreement" not in tail  # an explicit ratio is expert mode: no target sent


def test_default_request_is_the_quality_target_and_expert_mode_sends_the_ratio(tmp_path):
    from TuckerSegUtils.run import compression_choice

    default = build_command(SegmentationRequest().check(), "i", "o", ["py"])
    assert default[default.index("--min-agreement") + 1] == "0.95" and "--ratio" not in default
    panel = SegmentationRequest(**compression_choice(False, 0.3, 0.95)).check()
    assert build_command(panel, "i", "o", ["py"]) == default
    stricter = build_command(SegmentationRequest(**compression_choice(False, 0.3, 0.975)).check(), "i", "o", ["py"])
    assert stricter[stricter.index("--min-agreement") + 1] == "0.975"
    expert = build_command(SegmentationRequest(**compression_choice(True, 0.3, 0.95)).check(), "i", "o", ["py"])
    assert expert[expert.index("--ratio") + 1] == "0.3" and "--min-agreement" not in expert
    with pytest.raises(InputError, match="not both"):
        SegmentationRequest(ratio=0.3, min_agreement=0.95).check()
    for bad in (0.0, 1.2):
        with pytest.raises(InputError, match="minimum agreement"):
            SegmentationRequest(min_agreement=bad).check()
    with pytest.raises(InputError, match="ratio"):
        SegmentationRequest(ratio=1.5).check()
    with pytest.raises(InputError, match="unknown structure"):
        SegmentationRequest(subset=["liverr"]).check()


# -- whole runs --------------------------------------------------------------------------------
def test_run_imports_the_result_as_segments(tmp_path):
    scene = new_scene()
    ct = synthetic_ct(scene)
    rec = Recorder()
    run = SegmentationRun(ct, None, SegmentationRequest(ratio=0.25), rec.callbacks(),
                          command_prefix=PREFIX, env=worker_env("ok"))
    summary = run.run_to_end()
    assert run.state == "finished" and rec.finished == [summary] and not rec.errors
    node = scene.GetNodeByID(summary["output_node_id"])
    seg = node.GetSegmentation()
    assert sorted(seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())) == \
        sorted(["liver", "sacrum"])
    bone = segment_array(node, "sacrum", ct)
    assert bone.sum() == 4 * 4 * 4  # the 700 HU block of the synthetic CT
    assert summary["ratio"] == 0.25 and summary["macs"] == 2_000_000_000
    assert any(0 < f < 1 for f, _ in rec.progress) and rec.progress[-1][0] == 1.0
    assert run._temp is None  # temporary files removed


def test_run_with_subset_and_real_reference_labels(shared_data):
    scene = new_scene()
    ct = load_volume(scene, shared_data / "example_ct_sm.nii.gz")
    run = SegmentationRun(ct, None, SegmentationRequest(subset=["liver", "spleen", "aorta"]),
                          command_prefix=PREFIX,
                          env=worker_env("ok", TUCKERSEG_TEST_WORKER_LABELS=shared_data / "example_seg.nii.gz"))
    summary = run.run_to_end()
    seg = scene.GetNodeByID(summary["output_node_id"]).GetSegmentation()
    assert sorted(seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())) == \
        ["aorta", "liver", "spleen"]
    # the default request is the quality target; the summary carries its agreement and source
    assert summary["min_agreement"] == 0.95 and summary["predicted_agreement"] == 0.961
    assert summary["agreement_source"] == "measured on 2 phantom CT(s)"
    from TuckerSegUtils.cost_readout import format_summary
    assert "Predicted agreement: 0.961 (measured on 2 phantom CT(s))" in format_summary(summary)


def test_error_event_gives_its_one_line_message_and_leaves_the_scene_unchanged():
    scene, ct, out, before = scene_with_previous_result()
    rec = Recorder()
    run = SegmentationRun(ct, out, SegmentationRequest(), rec.callbacks(),
                          command_prefix=PREFIX, env=worker_env("error"))
    with pytest.raises(TuckerSegError) as info:
        run.run_to_end()
    assert str(info.value) == "TotalSegmentator weights for task total are not installed"
    assert rec.errors == [str(info.value)] and not rec.finished
    assert scene_snapshot(scene) == before
    assert out.GetSegmentation().GetSegment("kept") is not None


def test_crash_without_event_shows_the_last_stderr_lines():
    scene = new_scene()
    ct = synthetic_ct(scene)
    before = scene_snapshot(scene)
    rec = Recorder()
    run = SegmentationRun(ct, None, SegmentationRequest(), rec.callbacks(),
                          command_prefix=PREFIX, env=worker_env("crash"))
    with pytest.raises(TuckerSegError):
        run.run_to_end()
    assert "exit code 1" in rec.errors[0] and "RuntimeError: boom" in rec.errors[0]
    assert scene_snapshot(scene) == before


def test_cancel_ends_the_process_group_and_leaves_the_scene_unchanged(tmp_path):
    scene = new_scene()
    ct = synthetic_ct(scene)
    before = scene_snapshot(scene)
    pidfile = tmp_path / "pids"
    rec = Recorder()
    run = SegmentationRun(ct, None, SegmentationRequest(), rec.callbacks(), command_prefix=PREFIX,
                          env=worker_env("hang", TUCKERSEG_TEST_WORKER_PIDFILE=pidfile)).start()
    temp = run._temp
    deadline = time.monotonic() + 60
    while not any(0 < f < 1 for f, _ in rec.progress) and time.monotonic() < deadline:
        assert run.poll()  # the GUI's timer: returns at once, the run goes on
        time.sleep(0.05)
    leader, child = (int(p) for p in pidfile.read_text().split())
    assert _alive(leader) and _alive(child)
    t0 = time.monotonic()
    run.cancel()
    assert time.monotonic() - t0 < 10
    deadline = time.monotonic() + 10
    while (_alive(leader) or _alive(child)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(leader) and not _alive(child), "cancel left processes running"
    assert run.state == "cancelled" and rec.cancelled == 1 and not rec.finished and not rec.errors
    assert not run.poll()
    assert scene_snapshot(scene) == before
    assert not temp.exists()
    with pytest.raises(Cancelled):
        run.run_to_end()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("TuckerSegLib.cli.segment_cmd") is None,
                    reason="the `tuckerseg segment` command is not in this checkout yet")
def test_real_segment_command_result_or_one_line_error(shared_data):
    """The real core: either segments appear, or its error arrives as one line, scene unchanged."""
    scene = new_scene()
    ct = load_volume(scene, shared_data / "example_ct_sm.nii.gz")
    before = scene_snapshot(scene)
    rec = Recorder()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    run = SegmentationRun(ct, None, SegmentationRequest(ratio=0.3, quality="fastest", device="cpu",
                                                        subset=["liver", "spleen"]),
                          rec.callbacks(), command_prefix=[sys.executable, "-m", "TuckerSegLib", "segment"],
                          env=env)
    try:
        summary = run.run_to_end()
    except TuckerSegError as exc:
        assert "Traceback" not in str(exc) and "\n" not in str(exc).strip(), str(exc)
        assert scene_snapshot(scene) == before
        return
    seg = scene.GetNodeByID(summary["output_node_id"]).GetSegmentation()
    names = {seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())}
    # the test models have random weights: they may find neither structure, never another one
    assert names <= {"liver", "spleen"}
    assert summary["ratio"] == 0.3 and summary["macs"] < summary["macs_original"]


@pytest.mark.parametrize("delete", ["output", "input"])
def test_node_deleted_during_the_run_is_reported_not_written(delete):
    scene, ct, out, _before = scene_with_previous_result("mine", "kept")
    rec = Recorder()
    run = SegmentationRun(ct, out, SegmentationRequest(), rec.callbacks(), command_prefix=PREFIX,
                          env=worker_env("ok")).start()
    scene.RemoveNode(out if delete == "output" else ct)
    after_delete = scene_snapshot(scene)
    with pytest.raises(TuckerSegError):
        run.run_to_end()
    name, what = ("mine", "output segmentation") if delete == "output" else ("CT", "input volume")
    assert rec.errors == [f"the {what} '{name}' was deleted during the run: the result was not imported"]
    assert not rec.finished and run.state == "failed"
    assert scene_snapshot(scene) == after_delete  # no new node, nothing written
    if delete == "output":
        assert out.GetSegmentation().GetNumberOfSegments() == 1  # the removed node kept its segment


def test_worker_reads_its_output_without_python_threads(tmp_path):
    """Inside Slicer, PythonQt runs Python threads only while Python code runs: progress read by a
    thread stalls while Slicer idles. The worker must be driven by poll() alone."""
    import threading

    scene = new_scene()
    ct = synthetic_ct(scene)
    from TuckerSegUtils import volume_io
    src = volume_io.export_volume(ct, tmp_path / "in.nii.gz")
    argv = build_command(SegmentationRequest(), src, tmp_path / "out.nii.gz", PREFIX)
    threads_before = threading.active_count()
    worker = WorkerProcess(argv, env=worker_env("ok")).start()
    assert threading.active_count() == threads_before
    events = []
    time.sleep(1.0)  # the child writes while nobody reads ("Slicer idles")
    deadline = time.monotonic() + 60
    while worker.running and time.monotonic() < deadline:
        events += worker.poll()
        assert threading.active_count() == threads_before
        time.sleep(0.05)
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "exit" and "result" in kinds and kinds.count("exit") == 1
    assert worker.poll() == []


# -- warm worker -------------------------------------------------------------------------------
@pytest.mark.slow
def test_warm_worker_second_volume_pays_no_model_load_and_survives_cancel(shared_data, tmp_path_factory):
    """The module's warm worker (real ``tuckerseg serve``, real pipeline, test models in
    TotalSegmentator's layout): a second run on another volume reuses the loaded network in the
    same process; a cancelled run leaves the worker serving the next one."""
    from TuckerSegLib.models import totalseg_layout
    from TuckerSegUtils.warm_worker import WarmWorker

    home = tmp_path_factory.mktemp("warm_home")
    (home / "config.json").write_text('{"totalseg_id": "t", "send_usage_stats": false, '
                                      '"prediction_counter": 0, "statistics_disclaimer_shown": true}')
    totalseg_layout.build_models(home / "nnunet" / "results", [297], width_scale=0.125)
    env = dict(os.environ, TOTALSEG_HOME_DIR=str(home),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    warm = WarmWorker(python=sys.executable, env=env)
    scene = new_scene()
    volumes = [load_volume(scene, shared_data / "example_ct_sm.nii.gz") for _ in range(3)]
    request = dict(ratio=1.0, quality="fast", device="cpu", engine="torch")
    try:
        summaries = []
        for ct in volumes[:2]:
            rec = Recorder()
            summaries.append(SegmentationRun(ct, None, SegmentationRequest(**request), rec.callbacks(),
                                             warm=warm).run_to_end())
            assert not rec.errors and rec.finished
        pid = warm.pid
        assert pid is not None and warm.requests_served == 2
        assert [s["warm_models"] for s in summaries] == [0, 1]
        for s in summaries:
            assert scene.GetNodeByID(s["output_node_id"]).GetSegmentation().GetNumberOfSegments() > 0

        before = scene_snapshot(scene)
        rec = Recorder()
        run = SegmentationRun(volumes[2], None, SegmentationRequest(**request), rec.callbacks(), warm=warm).start()
        run.cancel()
        assert run.state == "cancelled" and rec.cancelled == 1 and scene_snapshot(scene) == before
        rec = Recorder()
        summary = SegmentationRun(volumes[2], None, SegmentationRequest(**request), rec.callbacks(),
                                  warm=warm).run_to_end()
        assert warm.pid == pid and summary["warm_models"] == 1  # same process, still warm
    finally:
        warm.stop()
    assert not warm.alive
