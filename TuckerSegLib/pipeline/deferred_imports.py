"""Plotting libraries that a segmentation process imports but never uses, loaded on first use.

Why: TotalSegmentator's ``nnunet`` module imports its custom trainers, and so nnU-Net's trainer
and its training logger. That logger imports seaborn (and, behind it, scipy.stats) and
matplotlib.pyplot to draw training curves. On a 2-core CPU this costs about 0.8 s of a 15 s warm
``--fast`` run, and inference never draws a curve.

``defer_plotting_imports`` puts a placeholder module in ``sys.modules`` for each library. An
``import seaborn`` then binds the placeholder. The placeholder imports the real library the first
time any of its attributes is read, so code that does plot (``tuckerseg finetune``, ``eval``)
works unchanged.

Why not ``importlib.util.LazyLoader``: on Python 3.11, the import system reads ``__spec__`` of a
module found in ``sys.modules``, and a lazy module loads on any attribute read. So the second
plain ``import`` loads it after all. The placeholder answers the import system's own attributes
without loading.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from typing import List, Sequence

PLOTTING = ("seaborn",)

# what the import system and ``inspect`` read from any module in sys.modules; answered without loading
_IMPORT_SYSTEM = frozenset({"__spec__", "__name__", "__loader__", "__package__", "__file__"})


class DeferredModule(types.ModuleType):
    """Stands in for a module until one of its attributes is read, then imports it and forwards."""

    def __init__(self, name: str, spec) -> None:
        super().__init__(name)
        self.__spec__ = spec
        self.__loader__ = spec.loader
        self.__package__ = spec.parent
        if spec.has_location:  # inspect.getmodule reads every module's __file__ (torch does on import)
            self.__file__ = spec.origin
        self._deferred_lock = threading.RLock()
        self._deferred_real = None

    def _load(self) -> types.ModuleType:
        with self._deferred_lock:
            if self._deferred_real is None:
                name = self.__name__
                if sys.modules.get(name) is self:
                    del sys.modules[name]
                try:
                    self._deferred_real = importlib.import_module(name)
                except BaseException:
                    sys.modules.setdefault(name, self)  # a later read tries again
                    raise
            return self._deferred_real

    def __getattr__(self, attr: str):  # only for attributes not set on the placeholder itself
        if attr in _IMPORT_SYSTEM:
            raise AttributeError(attr)
        return getattr(self._load(), attr)

    def __dir__(self) -> List[str]:
        return dir(self._load())


def defer_plotting_imports(names: Sequence[str] = PLOTTING) -> List[str]:
    """Put a ``DeferredModule`` in ``sys.modules`` for each of ``names`` not imported yet (and
    installed); returns the names deferred."""
    deferred = []
    for name in names:
        if name in sys.modules:
            continue
        try:
            spec = importlib.util.find_spec(name)  # imports the parent package of a submodule
        except (ImportError, ValueError):
            continue
        if spec is None or spec.loader is None:
            continue
        module = DeferredModule(name, spec)
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
        deferred.append(name)
    return deferred


def is_loaded(name: str) -> bool:
    """Whether ``name`` is really imported: in ``sys.modules`` and not a placeholder left unloaded."""
    module = sys.modules.get(name)
    return module is not None and not (isinstance(module, DeferredModule) and module._deferred_real is None)
