"""Build every network a batch needs once, before any worker starts.

Why: with N workers starting at once, N processes would otherwise find the compression cache
empty and decompose the same network (the cache's file lock serialises them, but the others wait
and then all load). Doing it first, in one Ray task, also downloads missing weights once and turns
"weights missing" into one batch-level error instead of one failure per case.
With a quality target this is where each model's quality curve is measured and its network
chosen (``pipeline.quality_target``), so that workers only load what was chosen.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from TuckerSegLib.cohort.options import SegmentOptions


def needed_models(options: SegmentOptions) -> Dict[int, str]:
    """``{dataset id: trainer}`` a case will run (``segment``'s own choice of models)."""
    from TuckerSegLib.pipeline.segment import models_needed

    return models_needed(options.task, options.mode, options.roi_subset, body_seg=options.body_seg)


def build_networks(options: SegmentOptions) -> List[Dict[str, Any]]:
    """Make sure weights and compressed networks exist (cached on disk); say what was built."""
    import time

    from TuckerSegLib.compression.cache import get_compressed_model
    from TuckerSegLib.devices import torch_device
    from TuckerSegLib.models.compressed_file import read_manifest
    from TuckerSegLib.models.totalseg import ensure_weights
    from TuckerSegLib.pipeline.quality_target import choose_for_target

    needed = needed_models(options)
    folders = ensure_weights(list(needed), allow_download=options.allow_download, trainers=needed)
    given = set()
    for folder in options.compressed_models:  # finetuned folders replace the models they came from
        source = read_manifest(folder).get("source", {}).get("folder")
        if source:
            given.add(str(Path(source).resolve()))
    built = []
    for dataset_id, folder in zip(needed, folders):
        t0 = time.perf_counter()
        entry = {"dataset_id": dataset_id, "folder": str(folder), "compressed": None}
        spec = options.compression
        if not spec.is_original and str(Path(folder).resolve()) not in given:
            if spec.is_target:
                choice = choose_for_target(folder, spec, 0, device=torch_device(options.run.device),
                                           cache_dir=options.cache_dir)
                entry["target"] = choice.summary(spec.min_agreement)
                spec = choice.spec
            if not spec.is_original:
                model = get_compressed_model(folder, spec, 0, options.cache_dir)
                report = (model.manifest or {}).get("report", {})
                entry["compressed"] = {"macs_ratio": report.get("macs_ratio"),
                                       "params_ratio": report.get("params_ratio")}
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        built.append(entry)
    return built
