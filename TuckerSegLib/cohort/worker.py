"""The Ray actor that segments case after case in one process.

Why: a shell loop pays the imports, the model load and the engine start for every CT. An actor
imports once and calls ``segment`` for each case it is given, so whatever the pipeline keeps
between calls (imports, the OS file cache, and the in-process network memo once the pipeline has
it) is paid once per worker. Each case is written into a private temporary folder and renamed to
``cases/<case_id>`` only when complete, so a worker killed mid-case leaves nothing that looks done.
A failing case returns a ``failed`` row with its one-line error; it never takes the worker down.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

from TuckerSegLib.cohort.manifest import CASES_DIR, LOGS_DIR
from TuckerSegLib.cohort.options import SegmentOptions

_slot_lock = None  # the open slot file whose lock this process holds (released when it exits)


def pin_cpus(count: int) -> List[int]:
    """Pin this process to ``count`` cores no other worker on this node holds; return them.

    Why: PyTorch, OpenMP and OpenVINO size their thread pools from the process's CPU affinity;
    pinning is the one setting that keeps N workers from each using every core. Slots are claimed
    with non-blocking file locks in the node's temp folder, which the OS frees when a worker dies.
    """
    global _slot_lock
    if not hasattr(os, "sched_setaffinity"):
        return []
    cores = sorted(os.sched_getaffinity(0))
    count = max(1, min(int(count), len(cores)))
    n_slots = len(cores) // count
    if n_slots <= 1:
        return cores
    import fcntl

    folder = Path(tempfile.gettempdir()) / f"tuckerseg-batch-slots-{os.getuid()}"
    folder.mkdir(parents=True, exist_ok=True)
    chosen = os.getpid() % n_slots  # all slots taken (more workers than cores): share one
    for slot in range(n_slots):
        f = open(folder / f"cores{len(cores)}-w{count}-slot{slot}.lock", "a")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        _slot_lock, chosen = f, slot
        break
    pinned = cores[chosen * count:(chosen + 1) * count]
    os.sched_setaffinity(0, pinned)
    return pinned


class _LogStream:
    """A text stream that writes to the case log (TotalSegmentator's and nnU-Net's prints)."""

    def __init__(self, f):
        self._f = f

    def write(self, text: str) -> int:
        self._f.write(text)
        return len(text)

    def flush(self) -> None:
        self._f.flush()

    def isatty(self) -> bool:
        return False


class SegmentWorker:
    """One worker: ``run(case)`` segments a case into ``OUTDIR/cases/<case_id>``."""

    def __init__(self, options: SegmentOptions, outdir: str, cpus: float = 1.0, pin: bool = True):
        self.options = options
        self.outdir = Path(outdir)
        threads = max(1, int(round(cpus)))
        self.cores = pin_cpus(threads) if pin else []
        import torch

        torch.set_num_threads(threads)
        # Import the pipeline now, while other workers start, not inside the first case.
        import TuckerSegLib.pipeline.segment  # noqa: F401
        import totalsegmentator.python_api  # noqa: F401
        self.cases_done = 0

    def info(self) -> Dict[str, Any]:
        """Who this worker is (the driver logs it; tests use the pid)."""
        return {"pid": os.getpid(), "node": socket.gethostname(), "cores": self.cores}

    def _signal_ready(self, event: dict) -> None:
        from TuckerSegLib.pipeline.segment import last_model_started

        if last_model_started(event):
            marker = engines_ready_marker(self.outdir)
            if not marker.exists():
                marker.write_text(f"{socket.gethostname()}:{os.getpid()}\n")

    def run(self, case: Dict[str, str], attempt: int = 1) -> Dict[str, Any]:
        """Segment one case; return its result row (status ``done`` or ``failed``), never raise."""
        from TuckerSegLib.errors import TuckerSegError
        from TuckerSegLib.pipeline.segment import segment
        from TuckerSegLib.progress import CallbackProgress

        case_id, source = case["case_id"], case["path"]
        cases = self.outdir / CASES_DIR
        final = cases / case_id
        tmp = cases / f".tmp-{case_id}-{uuid.uuid4().hex[:8]}"
        out_name = "segmentation.nii.gz" if self.options.ml else "segmentations"
        logs = self.outdir / LOGS_DIR
        logs.mkdir(parents=True, exist_ok=True)
        row: Dict[str, Any] = {"case_id": case_id, "input": source, "attempts": attempt,
                               "worker": f"{socket.gethostname()}:{os.getpid()}"}
        t0 = time.perf_counter()
        with open(logs / f"{case_id}.log", "a", encoding="utf-8") as log:
            stamp = datetime.datetime.now().isoformat(timespec="seconds")
            log.write(f"=== {stamp} case {case_id} attempt {attempt} on {row['worker']}: {source}\n")
            log.flush()
            stream = _LogStream(log)
            handler = logging.StreamHandler(stream)
            logging.getLogger().addHandler(handler)
            progress = CallbackProgress(callback=lambda e: (_log_event(log, e), self._signal_ready(e)))
            try:
                tmp.mkdir(parents=True)
                with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                    result = segment(source, tmp / out_name, progress=progress,
                                     **self.options.segment_kwargs())
                stats = _read_statistics(result.files)
                if final.exists():  # left by an attempt that died before it was recorded
                    shutil.rmtree(final)
                os.replace(tmp, final)
                row.update(_done_row(result, final / out_name, stats))
                self.cases_done += 1
            except TuckerSegError as exc:
                row.update(status="failed", error=str(exc))
            except Exception as exc:  # an unexpected failure of one case: one line, traceback in its log
                log.write(traceback.format_exc())
                row.update(status="failed",
                           error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
            finally:
                logging.getLogger().removeHandler(handler)
                shutil.rmtree(tmp, ignore_errors=True)
            row["seconds"] = round(time.perf_counter() - t0, 3)
            row["finished_at"] = datetime.datetime.now().isoformat(timespec="seconds")
            log.write(f"=== {row['status']} in {row['seconds']:.1f} s"
                      + (f": {row['error']}" if row.get("error") else "") + "\n")
        return row


def engines_ready_marker(outdir: Path) -> Path:
    """The file a worker writes once its first case has every model loaded and its engine
    prepared (the engine caches are then on disk): the driver stops holding the other workers."""
    return Path(outdir) / LOGS_DIR / ".engines-ready"


def _log_event(log, event: dict) -> None:
    kind = event.get("type")
    if kind in ("stage", "log", "error"):
        log.write(f"[{kind}] {event.get('message', '')}\n")
        log.flush()


def _read_statistics(files: List[str]) -> Optional[Dict[str, Any]]:
    path = next((f for f in files if Path(f).name == "statistics.json"), None)
    if not path or not Path(path).exists():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _done_row(result, output: Path, stats: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The table's columns for a finished case, from ``segment``'s ``SegmentResult``."""
    networks = []
    for m in result.models:
        eng = m.get("engine") or {}
        name = f"{m.get('dataset_id')}"
        if eng.get("name"):
            name += f":{eng['name']}-{eng.get('precision', '')}"
        networks.append(name)
    agreement = getattr(result, "predicted_agreement", None)
    return {"status": "done", "error": None, "output": str(output),
            "network": " ".join(networks), "ratio": result.ratio, "policy": result.policy,
            "params": result.params, "macs": result.macs, "params_original": result.params_original,
            "macs_original": result.macs_original,
            "macs_fraction": round(result.macs / result.macs_original, 4) if result.macs_original else None,
            "predicted_agreement": agreement, "segment_seconds": round(result.seconds, 3),
            "statistics": stats}
