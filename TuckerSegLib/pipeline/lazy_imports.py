"""Modules that TotalSegmentator's pipeline imports for training, loaded only if something uses them.

Why: TotalSegmentator's pipeline imports nnU-Net's trainer and predictor, which import at the top
what only training needs: seaborn for training plots (with pandas and scipy.stats), scikit-learn
for cross-validation splits, and ``torch._dynamo`` (the compiler behind ``torch.compile``), of
which a prediction asks only ``isinstance(network, OptimizedModule)``. Nothing in a prediction
touches them, yet importing them costs about two seconds of every run on a small CPU.

Each is registered as a stand-in module that imports the real one on its first attribute access
and passes everything on to it: code that plots, splits or compiles still works. Names an
importer takes at import time (``from X import name``) are served by placeholders that do not
import: a function that imports on its first call, or a class whose ``isinstance`` is false
while its module is not imported (no instance of it can exist before). ``importlib.util.LazyLoader``
does not serve: an ``import`` statement of a module already in ``sys.modules`` reads its
``__spec__``, which loads a lazy module. matplotlib's pyplot cannot wait: the logger's
``matplotlib.use`` switches the backend of a pyplot it finds in ``sys.modules``.
``TUCKERSEG_DEFER_IMPORTS=0`` imports them all as usual (the way to rule this out, and the
benchmarks' before).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
import threading
import types
from typing import Any, Callable, Dict, Optional

# module -> {name an importer takes at import time: "function" or "class"}
DEFERRED: Dict[str, Dict[str, str]] = {
    "seaborn": {},  # nnU-Net's training plots
    "pandas": {},  # seaborn's tables; one rare branch of nnU-Net's label-map resampling
    "nnunetv2.utilities.crossval_split": {"generate_crossval_split": "function"},  # scikit-learn
    "torch._dynamo": {"OptimizedModule": "class"},  # torch.compile
}
_lock = threading.RLock()


def _load(name: str) -> types.ModuleType:
    """The real module, imported now if a stand-in holds its place."""
    with _lock:
        stand_in = sys.modules.get(name)
        if isinstance(stand_in, DeferredModule):
            del sys.modules[name]
            parent, _, child = name.rpartition(".")
            if parent and getattr(sys.modules.get(parent), child, None) is stand_in:
                delattr(sys.modules[parent], child)  # while it imports, the parent holds no stand-in
        return importlib.import_module(name)


def _loaded(name: str) -> Optional[types.ModuleType]:
    """The real module if it has been imported, else None (never imports)."""
    module = sys.modules.get(name)
    return None if module is None or isinstance(module, DeferredModule) else module


def _function_placeholder(module: str, attr: str) -> Callable[..., Any]:
    def placeholder(*args: Any, **kwargs: Any) -> Any:
        return getattr(_load(module), attr)(*args, **kwargs)

    placeholder.__name__ = placeholder.__qualname__ = attr
    placeholder.__module__ = module
    placeholder.__doc__ = f"{module}.{attr}, imported on the first call."
    return placeholder


class _DeferredClassMeta(type):
    """``isinstance``/``issubclass`` against the real class once its module is imported."""

    def _real(cls) -> Optional[type]:
        module = _loaded(cls._deferred_module)
        return None if module is None else getattr(module, cls.__name__)

    def __instancecheck__(cls, obj: Any) -> bool:
        real = cls._real()
        return real is not None and isinstance(obj, real)

    def __subclasscheck__(cls, sub: type) -> bool:
        real = cls._real()
        return real is not None and issubclass(sub, real)


def _class_placeholder(module: str, attr: str) -> type:
    return _DeferredClassMeta(attr, (), {"_deferred_module": module, "__module__": module,
                                         "__doc__": f"{module}.{attr} for isinstance checks, not imported yet."})


_PLACEHOLDERS = {"function": _function_placeholder, "class": _class_placeholder}


class DeferredModule(types.ModuleType):
    """Stands in for a module not imported yet; the first attribute asked for imports it."""

    def __init__(self, name: str, spec, placeholders: Optional[Dict[str, str]] = None) -> None:
        super().__init__(name)
        self.__spec__ = spec
        self.__file__ = spec.origin
        if spec.submodule_search_locations is not None:
            self.__path__ = list(spec.submodule_search_locations)
        for attr, kind in (placeholders or {}).items():
            setattr(self, attr, _PLACEHOLDERS[kind](name, attr))

    def __getattr__(self, attr: str) -> Any:  # only for names this stand-in does not hold
        if attr == "__path__":  # the import system asks it of every module in a `from` import
            raise AttributeError(f"module {self.__name__!r} is not a package")
        return getattr(_load(self.__name__), attr)


class _AlreadyImported(importlib.abc.Loader):
    """Hands the import system a module that the real package imported while it loaded."""

    def __init__(self, module: types.ModuleType) -> None:
        self.module, self.spec = module, module.__spec__

    def create_module(self, spec) -> types.ModuleType:
        return self.module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__ = self.spec  # module_from_spec set ours


class _SubmoduleFinder(importlib.abc.MetaPathFinder):
    """Imports a deferred package for real before any of its submodules.

    Why: a submodule imported under a stand-in (``torch._inductor`` imports ``torch._dynamo.utils``)
    would run without its package's ``__init__``, which sets up what the submodule needs."""

    def find_spec(self, fullname: str, path, target=None):
        parent = fullname.rpartition(".")[0]
        if not isinstance(sys.modules.get(parent), DeferredModule):
            return None
        _load(parent)
        module = sys.modules.get(fullname)
        if module is None or getattr(module, "__spec__", None) is None:
            return None  # not imported by the package: the usual finders load it
        return importlib.util.spec_from_loader(fullname, _AlreadyImported(module),
                                               is_package=hasattr(module, "__path__"))


_FINDER = _SubmoduleFinder()


def defer_training_imports() -> None:
    """Register each of ``DEFERRED`` not imported yet as a ``DeferredModule``."""
    if os.environ.get("TUCKERSEG_DEFER_IMPORTS", "1").strip() == "0":
        return
    for name, placeholders in DEFERRED.items():
        if name in sys.modules:
            continue
        try:
            spec = importlib.util.find_spec(name)  # imports a dotted name's parent, not the module
        except (ImportError, ValueError):
            continue
        if spec is None:
            continue
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
        stand_in = DeferredModule(name, spec, placeholders)
        sys.modules[name] = stand_in
        parent, _, child = name.rpartition(".")
        if parent and parent in sys.modules:  # as the import system would after loading it
            setattr(sys.modules[parent], child, stand_in)
