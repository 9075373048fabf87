"""The compression cache: each (model, fold, spec) is compressed once per ``ALGORITHM_VERSION``
(a newer TuckerSeg that chooses ranks differently rebuilds).

Entries are compressed-model folders (``models.compressed_file``) under the model's cache folder
(``storage.model_cache_dir``: the ``cache_dir`` argument, ``$TUCKERSEG_CACHE_DIR``, a
``tuckerseg_cache`` folder beside the weights when writable, else under ``~/.cache/tuckerseg``).

The ``budget`` policy's layer sensitivities (``compression.sensitivity``) do not depend on the
ratio: they are kept per model in ``layer_sensitivities.json`` beside the entries, so that a new
ratio of a model (the quality target tries several) does not probe them again.

Concurrency: a per-entry file lock serialises builders, and entries are written to a temporary
folder and renamed into place, so two runs at once never see or leave a half-written entry. An
entry whose source weights changed, or that fails to load (damaged), is rebuilt.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Optional, Tuple, Union

from torch import nn

from TuckerSegLib.compression import ALGORITHM_VERSION
from TuckerSegLib.compression.compress import compress_model, default_data
from TuckerSegLib.compression.probe_data import CompressionData
from TuckerSegLib.errors import ModelError
from TuckerSegLib.models.compressed_file import load_compressed, read_manifest, save_compressed
from TuckerSegLib.models.nnunet_folder import DEFAULT_CHECKPOINT, NnUNetModel, load_model_folder
from TuckerSegLib.network.cost import count_cost
from TuckerSegLib.progress import NullProgress, Progress
from TuckerSegLib.specs import CompressionSpec
from TuckerSegLib.storage import folder_digest, merge_json, model_cache_dir, read_json

SENSITIVITIES_FILE = "layer_sensitivities.json"


def entry_name(model_folder: Union[str, Path], fold, checkpoint_name: str, spec: CompressionSpec) -> str:
    """The entry's folder name: the model (a shared cache folder holds several: without it the five
    models of ``total`` overwrote each other's entries, and every run compressed again) and
    everything that changes the compressed network."""
    stem = Path(checkpoint_name).stem
    floor = "" if spec.rank_min is None else f"-min{spec.rank_min}"
    refine = "" if spec.refine or spec.policy != "budget" else "-norefine"
    return (f"{folder_digest(model_folder)}-fold{fold}-{stem}-{spec.policy}-r{spec.ratio:.4f}-{spec.method}"
            f"-m{spec.rank_multiple}{floor}{refine}-v{ALGORITHM_VERSION}")


def original_report(model: NnUNetModel) -> dict:
    """The manifest-like summary of an uncompressed model (ratio 1.0)."""
    cost = count_cost(model.network, (1, model.num_input_channels, *model.patch_size)).as_dict()
    return {"compression": {"policy": "none", "ratio": 1.0},
            "report": {"original": cost, "compressed": cost, "params_ratio": 1.0, "macs_ratio": 1.0,
                       "ratio": 1.0, "policy": "none", "layers": []},
            "source": {"folder": str(model.folder), "fold": model.fold,
                       "trainer_name": model.trainer_name, "configuration": model.configuration}}


def get_compressed_model(model_folder: Union[str, Path], spec: CompressionSpec, fold: Union[int, str] = 0,
                         cache_dir: Optional[Union[str, Path]] = None,
                         checkpoint_name: str = DEFAULT_CHECKPOINT,
                         progress: Optional[Progress] = None) -> NnUNetModel:
    """The model of ``model_folder`` compressed as ``spec`` asks; from the cache when present.

    Ratio 1.0 returns the original model, untouched and uncached; its ``manifest`` holds the
    original cost so that callers can report it the same way.
    """
    from filelock import FileLock

    progress = progress or NullProgress()
    model_folder = Path(model_folder)
    if spec.is_original:
        model = load_model_folder(model_folder, fold, checkpoint_name)
        model.manifest = original_report(model)
        return model
    root = model_cache_dir(model_folder, cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    entry = root / entry_name(model_folder, fold, checkpoint_name, spec)
    ckpt = model_folder / f"fold_{fold}" / checkpoint_name
    with FileLock(str(entry) + ".lock"):
        cached = _load_valid(entry, ckpt, progress)
        if cached is not None:
            return cached
        progress.log(f"compressing {model_folder.parent.name or model_folder.name} fold {fold}: "
                     f"{spec.policy} policy, ratio {spec.ratio:g} (once; cached in {entry})")
        model = load_model_folder(model_folder, fold, checkpoint_name)
        data = default_data(model, spec)
        store, key = root / SENSITIVITIES_FILE, _sensitivity_key(model, fold, checkpoint_name, data)
        if key is not None:
            data.sensitivities = read_json(store).get(key)
        result = compress_model(model, spec, data, progress=progress, inplace=True)
        if key is not None and data.sensitivities:
            merge_json(store, {key: data.sensitivities})
        save_compressed(entry, model, result)
    return load_compressed(entry, verify_hash=False)


def _sensitivity_key(model: NnUNetModel, fold, checkpoint_name: str, data: CompressionData) -> Optional[str]:
    """The key of this model's layer sensitivities (weights, probe, algorithm), None without a
    probe: probing them is most of a compression's time, and every ratio needs the same ones."""
    if data.probe is None:
        return None
    probe = hashlib.sha1(data.probe.numpy().tobytes()).hexdigest()[:16]
    return f"fold{fold}|{Path(checkpoint_name).stem}|{model.source_fingerprint}|probe{probe}|v{ALGORITHM_VERSION}"


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


def get_compressed_network(model_folder: Union[str, Path], spec: CompressionSpec, fold: Union[int, str] = 0,
                           cache_dir: Optional[Union[str, Path]] = None,
                           progress: Optional[Progress] = None) -> Tuple[nn.Module, dict]:
    """``(network, manifest)`` of ``get_compressed_model`` (for callers that run a bare network)."""
    model = get_compressed_model(model_folder, spec, fold, cache_dir, progress=progress)
    return model.network, model.manifest or {}
