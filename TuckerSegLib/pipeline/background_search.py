"""Measure a model's quality curve in a detached, low-priority process, for later runs.

Why: a quality target's first run on a model measures its quality curve: minutes on a CPU (about
4.5 minutes for the full-width 3 mm network on 2 cores), against half a minute for stock
TotalSegmentator. With ``CompressionSpec.search == "background"`` (the command line's and the
Slicer module's default) that run does not wait: it runs the original network, as stock does
(agreement 1.0), and when it has ended starts this module in its own session at the lowest CPU
priority. The search measures the curve, then prepares what the chosen network's run needs (its
engine files, e.g. the bf16 OpenVINO model and its agreement check, in the model's cache), so the
next run neither measures nor converts. One search per model is started at a time (a file lock
per model; a second run meanwhile starts none), and the searches of several models (the five
parts of ``total``) run one after the other (a lock in ``storage.cache_root``), never together:
each holds a network and its validation data in memory. The curve is saved point by point, so a
search that is stopped resumes where it was in the next one.

    python -m TuckerSegLib.pipeline.background_search REQUEST.json
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

from TuckerSegLib.specs import CompressionSpec, RunSpec
from TuckerSegLib.storage import cache_root, folder_digest, model_cache_dir

LOG_FILE = "quality_search.log"
QUEUE_LOCK = "quality_search.queue.lock"
NICE = 19  # the lowest priority: the user's own runs come first


@dataclass(frozen=True)
class SearchRequest:
    """One model's curve to measure, and how the run that asked for it runs networks."""

    model_folder: Path
    spec: CompressionSpec
    fold: Union[int, str]
    checkpoint_name: str
    device: str
    cache_dir: Optional[Path]
    precisions: Tuple[str, ...]
    run: RunSpec

    def as_dict(self) -> dict:
        return {"model_folder": str(Path(self.model_folder).resolve()), "spec": asdict(replace(self.spec, search="now")),
                "fold": self.fold, "checkpoint_name": self.checkpoint_name, "device": self.device,
                "cache_dir": None if self.cache_dir is None else str(self.cache_dir),
                "precisions": list(self.precisions), "run": self.run.as_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "SearchRequest":
        spec = CompressionSpec(**{**d["spec"], "validate_on": tuple(d["spec"]["validate_on"])})
        run = RunSpec(**{**d["run"], "int8_calibration": tuple(d["run"]["int8_calibration"])})
        return cls(Path(d["model_folder"]), spec, d["fold"], d["checkpoint_name"], d["device"],
                   None if d["cache_dir"] is None else Path(d["cache_dir"]), tuple(d["precisions"]), run)


def log_path(model_folder: Union[str, Path], cache_dir: Optional[Union[str, Path]] = None) -> Path:
    return model_cache_dir(model_folder, cache_dir) / LOG_FILE


def lock_path(model_folder: Union[str, Path], cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """The model's search lock (named after the model: a shared cache folder holds several)."""
    return _lock_in(model_cache_dir(model_folder, cache_dir), model_folder)


def _lock_in(cache: Path, model_folder: Union[str, Path]) -> Path:
    return cache / _lock_name(model_folder)


def _lock_name(model_folder: Union[str, Path]) -> str:
    return f"quality_search-{folder_digest(model_folder)}.lock"


def running(model_folder: Union[str, Path], cache_dirs: Sequence[Union[str, Path]]) -> bool:
    """True while a search of ``model_folder`` holds its lock in one of ``cache_dirs``.

    Read-only, for the Slicer panel's read-out (``estimate.quality_readout``): it creates no
    folder and no lock file, and a search that died has released its lock."""
    name = _lock_name(model_folder)
    for cache in cache_dirs:
        lock = Path(cache) / name
        if lock.is_file() and _held(lock):
            return True
    return False


def any_running(cache: Union[str, Path]) -> bool:
    """True while a search of any model holds its lock in ``cache`` (queued searches hold theirs
    too: ``total`` starts five, which run one after the other)."""
    return any(_held(lock) for lock in Path(cache).glob("quality_search-*.lock"))


def _held(lock_file: Path) -> bool:
    """True while a search holds ``lock_file``."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_file))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def start(request: SearchRequest) -> Path:
    """Start the search in a detached process (none when one runs already); its log's path."""
    cache = model_cache_dir(request.model_folder, request.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    log = cache / LOG_FILE
    if _held(_lock_in(cache, request.model_folder)):
        return log
    path = cache / f".quality_search-{os.getpid()}-{time.time_ns()}.json"
    path.write_text(json.dumps(request.as_dict()))
    with open(log, "a") as out:
        subprocess.Popen([sys.executable, "-m", "TuckerSegLib.pipeline.background_search", str(path)],
                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p)))
    return log


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one search request (its log: JSON progress lines, ``progress`` protocol)."""
    from filelock import FileLock, Timeout

    from TuckerSegLib.errors import TuckerSegError
    from TuckerSegLib.progress import JsonProgress

    path = Path((argv or sys.argv[1:])[0])
    request = SearchRequest.from_dict(json.loads(path.read_text()))
    path.unlink(missing_ok=True)
    try:
        os.nice(NICE)
    except OSError:
        pass
    progress = JsonProgress()
    lock = FileLock(str(lock_path(request.model_folder, request.cache_dir)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        progress.log("another search of this model's quality curve is running")
        return 0
    try:
        root = cache_root()
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / QUEUE_LOCK)):  # one search at a time on this machine
            search(request, progress)
        return 0
    except TuckerSegError as exc:
        progress.error(str(exc))
        return 1
    finally:
        lock.release()


def search(request: SearchRequest, progress) -> None:
    """Measure the curve, then prepare the chosen network's engine as the next run will ask for it."""
    from TuckerSegLib.pipeline.predictor_hook import how_choice_runs, prepare_for_run
    from TuckerSegLib.pipeline.quality_target import choose_for_target, original_on_fast_engine

    t0 = time.perf_counter()
    target = request.spec.min_agreement
    progress.log(f"quality target {target:g}: measuring the curve of {request.model_folder}")
    choice = choose_for_target(request.model_folder, request.spec, request.fold, request.checkpoint_name,
                               request.device, request.cache_dir, progress, precisions=request.precisions,
                               fast_original=original_on_fast_engine(request.run, request.device))
    measured = time.perf_counter() - t0
    spec, given, run = how_choice_runs(choice, request.run)
    progress.stage("prepare", "preparing the chosen network for the next run")
    import torch

    prepare_for_run(request.model_folder, [request.fold], request.checkpoint_name, spec, run,
                    torch.device(request.device), request.cache_dir, given, progress)
    progress.log(f"done in {time.perf_counter() - t0:.0f} s (curve {measured:.0f} s, the chosen network prepared "
                 f"for the next run): {choice.summary(target)}")


if __name__ == "__main__":
    sys.exit(main())
