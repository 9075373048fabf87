"""Measure a model's quality curve in a detached, low-priority process, for later runs.

Why: a quality target's first run on a model measures its quality curve: minutes on a CPU (about
4.5 minutes for the full-width 3 mm network on 2 cores), against half a minute for stock
TotalSegmentator. With ``CompressionSpec.search == "background"`` (the command line's and the
Slicer module's default) that run does not wait: it runs the original network, as stock does
(agreement 1.0), and starts this module in its own session at the lowest CPU priority; runs that
start once the curve is measured get the network it chooses. One search per model is started at
a time (a file lock per model; a second run meanwhile starts none), and the searches of several
models (the five parts of ``total``) run one after the other (a lock in ``storage.cache_root``),
never together: each holds a network and its validation data in memory. The curve is saved point
by point, so a search that is stopped resumes where it was in the next one.

    python -m TuckerSegLib.pipeline.background_search REQUEST.json
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional, Sequence, Union

from TuckerSegLib.specs import CompressionSpec
from TuckerSegLib.storage import cache_root, model_cache_dir

LOG_FILE = "quality_search.log"
QUEUE_LOCK = "quality_search.queue.lock"
NICE = 19  # the lowest priority: the user's own runs come first


def lock_path(model_folder: Union[str, Path], cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """The model's search lock (named after the model: a shared cache folder holds several)."""
    digest = hashlib.sha1(str(Path(model_folder).resolve()).encode()).hexdigest()[:10]
    return model_cache_dir(model_folder, cache_dir) / f"quality_search-{digest}.lock"


def running(model_folder: Union[str, Path], cache_dir: Optional[Union[str, Path]] = None) -> bool:
    """True while a search of this model's curve holds its lock."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_path(model_folder, cache_dir)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def start(model_folder: Union[str, Path], spec: CompressionSpec, fold: Union[int, str], checkpoint_name: str,
          device: str, cache_dir: Optional[Union[str, Path]], precisions: Sequence[str]) -> Path:
    """Start the search in a detached process (none when one runs already); its log's path."""
    cache = model_cache_dir(model_folder, cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    log = cache / LOG_FILE
    if running(model_folder, cache_dir):
        return log
    request = {"model_folder": str(Path(model_folder).resolve()), "spec": asdict(replace(spec, search="now")),
               "fold": fold, "checkpoint_name": checkpoint_name, "device": str(device),
               "cache_dir": None if cache_dir is None else str(cache_dir), "precisions": list(precisions)}
    path = cache / f".quality_search-{os.getpid()}-{time.time_ns()}.json"
    path.write_text(json.dumps(request))
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
    request = json.loads(path.read_text())
    path.unlink(missing_ok=True)
    try:
        os.nice(NICE)
    except OSError:
        pass
    progress = JsonProgress()
    spec = CompressionSpec(**{**request["spec"], "validate_on": tuple(request["spec"]["validate_on"])})
    lock = FileLock(str(lock_path(request["model_folder"], request["cache_dir"])))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        progress.log("another search of this model's quality curve is running")
        return 0
    try:
        root = cache_root()
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / QUEUE_LOCK)):  # one search at a time on this machine
            return _search(request, spec, progress)
    except TuckerSegError as exc:
        progress.error(str(exc))
        return 1
    finally:
        lock.release()


def _search(request: dict, spec: CompressionSpec, progress) -> int:
    from TuckerSegLib.pipeline.quality_target import choose_for_target

    t0 = time.perf_counter()
    progress.log(f"quality target {spec.min_agreement:g}: measuring the curve of {request['model_folder']}")
    choice = choose_for_target(request["model_folder"], spec, request["fold"], request["checkpoint_name"],
                               request["device"], request["cache_dir"], progress,
                               precisions=tuple(request["precisions"]))
    progress.log(f"done in {time.perf_counter() - t0:.0f} s: {choice.summary(spec.min_agreement)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
