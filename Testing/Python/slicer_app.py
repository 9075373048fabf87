"""Slicer's own Python (one release tag) over slicer-core's real MRML, in this process.

``activate(tag)`` makes ``import slicer`` behave as inside that Slicer release as far as a
scripted module's logic goes: Slicer's own ``parameterNodeWrapper``, ``ScriptedLoadableModule``
and ``i18n`` from ``$TUCKERSEG_SLICER_DIR/python/<tag>/slicer`` are appended to ``slicer.__path__``;
``slicer.mrmlScene`` is a real ``vtkMRMLScene``. Only ``qt`` and ``ctk`` are stand-ins: inert
classes (no widget works), except ``qt.QTimer``, whose due callbacks fire from
``slicer.app.processEvents()`` as they would from Qt's event loop.

For tags before 5.10 the segment API is the old one: ``vtkSegment`` has no ``SetTerminology`` /
``GetTerminology`` (slicer-core is 5.11+, so they are hidden), as in the Slicer most users run.

Slicer's Python files cannot be swapped inside one process: one tag per process.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SLICER_DIR = Path(os.environ.get("TUCKERSEG_SLICER_DIR", REPO.parent / "shared" / "slicer"))
TAGS = ("v5.6.2", "v5.8.1", "v5.10.0")
OLD_SEGMENT_API_TAGS = ("v5.6.2", "v5.8.1")  # vtkSegment.SetTerminology is new in 5.10


def tag_dir(tag: str) -> Path:
    return SLICER_DIR / "python" / tag / "slicer"


def missing_reason(tag: str = TAGS[0]) -> str:
    """Why Slicer's own Python for ``tag`` cannot be used here ('' when it can)."""
    if not (tag_dir(tag) / "parameterNodeWrapper" / "__init__.py").exists():
        return (f"Slicer's own Python for {tag} not found in {SLICER_DIR} (set TUCKERSEG_SLICER_DIR "
                f"to the folder holding python/{tag}/slicer)")
    import importlib.util
    if importlib.util.find_spec("slicer_core") is None:
        return "slicer-core (Slicer's MRML without Qt) is not installed"
    return ""


# -- qt / ctk stand-ins ------------------------------------------------------------------------
class _InertMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert()


class _Inert(metaclass=_InertMeta):
    """Any constructor call, attribute, call or operator works and does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert()

    def __call__(self, *args, **kwargs):
        return _Inert()

    def __or__(self, other):
        return self

    __ror__ = __and__ = __rand__ = __or__

    def __bool__(self):
        return False

    def __iter__(self):
        return iter(())


class _Signal:
    def __init__(self):
        self._slots = []

    def connect(self, slot):
        self._slots.append(slot)

    def disconnect(self, slot=None):
        self._slots = [] if slot is None else [s for s in self._slots if s is not slot]

    def emit(self, *args):
        for slot in list(self._slots):
            slot(*args)


class QTimer:
    """A timer whose due timeouts fire from ``slicer.app.processEvents()`` (Qt's loop here)."""

    _active: "list[QTimer]" = []

    def __init__(self, parent=None):
        self.timeout = _Signal()
        self._interval = 0
        self._single = False
        self._due = None

    def setInterval(self, msec):
        self._interval = int(msec)

    def interval(self):
        return self._interval

    def setSingleShot(self, single):
        self._single = bool(single)

    def isSingleShot(self):
        return self._single

    def isActive(self):
        return self in QTimer._active

    def start(self, msec=None):
        if msec is not None:
            self._interval = int(msec)
        self._due = time.monotonic() + self._interval / 1000.0
        if self not in QTimer._active:
            QTimer._active.append(self)

    def stop(self):
        if self in QTimer._active:
            QTimer._active.remove(self)

    @staticmethod
    def singleShot(msec, callback):
        timer = QTimer()
        timer.setSingleShot(True)
        timer.timeout.connect(callback)
        timer.start(msec)

    @classmethod
    def fire_due(cls):
        now = time.monotonic()
        for timer in list(cls._active):
            if timer in cls._active and timer._due is not None and timer._due <= now:
                if timer._single:
                    timer.stop()
                else:
                    timer._due = now + timer._interval / 1000.0
                timer.timeout.emit()


def _stand_in_module(name: str, **extra) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(extra)

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        cls = _InertMeta(attr, (_Inert,), {})
        setattr(module, attr, cls)
        return cls

    module.__getattr__ = __getattr__
    return module


class _App:
    """The part of ``slicer.app`` that scripted-module logic uses."""

    def __init__(self):
        self.temporaryPath = tempfile.mkdtemp(prefix="tuckerseg-slicer-app-")

    def processEvents(self, *args):
        QTimer.fire_due()

    def translate(self, context, text, *args):
        return text

    def applicationVersion(self):  # noqa: N802 - Slicer's name
        return "stand-in"


# -- old segment API ---------------------------------------------------------------------------
class _Removed:
    """A class attribute that does not exist (``hasattr`` is False), as in older Slicer."""

    def __init__(self, what: str):
        self.what = what

    def __get__(self, obj, owner):
        raise AttributeError(f"'vtkSegment' object has no attribute '{self.what}' (Slicer < 5.10)")


def _use_old_segment_api(slicer) -> None:
    base = slicer.vtkSegment

    class vtkSegment(base):  # noqa: N801 - Slicer's name
        SetTerminology = _Removed("SetTerminology")
        GetTerminology = _Removed("GetTerminology")

    slicer.vtkSegment = vtkSegment


def activate(tag: str):
    """Set up ``slicer`` as inside Slicer ``tag`` (see the module docstring); returns ``slicer``."""
    if tag not in TAGS:
        raise ValueError(f"unknown Slicer tag {tag!r}; choose one of {', '.join(TAGS)}")
    reason = missing_reason(tag)
    if reason:
        raise RuntimeError(reason)
    sys.modules.setdefault("qt", _stand_in_module("qt", QTimer=QTimer))
    sys.modules.setdefault("ctk", _stand_in_module("ctk"))
    import slicer
    import vtk  # noqa: F401

    slicer.__path__.append(str(tag_dir(tag)))

    def widget_stand_in(attr):  # slicer.qMRMLNodeComboBox and the other Qt widget classes
        if attr.startswith("q") and attr[1:2].isupper():
            cls = _InertMeta(attr, (_Inert,), {})
            setattr(slicer, attr, cls)
            return cls
        raise AttributeError(f"module 'slicer' has no attribute '{attr}'")

    slicer.__getattr__ = widget_stand_in
    slicer.app = _App()
    slicer.mrmlScene = slicer.vtkMRMLScene()
    slicer.util.delayDisplay = lambda message, *args, **kwargs: logging.info(message)
    slicer.tuckerseg_test_tag = tag
    if tag in OLD_SEGMENT_API_TAGS:
        _use_old_segment_api(slicer)
    module_dir = str(REPO / "TuckerSeg")
    if module_dir not in sys.path:
        sys.path.insert(0, module_dir)
    return slicer
