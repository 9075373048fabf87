"""seaborn, which nnU-Net imports for training plots, loaded only if something uses it.

Why: TotalSegmentator's pipeline imports nnU-Net's trainer, whose logger imports seaborn (and
with it pandas and scipy.stats) at the top for its training plots. Nothing in a prediction
touches it, yet importing it costs tenths of a second of every run on a small CPU. It is
registered as a stand-in module that imports the real one on its first attribute access and
passes everything on to it: code that plots still works. (``importlib.util.LazyLoader`` does not
serve: an ``import`` statement of a module already in ``sys.modules`` reads its ``__spec__``,
which loads a lazy module. matplotlib's pyplot cannot wait: the logger's ``matplotlib.use``
switches the backend of a pyplot it finds in ``sys.modules``.)
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from typing import Any

DEFERRED = ("seaborn",)
_lock = threading.Lock()


class DeferredModule(types.ModuleType):
    """Stands in for a module not imported yet; the first attribute asked for imports it."""

    def __init__(self, name: str, spec) -> None:
        super().__init__(name)
        self.__spec__ = spec
        self.__file__ = spec.origin
        if spec.submodule_search_locations is not None:
            self.__path__ = list(spec.submodule_search_locations)

    def __getattr__(self, attr: str) -> Any:  # only for names this stand-in does not hold
        name = self.__name__
        with _lock:
            if sys.modules.get(name) is self:
                del sys.modules[name]
            real = importlib.import_module(name)
        return getattr(real, attr)


def defer_training_imports() -> None:
    """Register each of ``DEFERRED`` not imported yet as a ``DeferredModule``."""
    for name in DEFERRED:
        if name in sys.modules:
            continue
        try:
            spec = importlib.util.find_spec(name)  # imports a dotted name's parent, not the module
        except (ImportError, ValueError):
            continue
        if spec is not None:
            sys.modules[name] = DeferredModule(name, spec)
