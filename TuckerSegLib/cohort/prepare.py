"""Build every network a batch needs once, before any worker starts.

Why: with N workers starting at once, N processes would otherwise find the compression cache
empty and decompose the same network (the cache's file lock serialises them, but the others wait
and then all load). Doing it first, in one Ray task, also downloads missing weights once and turns
"weights missing" into one batch-level error instead of one failure per case.

MERGE NOTE: ``build_networks`` is the only place that knows how the pipeline finds and compresses
models (it mirrors ``segment``'s choice of models); adapt it when ``compression/`` and the
predictor hook are refactored (issue 17).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from TuckerSegLib.cohort.options import SegmentOptions


def needed_models(options: SegmentOptions) -> Dict[int, str]:
    """``{dataset id: trainer}`` a case will run: the task's models plus cropping/body models."""
    from TuckerSegLib.models.totalseg import task_models

    models = task_models(options.task, fast=options.fast, fastest=options.fastest)
    needed: Dict[int, str] = {}
    if options.roi_subset and options.task.startswith("total") and not options.task.endswith("_mr"):
        needed[298] = "nnUNetTrainer_4000epochs_NoMirroring"  # segment's cropping model
    elif options.body_seg:
        needed[300] = "nnUNetTrainer"
    for i in models.dataset_ids:
        needed[i] = models.trainer
    return needed


def build_networks(options: SegmentOptions) -> List[Dict[str, Any]]:
    """Make sure weights and compressed networks exist (cached on disk); say what was built."""
    import time

    from TuckerSegLib.models.cache import get_compressed_model
    from TuckerSegLib.models.compressed_file import read_manifest
    from TuckerSegLib.models.totalseg import ensure_weights

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
        if options.compression.ratio < 1.0 and str(Path(folder).resolve()) not in given:
            model = get_compressed_model(folder, fold=0, policy=options.compression.policy,
                                         ratio=options.compression.ratio, cache_dir=options.cache_dir)
            report = (model.manifest or {}).get("report", {})
            entry["compressed"] = {"macs_ratio": report.get("macs_ratio"),
                                   "params_ratio": report.get("params_ratio")}
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        built.append(entry)
    return built
