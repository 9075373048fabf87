"""The compression cache: each (model, fold, policy, ratio, method) is compressed once per
``compression.ALGORITHM_VERSION`` (a newer TuckerSeg that chooses ranks differently rebuilds).

Entries are compressed-model folders (``compressed_file``) under the cache folder, which is, in
order: the ``cache_dir`` argument, ``$TUCKERSEG_CACHE_DIR``, a ``tuckerseg_cache`` folder beside
the weights (inside the nnU-Net model folder) when writable, else ``~/.cache/tuckerseg``.

Concurrency: a per-entry file lock serialises builders, and entries are written to a temporary
folder and renamed into place, so two runs at once never see or leave a half-written entry. An
entry whose source weights changed, or that fails to load (damaged), is rebuilt.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Optional, Tuple, Union

from torch import nn

from TuckerSegLib.compression import ALGORITHM_VERSION, RANK_MULTIPLE, compress_network
from TuckerSegLib.errors import ModelError
from TuckerSegLib.specs import check_ratio
from TuckerSegLib.models.compressed_file import load_compressed, read_manifest, save_compressed
from TuckerSegLib.models.nnunet_folder import DEFAULT_CHECKPOINT, NnUNetModel, load_model_folder
from TuckerSegLib.models.probe import budget_inputs
from TuckerSegLib.network.cost import count_cost
from TuckerSegLib.progress import NullProgress, Progress

CACHE_DIR_NAME = "tuckerseg_cache"


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
        return True
    except OSError:
        return False


def default_cache_dir(model_folder: Path) -> Path:
    env = os.environ.get("TUCKERSEG_CACHE_DIR")
    if env:
        return Path(env)
    beside = Path(model_folder) / CACHE_DIR_NAME
    if _writable(beside):
        return beside
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    digest = hashlib.sha1(str(Path(model_folder).resolve()).encode()).hexdigest()[:10]
    return base / "tuckerseg" / f"{Path(model_folder).name}-{digest}"


def entry_name(fold, checkpoint_name: str, policy: str, ratio: float, method: str,
               rank_multiple: int) -> str:
    stem = Path(checkpoint_name).stem
    return f"fold{fold}-{stem}-{policy}-r{ratio:.4f}-{method}-m{rank_multiple}-v{ALGORITHM_VERSION}"


def original_report(model: NnUNetModel) -> dict:
    """The manifest-like summary of an uncompressed model (ratio 1.0)."""
    cost = count_cost(model.network, (1, model.num_input_channels, *model.patch_size)).as_dict()
    return {"compression": {"policy": "none", "ratio": 1.0},
            "report": {"original": cost, "compressed": cost, "params_ratio": 1.0, "macs_ratio": 1.0,
                       "ratio": 1.0, "policy": "none", "layers": []},
            "source": {"folder": str(model.folder), "fold": model.fold,
                       "trainer_name": model.trainer_name, "configuration": model.configuration}}


def get_compressed_model(model_folder: Union[str, Path], fold: Union[int, str] = 0,
                         policy: str = "budget", ratio: float = 0.5,
                         cache_dir: Optional[Union[str, Path]] = None,
                         checkpoint_name: str = DEFAULT_CHECKPOINT, method: str = "hosvd",
                         rank_multiple: int = RANK_MULTIPLE,
                         progress: Optional[Progress] = None) -> NnUNetModel:
    """The model of ``model_folder`` compressed at ``ratio``; from the cache when present.

    ``ratio == 1.0`` returns the original model, untouched and uncached; its ``manifest`` holds
    the original cost so that callers can report it the same way.
    """
    from filelock import FileLock

    ratio = check_ratio(ratio)
    progress = progress or NullProgress()
    model_folder = Path(model_folder)
    if ratio >= 1.0:
        model = load_model_folder(model_folder, fold, checkpoint_name)
        model.manifest = original_report(model)
        return model
    root = Path(cache_dir) if cache_dir else default_cache_dir(model_folder)
    root.mkdir(parents=True, exist_ok=True)
    entry = root / entry_name(fold, checkpoint_name, policy, ratio, method, rank_multiple)
    ckpt = model_folder / f"fold_{fold}" / checkpoint_name
    with FileLock(str(entry) + ".lock"):
        cached = _load_valid(entry, ckpt, progress)
        if cached is not None:
            return cached
        progress.log(f"compressing {model_folder.parent.name or model_folder.name} fold {fold}: "
                     f"{policy} policy, ratio {ratio:g} (once; cached in {entry})")
        model = load_model_folder(model_folder, fold, checkpoint_name)
        measured = budget_inputs(model) if policy == "budget" else {}
        result = compress_network(model.network, ratio, policy, patch_size=model.patch_size,
                                  in_channels=model.num_input_channels, method=method,
                                  rank_multiple=rank_multiple, inplace=True, progress=progress,
                                  **measured)
        save_compressed(entry, model, result)
    return load_compressed(entry, verify_hash=False)


def _load_valid(entry: Path, ckpt: Path, progress: Progress) -> Optional[NnUNetModel]:
    """A cache entry that is intact and made from the current weights, else None (and removed)."""
    if not entry.exists():
        return None
    try:
        manifest = read_manifest(entry)
        from TuckerSegLib.models.checkpoint import file_fingerprint

        if ckpt.is_file() and manifest["source"].get("fingerprint") != file_fingerprint(ckpt):
            progress.log(f"weights changed since {entry.name} was cached: rebuilding it")
        else:
            return load_compressed(entry)
    except (ModelError, KeyError) as exc:
        progress.log(f"cache entry {entry} is damaged ({exc}): rebuilding it")
    shutil.rmtree(entry, ignore_errors=True)
    return None


def get_compressed_network(model_folder: Union[str, Path], fold: Union[int, str] = 0,
                           policy: str = "budget", ratio: float = 0.5,
                           cache_dir: Optional[Union[str, Path]] = None,
                           checkpoint_name: str = DEFAULT_CHECKPOINT,
                           progress: Optional[Progress] = None, **kwargs) -> Tuple[nn.Module, dict]:
    """``(network, manifest)`` of ``get_compressed_model`` (the form the predictor hook needs)."""
    model = get_compressed_model(model_folder, fold, policy, ratio, cache_dir, checkpoint_name,
                                 progress=progress, **kwargs)
    return model.network, model.manifest or {}
