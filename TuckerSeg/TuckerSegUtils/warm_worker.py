"""One ``tuckerseg serve`` process kept for the module's life, so that a second run pays neither
the imports nor the model loading (``TuckerSegLib.serve``).

Driven like ``WorkerProcess`` (polled from the panel's QTimer, no Python thread): ``poll()`` reads
the worker's new event lines and files them by request id; each ``SegmentationRun`` takes its
own with ``take``. A cancelled request normally ends at the worker's next step or patch; one that
has not ended ``HARD_CANCEL_SECONDS`` later gets the whole worker stopped, and the next run
starts a fresh one. A worker that dies ends its requests with an ``exit`` event, as a one-shot
worker would.
"""
from __future__ import annotations

import itertools
import time
from typing import Dict, List, Optional, Sequence

from TuckerSegLib.serve.protocol import DONE, cancel_request, quit_request, segment_request

from .worker import WorkerProcess, python_executable, worker_environment

HARD_CANCEL_SECONDS = 15.0


class WarmWorker:
    """A warm ``tuckerseg serve`` worker, started on the first request."""

    def __init__(self, python: Optional[str] = None, env: Optional[Dict[str, str]] = None):
        self.python = python
        self.env = env
        self.worker: Optional[WorkerProcess] = None
        self.requests_served = 0  # by the current process
        self._ids = itertools.count(1)
        self._events: Dict[str, List[dict]] = {}
        self._cancelled_at: Dict[str, float] = {}
        self.pid: Optional[int] = None

    @property
    def alive(self) -> bool:
        return self.worker is not None and self.worker.running

    def _ensure(self) -> WorkerProcess:
        if not self.alive:
            argv = [self.python or python_executable(), "-m", "TuckerSegLib", "serve"]
            self.worker = WorkerProcess(argv, env=worker_environment(self.env), stdin_pipe=True).start()
            self.requests_served, self.pid = 0, None
        return self.worker

    def submit(self, args: Sequence[str]) -> str:
        """Send ``tuckerseg segment ARGS``; returns the request id (events come via ``take``)."""
        worker = self._ensure()
        rid = f"slicer{next(self._ids)}"
        self._events[rid] = []
        if not worker.send(segment_request(rid, list(args))):
            self._events[rid].append({"type": "exit", "returncode": worker.process.poll() or 1})
        return rid

    def poll(self) -> None:
        """File the worker's new events by request (returns at once)."""
        if self.worker is None:
            return
        for event in self.worker.poll():
            rid = event.get("request")
            if event.get("type") == "ready":
                self.pid = event.get("pid")
            elif event.get("type") == "exit":  # the worker itself ended: so did its requests
                for events in self._events.values():
                    events.append(dict(event))
                self.worker = None
            elif rid in self._events:
                self._events[rid].append(event)
                if event.get("type") == DONE:
                    self.requests_served += 1
                    self._cancelled_at.pop(rid, None)
        now = time.monotonic()
        if self.worker is not None and any(now - t > HARD_CANCEL_SECONDS for t in self._cancelled_at.values()):
            self.stop(grace_seconds=0.0)  # a cancel that did not land: start afresh next time

    def take(self, request_id: str) -> List[dict]:
        """This request's events since the last call."""
        events = self._events.get(request_id, [])
        self._events[request_id] = []
        if events and events[-1].get("type") in (DONE, "exit"):
            self._events.pop(request_id, None)
        return events

    def cancel(self, request_id: str) -> None:
        """Ask the worker to stop this request; the worker stays up for the next one."""
        self._events.pop(request_id, None)
        if self.alive and self.worker.send(cancel_request(request_id)):
            self._cancelled_at[request_id] = time.monotonic()

    def last_stderr(self, lines: int = 5) -> str:
        return self.worker.last_stderr(lines) if self.worker is not None else ""

    def stop(self, grace_seconds: float = 3.0) -> None:
        """End the worker (at the module's cleanup, or after a cancel that did not land)."""
        if self.worker is None:
            return
        worker, self.worker = self.worker, None
        worker.send(quit_request())
        worker.cancel(grace_seconds=grace_seconds)
        self._cancelled_at.clear()
        for events in self._events.values():
            events.append({"type": "exit", "returncode": -1})


_shared: Optional[WarmWorker] = None


def shared_worker() -> WarmWorker:
    """The one warm worker of this Slicer session, whichever logic asks (so that a console logic
    and the panel's do not start two)."""
    global _shared
    if _shared is None:
        _shared = WarmWorker()
    return _shared
