"""Cohort scale: segment many CTs on Ray, resumably (``tuckerseg batch``, ``TuckerSegLib.batch()``).

The package is not called ``batch`` because ``TuckerSegLib.batch`` is the API function.

One file per job: ``cases`` (inputs -> cases), ``options`` (what and where), ``prepare`` (build
networks once), ``worker`` (the Ray actor), ``manifest`` (what is done), ``table`` (results),
``runner`` (the driver loop). Ray is imported only when a batch runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Union

from TuckerSegLib.cohort.cases import Case, collect_cases
from TuckerSegLib.cohort.options import ClusterOptions, SegmentOptions
from TuckerSegLib.progress import Progress
from TuckerSegLib.specs import RunSpec, compression_spec

__all__ = ["batch", "Case", "collect_cases", "ClusterOptions", "SegmentOptions"]


def batch(inputs: Union[str, Path, Iterable[Union[str, Path]]], outdir: Union[str, Path],
          ratio: Optional[float] = None, min_agreement: Optional[float] = None, policy: str = "budget", task: str = "total", fast: bool = False,
          fastest: bool = False, roi_subset: Optional[Sequence[str]] = None, ml: bool = True,
          statistics: bool = False, body_seg: bool = False, device: str = "auto",
          engine: str = "auto", precision: str = "auto", layer_forms: str = "auto",
          cache_dir: Optional[Union[str, Path]] = None, allow_download: bool = True,
          compressed_models: Sequence[Union[str, Path]] = (), validate_on: Sequence[Union[str, Path]] = (),
          address: Optional[str] = None, workers: Optional[int] = None,
          cpus_per_worker: float = 1.0, gpus_per_worker: Optional[float] = None,
          memory_per_worker_gb: Optional[float] = None, max_retries: int = 2,
          num_cpus: Optional[int] = None, num_gpus: Optional[int] = None,
          object_store_mb: int = 256, path_column: Optional[str] = None,
          id_column: Optional[str] = None, progress: Optional[Progress] = None,
          callback: Optional[Callable[[Dict[str, Any]], None]] = None):
    """Segment every case of ``inputs`` into ``outdir/cases/<case_id>/``; return the results table.

    ``inputs``: NIfTI files, DICOM series folders, folders of them, globs, or CSV files with a
    path column (and optionally a case id column). The segmentation options are ``segment``'s.
    ``address`` None runs a local Ray instance; "auto" or "HOST:PORT" joins a cluster (inputs and
    ``outdir`` must then be on a filesystem every node sees). A rerun skips cases already done.
    Returns a pandas DataFrame (one row per case; ``df.attrs["summary"]`` holds the summary), also
    written to ``outdir/results.csv`` and ``results.parquet``. Raises ``TuckerSegError`` (one line)
    on unusable input or options; ``Cancelled`` when interrupted (rerun to continue).
    """
    from TuckerSegLib.cohort.runner import run_batch

    options = SegmentOptions(
        compression=compression_spec(ratio, min_agreement, policy, validate_on),
        run=RunSpec(engine=engine, precision=precision, layer_forms=layer_forms, device=device),
        task=task, fast=fast, fastest=fastest, roi_subset=tuple(roi_subset) if roi_subset else None,
        ml=ml, statistics=statistics, body_seg=body_seg,
        cache_dir=str(cache_dir) if cache_dir else None, allow_download=allow_download,
        compressed_models=tuple(str(p) for p in compressed_models))
    cluster = ClusterOptions(address=address, workers=workers, cpus_per_worker=cpus_per_worker,
                             gpus_per_worker=gpus_per_worker, memory_per_worker_gb=memory_per_worker_gb,
                             max_retries=max_retries, num_cpus=num_cpus, num_gpus=num_gpus,
                             object_store_mb=object_store_mb)
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    outdir = Path(outdir).expanduser().absolute()
    cases = collect_cases(inputs, skip=[outdir], path_column=path_column, id_column=id_column)
    return run_batch(cases, outdir, options, cluster, progress=progress, callback=callback)
