"""One segmentation run, from an input volume node to an output segmentation node.

``SegmentationRun`` writes the input to a temporary NIfTI, sends ``tuckerseg segment ...`` as a
request to the module's warm worker (``warm_worker.WarmWorker``: libraries and networks stay
loaded between runs), or starts it as a one-shot ``WorkerProcess``, forwards its events to
callbacks and, when the request reports a result and ends with 0, imports the multilabel output
into the scene. A failed,
crashed or cancelled run changes nothing in the scene and reports a one-line message.

The run is driven by ``poll()`` on the caller's thread: the Slicer widget calls it from a QTimer
(Slicer stays responsive), ``run_to_end()`` loops over it for the synchronous console API.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from TuckerSegLib.errors import Cancelled, InputError, TuckerSegError
from TuckerSegLib.specs import (DEFAULT_MIN_AGREEMENT, DEVICES, ENGINES, MODES, POLICIES, RunSpec,
                                compression_spec)

from . import segmentation_import, structures, terminology, volume_io
from .warm_worker import WarmWorker
from .worker import WorkerProcess, python_executable, worker_environment

# The choice lists are the core's (TuckerSegLib.specs); only the flag per mode is ours.
QUALITIES = dict(zip(MODES, (None, "--fast", "--fastest")))
QUALITY_SPACING_MM = dict(zip(MODES, (1.5, 3.0, 6.0)))
__all__ = ["DEFAULT_MIN_AGREEMENT", "DEVICES", "ENGINES", "POLICIES", "QUALITIES", "QUALITY_SPACING_MM",
           "RunCallbacks", "SegmentationRequest", "SegmentationRun", "build_command", "compression_choice",
           "segment_args"]


def compression_choice(expert_ratio: bool, ratio: float, min_agreement: float) -> Dict[str, Optional[float]]:
    """The panel's two controls as request fields: the quality target by default, the fixed ratio
    only in expert mode (the other one is then not sent, as on the command line)."""
    if expert_ratio:
        return {"ratio": float(ratio), "min_agreement": None}
    return {"ratio": None, "min_agreement": float(min_agreement)}


@dataclass
class SegmentationRequest:
    """What the user asked for; validated by ``check()``.

    Like ``tuckerseg segment``: a quality target ``min_agreement`` (neither given: the core's
    default, ``DEFAULT_MIN_AGREEMENT``) or, for experts, a fixed ``ratio``; not both.
    """

    ratio: Optional[float] = None
    task: str = "total"
    quality: str = "fast"
    policy: str = "budget"
    device: str = "auto"
    engine: str = "auto"
    subset: Optional[List[str]] = None
    min_agreement: Optional[float] = None

    def check(self) -> "SegmentationRequest":
        """Validate with the core's own specs (the same checks and messages as the command line)."""
        compression = compression_spec(self.ratio, self.min_agreement, self.policy)
        run = RunSpec(engine=self.engine, device=self.device)
        if self.ratio is not None:
            self.ratio = compression.ratio
        self.min_agreement, self.engine, self.device = compression.min_agreement, run.engine, run.device
        if self.quality not in QUALITIES:
            raise InputError(f"quality must be one of {', '.join(QUALITIES)}, got {self.quality!r}")
        if self.subset:
            known = set(structures.structure_names(self.task))
            unknown = [s for s in self.subset if s not in known]
            if unknown:
                raise InputError(f"unknown structure(s) for task {self.task}: {', '.join(unknown)}")
            self.subset = list(dict.fromkeys(self.subset))
        else:
            self.subset = None
        return self


def segment_args(request: SegmentationRequest, input_path: Path, output_path: Path) -> List[str]:
    """``tuckerseg segment``'s arguments for ``request`` (for a one-shot or a warm worker)."""
    argv = ["-i", str(input_path), "-o", str(output_path), "--ml"]
    if request.ratio is not None:
        argv += ["--ratio", f"{request.ratio:g}"]
    else:
        target = DEFAULT_MIN_AGREEMENT if request.min_agreement is None else request.min_agreement
        argv += ["--min-agreement", f"{target:g}"]
    argv += ["--policy", request.policy, "--task", request.task]
    if QUALITIES[request.quality]:
        argv.append(QUALITIES[request.quality])
    argv += ["--device", request.device, "--engine", request.engine]
    if request.subset:
        argv += ["--roi-subset", *request.subset]
    argv += ["--progress", "json"]
    return argv


