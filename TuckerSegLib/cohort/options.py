"""What a batch runs (segmentation options) and where (Ray options), validated once.

Why: the driver, the model-building task and every worker must run exactly the same settings, and
a rerun must know whether the finished cases in an output folder were made with them. Both option
sets are frozen dataclasses built on ``TuckerSegLib.specs`` (no choice list is defined here).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Tuple

from TuckerSegLib.errors import InputError
from TuckerSegLib.specs import CompressionSpec, RunSpec, check_mode, compression_spec


@dataclass(frozen=True)
class SegmentOptions:
    """The ``segment`` options every case of a batch runs with."""

    compression: CompressionSpec = field(default_factory=compression_spec)
    run: RunSpec = field(default_factory=RunSpec)
    task: str = "total"
    fast: bool = False
    fastest: bool = False
    roi_subset: Optional[Tuple[str, ...]] = None
    ml: bool = True
    statistics: bool = False
    body_seg: bool = False
    cache_dir: Optional[str] = None
    allow_download: bool = True
    compressed_models: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_mode(self.fast, self.fastest)
        if not self.task or not isinstance(self.task, str):
            raise InputError(f"task must be a TotalSegmentator task name, got {self.task!r}")
        if self.roi_subset is not None:
            object.__setattr__(self, "roi_subset", tuple(self.roi_subset) or None)
        object.__setattr__(self, "compressed_models", tuple(str(p) for p in self.compressed_models))

    @property
    def mode(self) -> str:
        return check_mode(self.fast, self.fastest)

    def settings(self) -> Dict[str, Any]:
        """The options that change a case's output: a rerun must match them to skip done cases.

        Device and layer forms are left out: they change speed, not the segmentation (layer forms
        are exact equivalents), so a batch may be continued on other hardware.
        """
        return {"task": self.task, "mode": self.mode, "roi_subset": list(self.roi_subset or []),
                "ml": self.ml, "statistics": self.statistics, "body_seg": self.body_seg,
                "ratio": None if self.compression.is_target else self.compression.ratio,
                "min_agreement": self.compression.min_agreement,
                "validate_on": list(self.compression.validate_on), "policy": self.compression.policy,
                "engine": self.run.engine, "precision": self.run.precision,
                "compressed_models": list(self.compressed_models)}

    @property
    def fills_engine_caches(self) -> bool:
        """Whether a worker's first case writes engine caches (OpenVINO IR, layer-form timings,
        engine choice, INT8) the others should find ready; the original network on PyTorch writes
        none, so its workers need not wait for one another."""
        torch_original = (self.compression.is_original and self.run.engine in ("auto", "torch")
                          and self.run.precision != "int8" and not self.compressed_models)
        return not torch_original

    def segment_kwargs(self) -> Dict[str, Any]:
        """Arguments of ``TuckerSegLib.pipeline.segment.segment`` (input/output aside)."""
        return dict(compression=self.compression, run=self.run, task=self.task, mode=self.mode,
                    roi_subset=list(self.roi_subset) if self.roi_subset else None, ml=self.ml,
                    cache_dir=self.cache_dir, allow_download=self.allow_download, quiet=True,
                    compressed_models=list(self.compressed_models),
                    statistics=self.statistics, body_seg=self.body_seg)

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ClusterOptions:
    """Where and how wide a batch runs on Ray.

    ``address`` None starts a local Ray instance (``num_cpus``/``num_gpus`` of this machine by
    default); otherwise joins that cluster ("auto", "HOST:6379" or "ray://HOST:10001").
    ``workers`` None: as many as the cluster's CPUs (or GPUs) allow. A worker holds
    ``cpus_per_worker`` cores (its threads are pinned to them) and ``gpus_per_worker`` of a GPU
    (fractions share one GPU). A case whose worker dies is retried ``max_retries`` times.
    """

    address: Optional[str] = None
    workers: Optional[int] = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: Optional[float] = None
    memory_per_worker_gb: Optional[float] = None
    max_retries: int = 2
    num_cpus: Optional[int] = None
    num_gpus: Optional[int] = None
    object_store_mb: int = 256
    warmup: bool = True

    def __post_init__(self) -> None:
        if self.workers is not None and int(self.workers) < 1:
            raise InputError(f"workers must be at least 1, got {self.workers}")
        if not (float(self.cpus_per_worker) > 0):
            raise InputError(f"cpus per worker must be positive, got {self.cpus_per_worker}")
        if self.gpus_per_worker is not None and not (0 <= float(self.gpus_per_worker) <= 8):
            raise InputError(f"gpus per worker must be between 0 and 8 (fractions share a GPU), "
                             f"got {self.gpus_per_worker}")
        if self.memory_per_worker_gb is not None and not float(self.memory_per_worker_gb) > 0:
            raise InputError(f"memory per worker must be positive, got {self.memory_per_worker_gb}")
        if int(self.max_retries) < 0:
            raise InputError(f"max retries must be 0 or more, got {self.max_retries}")
        if int(self.object_store_mb) < 80:
            raise InputError(f"Ray's object store needs at least 80 MB, got {self.object_store_mb}")
        if self.num_cpus is not None and int(self.num_cpus) < 1:
            raise InputError(f"num_cpus must be at least 1, got {self.num_cpus}")
        if self.address is not None and self.num_cpus is not None:
            raise InputError("--num-cpus sizes a local Ray instance; a cluster (--address) has its own")
