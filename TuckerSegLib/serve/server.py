"""The warm worker's loop: one request at a time, in this process, so that what the first request
loaded (libraries, TotalSegmentator's setup, prepared networks and engines, see
``pipeline.predictor_hook``) serves the next.

Requests arrive on stdin (``protocol``), read by a thread so that a cancel reaches the request
that is running: its progress sink raises ``Cancelled`` at the next step or patch
(``Progress.check``), the request ends with the command line's cancel code, nothing is written
(``segment`` writes to a temporary path), and the worker takes the next request.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import queue
import sys
import threading
import time
from typing import Callable, Dict, Optional, Set, TextIO

from TuckerSegLib.errors import Cancelled
from TuckerSegLib.progress import JsonProgress, format_event
from TuckerSegLib.serve.protocol import DONE, READY, parse_request


class RequestProgress(JsonProgress):
    """JSON events of one request, tagged with its id; raises ``Cancelled`` once cancelled."""

    def __init__(self, request_id: str, write: Callable[[dict], None], cancelled: threading.Event):
        super().__init__(stream=io.StringIO())  # a stream set: ``segment`` leaves it alone
        self.request_id = request_id
        self._write = write
        self.cancelled = cancelled

    def _emit(self, event: dict) -> None:
        self._write({**event, "request": self.request_id})

    def check(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled("cancelled")

    def stage(self, stage: str, message: str = "") -> None:
        self.check()
        super().stage(stage, message)

    def update(self, fraction: float, message: str = "", stage: str = "") -> None:
        if fraction < 1.0:  # the last update comes after the output is in place
            self.check()
        super().update(fraction, message, stage)


def _parse_args(args: list):
    """``tuckerseg segment ARGS`` parsed; argparse's complaint as one line on failure."""
    from TuckerSegLib.cli.main import parse_command

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return parse_command(["segment", *args]), None
    except SystemExit as exc:
        lines = [ln for ln in captured.getvalue().splitlines() if ln.strip()]
        message = lines[-1].split(": error: ", 1)[-1] if lines else f"bad arguments (exit {exc.code})"
        return None, (message, int(exc.code or 2))


class Server:
    """See the module docstring. ``stdout`` gets only protocol lines; everything libraries print
    goes to stderr."""

    def __init__(self, stdin: TextIO, stdout: TextIO, preload: bool = True):
        self.stdin, self.stdout, self.preload = stdin, stdout, preload
        self._lock = threading.Lock()
        self._queue: "queue.Queue[dict]" = queue.Queue()
        self._current: Optional[str] = None
        self._cancel: Dict[str, threading.Event] = {}
        self._cancelled_early: Set[str] = set()

    def write(self, event: dict) -> None:
        with self._lock:
            self.stdout.write(format_event(event) + "\n")
            self.stdout.flush()

    # -- reading ----------------------------------------------------------------------------
    def _read(self) -> None:
        for line in self.stdin:
            try:
                message = parse_request(line)
            except ValueError as exc:
                self.write({"type": "error", "message": f"bad request: {exc}"})
                continue
            if message is None:
                continue
            if "cancel" in message:
                rid = message["cancel"]
                with self._lock:
                    if rid in self._cancel:
                        self._cancel[rid].set()
                    else:
                        self._cancelled_early.add(rid)
                continue
            if message.get("command") != "quit":
                with self._lock:
                    self._cancel[message["id"]] = threading.Event()
            self._queue.put(message)
        self._queue.put({"command": "quit"})

    # -- running ----------------------------------------------------------------------------
    def run(self) -> int:
        if self.preload:  # what every request needs, loaded before we say ready
            import totalsegmentator.python_api  # noqa: F401

            import TuckerSegLib.pipeline.segment  # noqa: F401
        from TuckerSegLib import __version__

        self.write({"type": READY, "pid": os.getpid(), "version": __version__})
        threading.Thread(target=self._read, name="tuckerseg-serve-stdin", daemon=True).start()
        while True:
            message = self._queue.get()
            if message.get("command") == "quit":
                return 0
            self._handle(message)

    def _handle(self, message: dict) -> None:
        from TuckerSegLib.cli.main import run_command

        rid = message["id"]
        with self._lock:
            event = self._cancel[rid]
            if rid in self._cancelled_early:
                event.set()
        progress = RequestProgress(rid, self.write, event)
        t0 = time.perf_counter()
        try:
            if event.is_set():
                raise Cancelled("cancelled")
            args, problem = _parse_args(message["args"])
            if problem is not None:
                progress.error(problem[0])
                code = problem[1]
            else:
                args.progress = "json"
                module = importlib.import_module(f"TuckerSegLib.cli.{args._module}")
                code = run_command(module, args, progress, debug=False)
        except Cancelled as exc:
            progress.error(str(exc))
            code = exc.exit_code
        finally:
            with self._lock:
                self._cancel.pop(rid, None)
                self._cancelled_early.discard(rid)
        self.write({"type": DONE, "request": rid, "returncode": code,
                    "seconds": round(time.perf_counter() - t0, 3)})


def serve(stdin: Optional[TextIO] = None, stdout: Optional[TextIO] = None, preload: bool = True) -> int:
    """Run the warm worker on this process's stdin/stdout until ``quit`` or the end of stdin."""
    out = stdout or sys.stdout
    previous = sys.stdout
    sys.stdout = sys.stderr  # library prints must not mix with protocol lines
    try:
        return Server(stdin or sys.stdin, out, preload).run()
    finally:
        sys.stdout = previous
