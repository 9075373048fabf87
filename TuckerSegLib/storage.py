"""Where TuckerSeg keeps what it computes once, and how it writes it safely.

Why one module: compressed models, engine files, timings and choices all live in cache folders
that several runs may read and write at once. Each JSON store is read-merge-written through a
temporary file and a rename, so a reader never sees half a file and a writer keeps what other
runs stored meanwhile; folders are built aside and renamed into place.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

PathLike = Union[str, Path]
CACHE_DIR_NAME = "tuckerseg_cache"


def cache_root() -> Path:
    """``$TUCKERSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/tuckerseg``, else ``~/.cache/tuckerseg``."""
    env = os.environ.get("TUCKERSEG_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tuckerseg"


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
        return True
    except OSError:
        return False


def folder_digest(model_folder: PathLike) -> str:
    """A short name of one model folder. Why: a shared cache folder (``cache_dir``,
    ``$TUCKERSEG_CACHE_DIR``) holds the files of several models, and the five of ``total`` share
    their folder name (``nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres``)."""
    return hashlib.sha1(str(Path(model_folder).resolve()).encode()).hexdigest()[:10]


def model_cache_dir(model_folder: PathLike, cache_dir: Optional[PathLike] = None) -> Path:
    """The cache folder of one nnU-Net model folder, in order: ``cache_dir``,
    ``$TUCKERSEG_CACHE_DIR``, a ``tuckerseg_cache`` folder beside the weights when writable, else
    a folder named after the model under ``cache_root()``. The first two are shared by every
    model: what is stored there is keyed by the model (``folder_digest``, weights fingerprints)."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("TUCKERSEG_CACHE_DIR"):
        return cache_root()
    beside = Path(model_folder) / CACHE_DIR_NAME
    if _writable(beside):
        return beside
    return cache_root() / f"{Path(model_folder).name}-{folder_digest(model_folder)}"


def read_json(path: Optional[PathLike]) -> Dict[str, Any]:
    """A JSON object store; ``{}`` when it is missing or unreadable (it is rebuilt)."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: PathLike, data: Any, indent: Optional[int] = 1) -> None:
    """Write ``data`` as JSON through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=indent, sort_keys=indent == 0))
    os.replace(tmp, path)


def merge_json(path: Optional[PathLike], updates: Dict[str, Any], indent: Optional[int] = 1) -> None:
    """Add ``updates`` to the store at ``path``, keeping what other runs wrote meanwhile."""
    if path is None:
        return
    write_json(path, {**read_json(path), **updates}, indent=indent)


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move a finished folder into place; an existing one is swapped out, then removed."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{int(time.time() * 1e6)}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def writing_dir(dest: Path) -> Iterator[Path]:
    """A temporary sibling folder to fill; it replaces ``dest`` when the block ends without an
    error and is removed when it fails, so ``dest`` is never half written."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
