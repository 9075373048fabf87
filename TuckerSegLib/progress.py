"""Progress reporting: tqdm bars on a terminal, machine-readable JSON lines for the Slicer module.

Long work calls ``report.stage(...)`` / ``report.update(...)`` on a ``Progress`` object. The
command line picks the sink: ``--progress bar`` (default, tqdm on stderr), ``--progress json``
(one line per event on stdout, prefixed with ``EVENT_PREFIX`` so that it can be told apart from
what nnU-Net and TotalSegmentator print), or ``none``.

Event lines look like ``TUCKERSEG_EVENT {"type": "progress", "stage": "segment", ...}``; types:

- ``stage``: a new step begins: ``{"stage": str, "message": str}``
- ``progress``: ``{"stage": str, "fraction": float in [0, 1], "message": str}`` (overall fraction)
- ``log``: ``{"message": str}``
- ``result``: ``{"result": {...}}`` the final, JSON-serialisable result of the command
- ``error``: ``{"message": str}`` a one-line user-facing error; the process exits non-zero
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TextIO

EVENT_PREFIX = "TUCKERSEG_EVENT "



def format_event(event: dict) -> str:
    """Serialise one event as a single protocol line (no newline)."""
    return EVENT_PREFIX + json.dumps(event, separators=(",", ":"), default=str)


def parse_event(line: str) -> Optional[dict]:
    """Parse one line of a child process's output; None when it is not a protocol line."""
    line = line.strip()
    if not line.startswith(EVENT_PREFIX.strip()):
        return None
    payload = line[len(EVENT_PREFIX.strip()):].strip()
    try:
        event = json.loads(payload)
    except json.JSONDecodeError:
        return None
    if not isinstance(event, dict) or "type" not in event:
        return None
    return event


@dataclass
class Progress:
    """A sink for progress events. The base class ignores them (``--progress none``)."""

    def stage(self, stage: str, message: str = "") -> None:
        pass

    def update(self, fraction: float, message: str = "", stage: str = "") -> None:
        pass

    def log(self, message: str) -> None:
        pass

    def result(self, result: dict) -> None:
        pass

    def error(self, message: str) -> None:
        pass

    def check(self) -> None:
        """Raise ``errors.Cancelled`` when the user asked to stop; long loops call it between
        steps (the predictor calls it before every patch). Nothing to check here."""


class NullProgress(Progress):
    """Reports nothing."""


class EventProgress(Progress):
    """Turns each call into a protocol event dict and hands it to ``_emit``."""

    _stage: str = ""

    def _emit(self, event: dict) -> None:
        raise NotImplementedError

    def stage(self, stage: str, message: str = "") -> None:
        self._stage = stage
        self._emit({"type": "stage", "stage": stage, "message": message})

    def update(self, fraction: float, message: str = "", stage: str = "") -> None:
        self._emit({"type": "progress", "stage": stage or self._stage,
                    "fraction": max(0.0, min(1.0, float(fraction))), "message": message})

    def log(self, message: str) -> None:
        self._emit({"type": "log", "message": message})

    def result(self, result: dict) -> None:
        self._emit({"type": "result", "result": result})

    def error(self, message: str) -> None:
        self._emit({"type": "error", "message": message})


@dataclass
class CallbackProgress(EventProgress):
    """Forwards every event, as a protocol dict, to a Python callable (used by the APIs)."""

    callback: Callable[[dict], None] = lambda event: None

    def _emit(self, event: dict) -> None:
        self.callback(event)


@dataclass
class JsonProgress(EventProgress):
    """Writes protocol lines (see module docstring) to ``stream`` (stdout by default)."""

    stream: Optional[TextIO] = None

    def _emit(self, event: dict) -> None:
        stream = self.stream or sys.stdout
        stream.write(format_event(event) + "\n")
        stream.flush()


@dataclass
class BarProgress(Progress):
    """A tqdm bar on stderr for the whole run, with the current stage as its description."""

    _bar: Any = None
    _t0: float = field(default_factory=time.perf_counter)

    def _ensure(self):
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=1000, file=sys.stderr, leave=False,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")
        return self._bar

    def stage(self, stage: str, message: str = "") -> None:
        self._ensure().set_description_str(message or stage)

    def update(self, fraction: float, message: str = "", stage: str = "") -> None:
        bar = self._ensure()
        if message:
            bar.set_description_str(message)
        bar.n = int(round(1000 * max(0.0, min(1.0, fraction))))
        bar.refresh()

    def log(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def result(self, result: dict) -> None:
        self.close()

    def error(self, message: str) -> None:
        self.close()


def make_progress(kind: str) -> Progress:
    """Build the sink named on the command line: ``bar``, ``json`` or ``none``."""
    if kind == "json":
        return JsonProgress()
    if kind == "none":
        return NullProgress()
    return BarProgress()
