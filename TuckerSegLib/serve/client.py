"""Start a warm worker (``tuckerseg serve``) and talk to it from Python.

Why here: scripts, tests and the Slicer module's console API want "segment this, then that" in
a worker that stays warm, without writing the protocol by hand. The client imports no torch; a
reader thread sorts the worker's event lines by request.
"""
from __future__ import annotations

import itertools
import os
import queue
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence

from TuckerSegLib.errors import Cancelled, TuckerSegError
from TuckerSegLib.progress import parse_event
from TuckerSegLib.serve.protocol import DONE, READY, cancel_request, quit_request, segment_request


@dataclass
class ServeReply:
    """How one request ended: the command line's exit code, its result or its one-line error."""

    returncode: int
    result: Optional[dict] = None
    error: Optional[str] = None
    seconds: float = 0.0
    events: List[dict] = field(default_factory=list)


class ServeClient:
    """A running ``tuckerseg serve`` process; use as a context manager (``close()`` stops it)."""

    def __init__(self, python: Optional[str] = None, env: Optional[Dict[str, str]] = None,
                 stderr=subprocess.DEVNULL, extra_args: Sequence[str] = (), ready_timeout: float = 300.0):
        argv = [python or sys.executable, "-m", "TuckerSegLib", "serve", *extra_args]
        env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                        env=env, text=True, encoding="utf-8", bufsize=1)
        self._queues: Dict[str, "queue.Queue[Optional[dict]]"] = {}
        self._general: "queue.Queue[Optional[dict]]" = queue.Queue()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        threading.Thread(target=self._read, name="tuckerseg-serve-client", daemon=True).start()
        ready = self._general.get(timeout=ready_timeout)
        if ready is None or ready.get("type") != READY:
            self.close()
            raise TuckerSegError("the warm worker did not start")
        self.pid = int(ready["pid"])

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            event = parse_event(line)
            if event is None:
                continue
            rid = event.get("request")
            with self._lock:
                target = self._queues.get(rid) if rid is not None else None
            (target or self._general).put(event)
        with self._lock:  # the worker is gone: wake everyone waiting
            for q in list(self._queues.values()) + [self._general]:
                q.put(None)

    def _send(self, line: str) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            raise TuckerSegError("the warm worker has stopped") from None

    # -- requests ---------------------------------------------------------------------------
    def submit(self, args: Sequence[str]) -> str:
        """Queue ``tuckerseg segment ARGS``; returns the request id."""
        rid = f"r{next(self._ids)}"
        with self._lock:
            self._queues[rid] = queue.Queue()
        self._send(segment_request(rid, list(args)))
        return rid

    def events(self, request_id: str, timeout: Optional[float] = None) -> Iterator[dict]:
        """The request's events as they come, ``done`` last."""
        q = self._queues[request_id]
        while True:
            event = q.get(timeout=timeout)
            if event is None:
                raise TuckerSegError("the warm worker stopped during the request")
            yield event
            if event.get("type") == DONE:
                with self._lock:
                    self._queues.pop(request_id, None)
                return

    def wait(self, request_id: str, timeout: Optional[float] = None) -> ServeReply:
        reply = ServeReply(returncode=-1)
        for event in self.events(request_id, timeout):
            reply.events.append(event)
            if event["type"] == "result":
                reply.result = event["result"]
            elif event["type"] == "error":
                reply.error = event["message"]
            elif event["type"] == DONE:
                reply.returncode, reply.seconds = int(event["returncode"]), float(event.get("seconds", 0.0))
        return reply

    def segment(self, args: Sequence[str], timeout: Optional[float] = None) -> dict:
        """Run one request to its end: the result, or the worker's one-line error raised."""
        reply = self.wait(self.submit(args), timeout)
        if reply.returncode == Cancelled.exit_code:
            raise Cancelled(reply.error or "cancelled")
        if reply.returncode != 0:
            raise TuckerSegError(reply.error or f"the request failed (exit {reply.returncode})")
        return reply.result or {}

    def cancel(self, request_id: str) -> None:
        self._send(cancel_request(request_id))

    # -- lifetime ---------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self, timeout: float = 30.0) -> None:
        if self.alive:
            try:
                self._send(quit_request())
                self.process.stdin.close()
            except (TuckerSegError, OSError):
                pass
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "ServeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