def build_command(request: SegmentationRequest, input_path: Path, output_path: Path,
                  prefix: Optional[Sequence[str]] = None) -> List[str]:
    """The worker's command line (``prefix`` defaults to ``PythonSlicer -m TuckerSegLib segment``)."""
    argv = list(prefix) if prefix else [python_executable(), "-m", "TuckerSegLib", "segment"]
    return argv + segment_args(request, input_path, output_path)


@dataclass
class RunCallbacks:
    """What the caller wants to hear about; every callback runs on the thread calling ``poll``."""

    # fraction in [0, 1]; a negative fraction means "new stage: show the message, keep the bar"
    on_progress: Callable[[float, str], None] = lambda fraction, message: None
    on_log: Callable[[str], None] = lambda message: None
    on_finished: Callable[[dict], None] = lambda summary: None
    on_error: Callable[[str], None] = lambda message: None
    on_cancelled: Callable[[], None] = lambda: None


@dataclass
class SegmentationRun:
    """A started-on-demand run; see the module docstring."""

    input_volume: object
    output_segmentation: Optional[object]
    request: SegmentationRequest
    callbacks: RunCallbacks = field(default_factory=RunCallbacks)
    command_prefix: Optional[Sequence[str]] = None
    env: Optional[Dict[str, str]] = None
    keep_temp: bool = False
    warm: Optional[WarmWorker] = None  # run as a request to this warm worker, not a new process

    def __post_init__(self):
        self.worker: Optional[WorkerProcess] = None
        self.request_id: Optional[str] = None  # with a warm worker
        self.state = "new"  # new -> running -> finished | failed | cancelled
        self.summary: Optional[dict] = None
        self.error: Optional[str] = None
        self.output_node = None
        self._result: Optional[dict] = None
        self._error_event: Optional[str] = None
        self._temp: Optional[Path] = None
        self._t0 = 0.0
        self._scene = None
        self._watched: list = []

    @property
    def done(self) -> bool:
        return self.state in ("finished", "failed", "cancelled")

    # -- start -----------------------------------------------------------------------------
    def start(self) -> "SegmentationRun":
        """Validate, write the input, launch the worker. Raises TuckerSegError on bad input."""
        if self.input_volume is None or not self.input_volume.IsA("vtkMRMLScalarVolumeNode"):
            raise InputError("select a CT volume as input")
        if self.input_volume.GetScene() is None:
            raise InputError("the input volume is not in a scene")
        if (self.output_segmentation is not None
                and not self.output_segmentation.IsA("vtkMRMLSegmentationNode")):
            raise InputError("the output must be a segmentation node")
        self.request.check()
        self._scene = self.input_volume.GetScene()
        self._watched = [(node, node.GetID(), node.GetName(), what) for node, what in
                         ((self.input_volume, "input volume"),
                          (self.output_segmentation, "output segmentation")) if node is not None]
        self._t0 = time.perf_counter()
        self._temp = Path(tempfile.mkdtemp(prefix="tuckerseg-slicer-"))
        try:
            # Uncompressed: writing is then a plain copy, quick even for large CTs.
            input_path = volume_io.export_volume(self.input_volume, self._temp / "input.nii")
            if self.warm is not None:
                args = segment_args(self.request, input_path, self._temp / "output.nii.gz")
                self.callbacks.on_log("Running in the warm worker: tuckerseg segment " + " ".join(args))
                self.request_id = self.warm.submit(args)
            else:
                argv = build_command(self.request, input_path, self._temp / "output.nii.gz",
                                     self.command_prefix)
                self.callbacks.on_log("Running: " + " ".join(argv))
                self.worker = WorkerProcess(argv, env=worker_environment(self.env),
                                            log_dir=str(self._temp)).start()
        except Exception:
            self._cleanup()
            raise
        self.state = "running"
        return self

    # -- drive -----------------------------------------------------------------------------
    def poll(self) -> bool:
        """Handle the worker's new events; True while the run is still going."""
        if self.state != "running":
            return False
        for event in self._new_events():
            self._handle(event)
            if self.done:
                break
        return not self.done

    def _new_events(self) -> List[dict]:
        if self.warm is not None:
            self.warm.poll()
            return self.warm.take(self.request_id)
        return self.worker.poll() if self.worker is not None else []

    def _wait_events(self, seconds: float) -> List[dict]:
        deadline = time.monotonic() + seconds
        while True:
            events = self._new_events()
            if events or time.monotonic() >= deadline:
                return events
            time.sleep(0.02)

    def run_to_end(self, poll_seconds: float = 0.1) -> dict:
        """Block until the run ends; return the summary or raise TuckerSegError / Cancelled."""
        if self.state == "new":
            self.start()
        while self.state == "running":
            for event in self._wait_events(poll_seconds):
                self._handle(event)
                if self.done:
                    break
        if self.state == "cancelled":
            raise Cancelled("segmentation cancelled")
        if self.state == "failed":
            raise TuckerSegError(self.error or "segmentation failed")
        return self.summary or {}

    def cancel(self) -> None:
        """Stop the worker and its children; the scene stays as it was."""
        if self.state != "running":
            return
        self.callbacks.on_log("Cancelling...")
        if self.warm is not None and self.request_id is not None:
            self.warm.cancel(self.request_id)  # the warm worker stays up for the next run
        elif self.worker is not None:
            self.worker.cancel()
        self.state = "cancelled"
        self._cleanup()
        self.callbacks.on_cancelled()

    # -- events ----------------------------------------------------------------------------
    def _handle(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "progress":
            message = event.get("message") or event.get("stage") or ""
            self.callbacks.on_progress(float(event.get("fraction", 0.0)), message)
        elif kind == "stage":
            self.callbacks.on_progress(-1.0, event.get("message") or event.get("stage", ""))
            self.callbacks.on_log(event.get("message") or event.get("stage", ""))
        elif kind == "log":
            self.callbacks.on_log(str(event.get("message", "")))
        elif kind == "result":
            self._result = event.get("result") or {}
        elif kind == "error":
            self._error_event = str(event.get("message", "")).strip() or "segmentation failed"
        elif kind in ("exit", "done"):  # the process ended, or a warm worker's request (it goes on)
            self._finish(int(event.get("returncode") or 0))

    def _finish(self, returncode: int) -> None:
        if self.state == "cancelled":
            return
        if returncode != 0 or self._result is None:
            self._fail(self._error_event or self._crash_message(returncode))
            return
        deleted = self._deleted_node()
        if deleted:
            self._fail(deleted)
            return
        try:
            self.output_node, self.summary = self._import_result(self._result)
        except TuckerSegError as exc:
            self._fail(str(exc))
            return
        except Exception as exc:  # an unexpected import failure: still one line
            self._fail(f"could not import the result: {type(exc).__name__}: {exc}")
            return
        self.state = "finished"
        self._cleanup()
        self.callbacks.on_progress(1.0, "Done")
        self.callbacks.on_finished(self.summary)

    def _deleted_node(self) -> str:
        """A one-line message when the input or the chosen output left the scene during the run
        (deleted, or the scene closed): the result is then not written anywhere."""
        for node, node_id, name, what in self._watched:
            if self._scene is None or self._scene.GetNodeByID(node_id) is not node:
                return (f"the {what} '{name}' was deleted during the run: the result was not "
                        f"imported")
        return ""

    def _crash_message(self, returncode: int) -> str:
        source = self.warm if self.warm is not None else self.worker
        tail = source.last_stderr() if source is not None else ""
        if returncode == 0:
            return "the segmentation process ended without a result" + (f":\n{tail}" if tail else "")
        return (f"the segmentation process failed (exit code {returncode})"
                + (f":\n{tail}" if tail else ""))

    def _fail(self, message: str) -> None:
        self.state = "failed"
        self.error = message
        self._cleanup()
        self.callbacks.on_error(message)

    def _import_result(self, result: dict):
        output_path = Path(result.get("output") or (self._temp / "output.nii.gz"))
        labels = result.get("labels") or structures.label_map(self.request.task)
        labels = {int(k): v for k, v in labels.items()}
        labelmap = volume_io.read_labelmap(output_path)
        segmentation = segmentation_import.build_segmentation(
            labelmap, labels, terminology.load_terminology())
        node = segmentation_import.commit_segmentation(segmentation, self.input_volume,
                                                       self.output_segmentation)
        summary = {
            "seconds": float(result.get("seconds", time.perf_counter() - self._t0)),
            "wall_seconds": time.perf_counter() - self._t0,
            "segments": segmentation.GetNumberOfSegments(),
            "ratio": result.get("ratio", self.request.ratio),
            "min_agreement": result.get("min_agreement", self.request.min_agreement),
            "predicted_agreement": result.get("predicted_agreement"),
            "agreement_source": result.get("agreement_source", ""),
            "params": result.get("params"),
            "macs": result.get("macs"),
            "params_original": result.get("params_original"),
            "macs_original": result.get("macs_original"),
            "warm_models": sum(1 for m in result.get("models", []) if m.get("warm")),  # loaded before
            "quality": self.request.quality,
            "policy": self.request.policy,
            "output_node_id": node.GetID(),
        }
        return node, summary

    def _cleanup(self) -> None:
        if self._temp is not None and not self.keep_temp:
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None
