"""The child process that does the segmentation, so that Slicer never blocks.

``WorkerProcess`` starts a command in its own process group (POSIX session / Windows process
group, console window hidden as ``slicer.util.launchConsoleProcess`` hides it). The child writes
stdout and stderr to two files in a log folder; ``poll()`` reads what was added since the last
call, without blocking and without any Python thread: inside Slicer, PythonQt runs Python threads
only while Python code runs, so a reader thread would stall while Slicer idles, and the panel's
QTimer is what calls ``poll()``. It returns protocol events: the ``TUCKERSEG_EVENT`` lines of
``TuckerSegLib.progress`` as they are, other output as ``log`` events, and finally one ``exit``
event ``{"type": "exit", "returncode"}``. ``cancel()`` ends the whole group, children included.
"""
from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Deque, Dict, List, Optional, Sequence

from TuckerSegLib.progress import parse_event

STDERR_TAIL_LINES = 20
STREAMS = ("stdout", "stderr")


class _Tail:
    """New complete lines of a file another process appends to (read in binary, no blocking)."""

    def __init__(self, path: str):
        self.path = path
        self.offset = 0
        self.partial = b""

    def read_lines(self, final: bool = False) -> List[str]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except OSError:
            data = b""
        self.offset += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        if final and self.partial:
            lines.append(self.partial)
            self.partial = b""
        return [line.decode("utf-8", "replace").rstrip("\r") for line in lines]


def _hidden_console_kwargs() -> dict:
    """Popen arguments for a child in its own process group, with no console window on Windows."""
    if os.name == "nt":
        info = subprocess.STARTUPINFO()  # type: ignore[attr-defined]
        info.dwFlags |= subprocess.STARTF_USESHOWWINDOW  # type: ignore[attr-defined]
        info.wShowWindow = 0  # SW_HIDE
        flags = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW  # type: ignore[attr-defined]
        return {"startupinfo": info, "creationflags": flags}
    return {"start_new_session": True}  # own session and process group: kill them all


class WorkerProcess:
    """One running command with machine-readable progress on stdout."""

    def __init__(self, argv: Sequence[str], env: Optional[Dict[str, str]] = None,
                 cwd: Optional[str] = None, log_dir: Optional[str] = None, stdin_pipe: bool = False):
        self.argv = [str(a) for a in argv]
        self.stdin_pipe = stdin_pipe  # requests to a warm worker go in on its stdin (``send``)
        self.env = env
        self.cwd = cwd
        self.process: Optional[subprocess.Popen] = None
        self.cancelled = False
        self.returncode: Optional[int] = None
        self.stderr_tail: Deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._log_dir = log_dir
        self._own_log_dir = log_dir is None
        self._tails: Dict[str, _Tail] = {}
        self._exit_reported = False

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "WorkerProcess":
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("PYTHONIOENCODING", "utf-8")
        if self._log_dir is None:
            self._log_dir = tempfile.mkdtemp(prefix="tuckerseg-worker-")
        os.makedirs(self._log_dir, exist_ok=True)
        paths = {name: os.path.join(self._log_dir, f"worker-{name}.txt") for name in STREAMS}
        handles = {name: open(path, "wb") for name, path in paths.items()}
        try:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.PIPE if self.stdin_pipe else subprocess.DEVNULL,
                stdout=handles["stdout"],
                stderr=handles["stderr"], env=env, cwd=self.cwd, **_hidden_console_kwargs())
        except Exception:
            self._remove_logs()
            raise
        finally:
            for handle in handles.values():  # the child holds its own copies
                handle.close()
        self._tails = {name: _Tail(path) for name, path in paths.items()}
        return self

    def send(self, line: str) -> bool:
        """Write one line to the child's stdin (``stdin_pipe``); False when the child is gone."""
        if self.process is None or self.process.stdin is None or self.process.poll() is not None:
            return False
        try:
            self.process.stdin.write((line.rstrip("\n") + "\n").encode("utf-8"))
            self.process.stdin.flush()
            return True
        except OSError:  # broken pipe: the child ended
            return False

    @property
    def running(self) -> bool:
        return self.process is not None and not self._exit_reported

    def poll(self) -> List[dict]:
        """Events written since the last call (returns at once); the last of the run is ``exit``."""
        if self.process is None or self._exit_reported:
            return []
        ended = self.process.poll() is not None  # before reading: then nothing is written later
        events: List[dict] = []
        for name in STREAMS:
            for line in self._tails[name].read_lines(final=ended):
                if name == "stdout":
                    event = parse_event(line)
                    events.append(event if event is not None else {"type": "log", "message": line})
                elif line.strip():
                    self.stderr_tail.append(line)
                    events.append({"type": "log", "message": line, "stream": "stderr"})
        if ended:
            self.returncode = self.process.returncode
            self._exit_reported = True
            self._remove_logs()
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

    def _remove_logs(self) -> None:
        if self._own_log_dir and self._log_dir:
            shutil.rmtree(self._log_dir, ignore_errors=True)

    # -- cancel ----------------------------------------------------------------------------
    def cancel(self, grace_seconds: float = 3.0) -> None:
        """End the process and all its children: polite signal first, then kill."""
        if self.process is None or self._exit_reported:
            return
        self.cancelled = True
        pid = self.process.pid
        if os.name == "nt":
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(pid)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False, **_hidden_console_kwargs())
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
        self._remove_logs()

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
