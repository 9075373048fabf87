"""The child process that does the segmentation, so that Slicer never blocks.

``WorkerProcess`` starts a command in its own process group (POSIX session / Windows process
group), reads stdout and stderr on two daemon threads and queues what it reads. ``poll()`` drains
the queue on the caller's thread (Slicer's main thread through a QTimer, or a plain loop) and
returns protocol events: the ``TUCKERSEG_EVENT`` lines of ``TuckerSegLib.progress`` as they are,
other output as ``log`` events, and finally one ``exit`` event ``{"type": "exit", "returncode"}``.
``cancel()`` ends the whole group, children included.
"""
from __future__ import annotations

import collections
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Deque, Dict, List, Optional, Sequence

from TuckerSegLib.progress import parse_event

STDERR_TAIL_LINES = 20


class WorkerProcess:
    """One running command with machine-readable progress on stdout."""

    def __init__(self, argv: Sequence[str], env: Optional[Dict[str, str]] = None,
                 cwd: Optional[str] = None):
        self.argv = [str(a) for a in argv]
        self.env = env
        self.cwd = cwd
        self.process: Optional[subprocess.Popen] = None
        self.cancelled = False
        self.returncode: Optional[int] = None
        self.stderr_tail: Deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._queue: "queue.Queue[tuple]" = queue.Queue()
        self._threads: List[threading.Thread] = []
        self._exit_reported = False

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "WorkerProcess":
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("PYTHONIOENCODING", "utf-8")
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        else:
            kwargs["start_new_session"] = True  # own session and process group: kill them all
        self.process = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env, cwd=self.cwd, text=True, encoding="utf-8", errors="replace", bufsize=1,
            **kwargs)
        for stream, name in ((self.process.stdout, "stdout"), (self.process.stderr, "stderr")):
            thread = threading.Thread(target=self._read, args=(stream, name), daemon=True,
                                      name=f"tuckerseg-{name}")
            thread.start()
            self._threads.append(thread)
        return self

    def _read(self, stream, name: str) -> None:
        try:
            for line in iter(stream.readline, ""):
                self._queue.put((name, line.rstrip("\r\n")))
        except (OSError, ValueError):
            pass
        finally:
            self._queue.put((name, None))

    @property
    def running(self) -> bool:
        return self.process is not None and not self._exit_reported

    def poll(self) -> List[dict]:
        """Events read since the last call; the last one of the run is ``exit``."""
        events: List[dict] = []
        while True:
            try:
                name, line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                continue
            if name == "stdout":
                event = parse_event(line)
                events.append(event if event is not None else {"type": "log", "message": line})
            else:
                if line.strip():
                    self.stderr_tail.append(line)
                    events.append({"type": "log", "message": line, "stream": "stderr"})
        if (not self._exit_reported and self.process is not None
                and self.process.poll() is not None
                and not any(t.is_alive() for t in self._threads) and self._queue.empty()):
            self.returncode = self.process.returncode
            self._exit_reported = True
            events.append({"type": "exit", "returncode": self.returncode,
                           "cancelled": self.cancelled})
        return events

    def wait_events(self, timeout: float = 0.1) -> List[dict]:
        """Block up to ``timeout`` seconds for the next events (for synchronous use)."""
        deadline = time.monotonic() + timeout
        while True:
            events = self.poll()
            if events or not self.running or time.monotonic() >= deadline:
                return events
            time.sleep(0.02)

    # -- cancel ----------------------------------------------------------------------------
    def cancel(self, grace_seconds: float = 3.0) -> None:
        """End the process and all its children: polite signal first, then kill."""
        if self.process is None or self._exit_reported:
            return
        self.cancelled = True
        pid = self.process.pid
        if os.name == "nt":
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        else:
            _signal_group(pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_seconds)
            except subprocess.TimeoutExpired:
                pass
            # The leader may be gone while children linger in the group: kill what is left.
            _signal_group(pid, signal.SIGKILL)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def last_stderr(self, lines: int = 5) -> str:
        """The last non-empty stderr lines, joined, for an error message."""
        return "\n".join(list(self.stderr_tail)[-lines:])


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the child is its session's leader: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass


def worker_environment(base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The child's environment: ``base`` (default: ours) with ``TuckerSegLib`` importable.

    Inside Slicer the extension's ``TuckerSegLib`` sits in the scripted-modules folder, which
    Slicer puts on its own ``sys.path`` but a fresh ``PythonSlicer`` would not search.
    """
    import TuckerSegLib

    env = dict(os.environ if base is None else base)
    lib_parent = os.path.dirname(os.path.dirname(os.path.abspath(TuckerSegLib.__file__)))
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if lib_parent not in paths:
        env["PYTHONPATH"] = os.pathsep.join([lib_parent, *paths])
    return env


def python_executable() -> str:
    """The Python that runs the worker: ``PythonSlicer`` inside Slicer, else this interpreter."""
    import shutil

    found = shutil.which("PythonSlicer")
    if found:
        return found
    exe = sys.executable or "python3"
    # Inside Slicer sys.executable is the Slicer launcher; PythonSlicer lives beside it.
    folder = os.path.dirname(exe)
    for candidate in ("PythonSlicer", "PythonSlicer.exe"):
        path = os.path.join(folder, candidate)
        if os.path.exists(path):
            return path
    return exe
