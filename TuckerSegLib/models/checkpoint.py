"""Loading third-party PyTorch checkpoints as safely as their format allows.

nnU-Net checkpoints are pickles. We never unpickle arbitrary objects: ``torch.load`` runs with
``weights_only=True`` and only a short list of inert numpy types (scalars and dtypes that nnU-Net
stores in its training logs) is allowed on top of torch's own safe set.
"""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from TuckerSegLib.errors import ModelError


def _numpy_safe_globals() -> list:
    allowed = [np.dtype]
    core = getattr(np, "_core", None) or getattr(np, "core")
    allowed.append(core.multiarray.scalar)
    allowed.append(core.multiarray._reconstruct)
    allowed.append(np.ndarray)
    for name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType",
                 "BoolDType", "UInt8DType"):
        dt = getattr(getattr(np, "dtypes", None), name, None)
        if dt is not None:
            allowed.append(dt)
    return allowed


def load_checkpoint(path: Path, mmap: bool = False) -> Dict[str, Any]:
    """The checkpoint dict, loaded without executing pickled code; ``ModelError`` when impossible.

    ``mmap``: tensors map the file and are read only when used (where the file's format allows)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            try:
                data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError:
                if not mmap:
                    raise
                data = torch.load(path, map_location="cpu", weights_only=True)  # e.g. the legacy format
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe content"
        raise ModelError(f"checkpoint {path} holds objects that cannot be loaded safely "
                         f"(weights_only): {first}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ModelError(f"checkpoint {path} is corrupt or not a PyTorch checkpoint: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise ModelError(f"checkpoint {path} does not hold a dict of weights")
    return data


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def file_fingerprint(path: Path) -> str:
    """A cheap identity of a file (size and modification time) for cache keys."""
    st = Path(path).stat()
    return f"{st.st_size}-{st.st_mtime_ns}"
