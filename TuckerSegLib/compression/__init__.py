"""The compression algorithm: which ranks each layer gets, and its factors.

Read in this order:

- ``compress``: ``compress_model(model, spec, data)``, the one entry point (and
  ``compress_network`` for a bare ``nn.Module``);
- ``ranks``: rank policies (``budget``, ``uniform``, ``energy``, ``paper``) on layer shapes and
  kernel spectra;
- ``sensitivity`` and ``search``: what the ``budget`` policy measures on the network (each
  layer's effect on the output, then closed-loop refinement on a probe and whole volumes);
- ``probe_data``, ``phantom``, ``calibration``, ``ct_patches``: the inputs it measures on
  (phantom CT patches and volumes, or the user's CTs);
- ``cache``: each (model, spec) compressed once, then loaded.

Tensor math lives below in ``TuckerSegLib.decomposition``, layer surgery and cost in
``TuckerSegLib.network``. This package's ``__init__`` imports nothing heavy.
"""
from __future__ import annotations

from typing import Any

# Raised whenever the same spec may give other ranks or factors (rank policies, probe,
# refinement): cached compressed models of an older version are then rebuilt, not reused.
ALGORITHM_VERSION = 11

_EXPORTS = {
    "compress_model": "TuckerSegLib.compression.compress",
    "compress_network": "TuckerSegLib.compression.compress",
    "CompressionData": "TuckerSegLib.compression.compress",
    "default_data": "TuckerSegLib.compression.compress",
    "get_compressed_model": "TuckerSegLib.compression.cache",
}

__all__ = ["ALGORITHM_VERSION", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """Import the heavy modules (torch, nnU-Net) only when one of their names is used."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
