"""Run a batch on Ray: start or join Ray, build networks once, keep workers busy, record results.

Why: the driver is the only writer of the manifest and the table, so the order of events is the
same whether the workers are two processes on a laptop or a hundred on a cluster: a case is
finished when its row is in the manifest; a worker that dies puts its case back in the queue
(up to ``max_retries`` times) and is replaced; Ctrl-C stops the workers and leaves the manifest
as it was after the last finished case.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional

from TuckerSegLib.cohort.cases import Case
from TuckerSegLib.cohort.manifest import CASES_DIR, LOGS_DIR, Manifest, check_settings
from TuckerSegLib.cohort.options import ClusterOptions, SegmentOptions
from TuckerSegLib.cohort.table import build_table, summarize, summary_line, write_table
from TuckerSegLib.cohort.worker import engines_ready_marker
from TuckerSegLib.errors import Cancelled, InputError, TuckerSegError
from TuckerSegLib.progress import BarProgress, NullProgress, Progress

# Environment the workers need to find the same weights and cache as the driver (only if set).
FORWARDED_ENV = ("TOTALSEG_HOME_DIR", "TOTALSEG_WEIGHTS_PATH", "TUCKERSEG_CACHE_DIR",
                 "nnUNet_compile", "TUCKERSEG_DEBUG")
MB = 1024 * 1024


def import_ray():
    try:
        import ray
    except ImportError:
        raise InputError("tuckerseg batch needs Ray: pip install 'tuckerseg[batch]'") from None
    return ray


def connect(cluster: ClusterOptions) -> bool:
    """Start a local Ray instance (loopback only) or join ``cluster.address``; True if started here."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray would otherwise report usage online
    if not cluster.address:
        # Ray's own switch for single-machine instances: every Ray process it starts takes the
        # loopback address as the node address (set before Ray's processes import it).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = import_ray()
    if ray.is_initialized():
        return False
    try:
        if cluster.address:
            ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
        else:
            ray.init(num_cpus=cluster.num_cpus, num_gpus=cluster.num_gpus,
                     object_store_memory=int(cluster.object_store_mb) * MB,
                     include_dashboard=False, _node_ip_address="127.0.0.1",
                     log_to_driver=False, logging_level="WARNING")
    except Exception as exc:
        where = f"the Ray cluster at {cluster.address}" if cluster.address else "a local Ray instance"
        raise InputError(f"could not start or join {where} ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]})") from None
    return True


class BatchProgress:
    """One bar for the batch (cases done, cases/hour, time left), or events for JSON consumers."""

    def __init__(self, sink: Progress, total: int, already: int):
        self.sink, self.total, self.already = sink, total, already
        self.done = self.failed = 0
        self.t0 = time.perf_counter()
        self.bar = None
        if isinstance(sink, BarProgress):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, file=sys.stderr, unit="case", desc="batch", dynamic_ncols=True,
                            bar_format="{desc}: {n}/{total} cases |{bar}| {elapsed}<{remaining} {postfix}")

    def rate(self) -> float:
        hours = (time.perf_counter() - self.t0) / 3600.0
        return (self.done + self.failed) / hours if hours > 0 else 0.0

    def message(self) -> str:
        return (f"{self.done + self.failed}/{self.total} cases ({self.failed} failed, "
                f"{self.already} done earlier), {self.rate():.1f} cases/h")

    def case(self, row: Dict[str, Any]) -> None:
        if row.get("status") == "done":
            self.done += 1
        else:
            self.failed += 1
            self.log(f"case {row['case_id']} failed: {row.get('error')}")
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.rate():.1f} cases/h, {self.failed} failed")
            self.bar.update(1)
        else:
            self.sink.update((self.done + self.failed) / max(1, self.total), self.message(), stage="batch")

    def log(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            self.sink.log(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _remote_build(options: SegmentOptions) -> Dict[str, Any]:
    """Ray task body: build networks; errors come back as values (one line, with their kind)."""
    from TuckerSegLib.cohort.prepare import build_networks

    try:
        return {"built": build_networks(options)}
    except TuckerSegError as exc:
        return {"error": str(exc), "exit_code": exc.exit_code}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}", "exit_code": 1}


def _plan(ray, cluster: ClusterOptions, options: SegmentOptions, n_cases: int):
    """Workers, CPUs and GPUs per worker, and the device the workers run on."""
    resources = ray.cluster_resources()
    total_cpus = float(resources.get("CPU", 1))
    total_gpus = float(resources.get("GPU", 0))
    device = options.run.device
    gpus = cluster.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if (device.startswith("gpu") or (device == "auto" and total_gpus > 0)) else 0.0
    if gpus > 0 and total_gpus <= 0:
        raise InputError("GPU workers asked for, but the Ray cluster has no GPU")
    if gpus > 0 and device == "auto":
        device = "gpu"
    if gpus == 0 and device == "auto":
        device = "cpu"
    cpus = float(cluster.cpus_per_worker)
    if cpus > total_cpus:
        raise InputError(f"a worker needs {cpus:g} CPUs, but the Ray cluster has {total_cpus:g}")
    fit = int(total_cpus // cpus)
    if gpus > 0:
        fit = min(fit, int(total_gpus // gpus + 1e-9))
    workers = cluster.workers or max(1, fit)
    return max(1, min(workers, n_cases)), cpus, gpus, device


def _clean_stale(outdir: Path) -> None:
    """Remove temporary case folders left by workers that died in an earlier run."""
    cases = outdir / CASES_DIR
    if cases.is_dir():
        for p in cases.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def run_batch(cases: List[Case], outdir: Path, options: SegmentOptions, cluster: ClusterOptions,
              progress: Optional[Progress] = None,
              callback: Optional[Callable[[Dict[str, Any]], None]] = None):
    """Segment ``cases`` into ``outdir``; return the results table (pandas DataFrame).

    ``callback(event)`` sees driver events: ``{"type": "worker", "pid", ...}`` when a worker
    starts, ``{"type": "dispatch", "case_id", "attempt", "pid"}``, ``{"type": "case", "row"}``
    after a case is recorded, ``{"type": "worker_died", ...}``. A ``KeyboardInterrupt`` raised by
    it acts as Ctrl-C.
    """
    from filelock import FileLock, Timeout

    progress = progress or NullProgress()
    emit = callback or (lambda event: None)
    outdir = Path(outdir).expanduser().absolute()
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / CASES_DIR).mkdir(exist_ok=True)
    (outdir / LOGS_DIR).mkdir(exist_ok=True)
    lock = FileLock(str(outdir / ".batch.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise InputError(f"another tuckerseg batch is writing to {outdir}") from None
    t_start = time.perf_counter()
    started_ray = False
    interrupted = False
    processed = 0
    try:
        check_settings(outdir, options.settings())
        manifest = Manifest(outdir)
        todo = [c for c in cases if not manifest.is_done(c)]
        skipped = len(cases) - len(todo)
        _clean_stale(outdir)
        if todo:
            progress.log(f"batch: {len(cases)} case(s), {skipped} already done, {len(todo)} to do")
            ray = import_ray()
            started_ray = connect(cluster)
            try:
                processed = _schedule(ray, todo, outdir, options, cluster, manifest, progress, emit,
                                      skipped)
            except KeyboardInterrupt:
                interrupted = True
            except _Interrupted as stop:
                interrupted, processed = True, stop.processed
            _clean_stale(outdir)  # every worker is stopped now
        rows = manifest.rows(cases)
        df = build_table(rows)
        files = write_table(df, outdir)
        summary = summarize(df, time.perf_counter() - t_start, processed, skipped, interrupted)
        summary["tables"] = [str(f) for f in files]
        from TuckerSegLib.cohort.manifest import write_json_atomic

        write_json_atomic(outdir / "summary.json", summary)
        df.attrs["summary"] = summary
        progress.log(f"batch: {summary_line(summary)}; results in {files[0]}")
        if interrupted:
            raise Cancelled(f"interrupted: {summary['done']} of {summary['cases']} case(s) done; "
                            f"rerun the same command to continue")
        return df
    finally:
        if started_ray:
            import ray

            ray.shutdown()
        lock.release()


class _Interrupted(Exception):
    def __init__(self, processed: int):
        super().__init__("interrupted")
        self.processed = processed


def _schedule(ray, todo: List[Case], outdir: Path, options: SegmentOptions, cluster: ClusterOptions,
              manifest: Manifest, progress: Progress, emit, skipped: int) -> int:
    """The driver loop; returns how many cases were recorded (done or failed)."""
    from ray.exceptions import RayActorError, WorkerCrashedError

    from TuckerSegLib.cohort.worker import SegmentWorker

    n_workers, cpus, gpus, device = _plan(ray, cluster, options, len(todo))
    if device != options.run.device:
        from dataclasses import replace

        options = replace(options, run=replace(options.run, device=device))
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    runtime_env = {"env_vars": env} if env else None

    # 1. networks, once, before any worker starts
    spec = options.compression
    chosen = (f"quality target {spec.min_agreement:g}" if spec.is_target else f"ratio {spec.ratio:g}")
    progress.log(f"batch: building networks once ({chosen}, {spec.policy})")
    build = ray.remote(num_cpus=cpus, num_gpus=0, max_retries=0)(_remote_build)
    built = ray.get(build.options(runtime_env=runtime_env).remote(options))
    if "error" in built:
        err = TuckerSegError(built["error"])
        err.exit_code = built.get("exit_code", 2)
        raise err
    emit({"type": "built", "models": built["built"]})

    # 2. workers
    actor_opts: Dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus, "max_restarts": 0,
                                  "max_concurrency": 1}
    if cluster.memory_per_worker_gb:
        actor_opts["memory"] = int(float(cluster.memory_per_worker_gb) * 1024 * MB)
    if runtime_env:
        actor_opts["runtime_env"] = runtime_env
    Worker = ray.remote(SegmentWorker)

    def start_worker():
        actor = Worker.options(**actor_opts).remote(options, str(outdir), cpus, pin=gpus == 0)
        return actor, actor.info.remote()

    progress.log(f"batch: {n_workers} worker(s), {cpus:g} CPU(s)"
                 + (f" and {gpus:g} GPU(s)" if gpus else "") + f" each, device {device}")
    starting = dict(start_worker() for _ in range(n_workers))  # actor -> info ref
    info: Dict[Any, Dict[str, Any]] = {}
    idle: List[Any] = []
    restarts_left = max(2, n_workers * (cluster.max_retries + 1))

    pending: Deque[Case] = deque(todo)
    attempts: Dict[str, int] = {}
    in_flight: Dict[Any, tuple] = {}  # ref -> (actor, case)
    warming = cluster.warmup and len(todo) > 1 and n_workers > 1 and options.fills_engine_caches
    engines_ready_marker(outdir).unlink(missing_ok=True)  # this run's first worker writes it
    processed = 0
    bar = BatchProgress(progress, len(todo), skipped)

    def retire(actor, why: str) -> None:
        nonlocal restarts_left
        emit({"type": "worker_died", "pid": info.get(actor, {}).get("pid"), "reason": why})
        info.pop(actor, None)
        try:
            ray.kill(actor, no_restart=True)
        except Exception:
            pass
        if restarts_left > 0 and (pending or in_flight):
            restarts_left -= 1
            a, ref = start_worker()
            starting[a] = ref

    try:
        while pending or in_flight:
            # workers that finished starting become idle
            if starting:
                refs = list(starting.values())
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                for actor in [a for a, r in starting.items() if r in ready]:
                    ref = starting.pop(actor)
                    try:
                        info[actor] = ray.get(ref)
                    except (RayActorError, WorkerCrashedError) as exc:
                        bar.log(f"batch: a worker failed to start ({type(exc).__name__})")
                        retire(actor, "failed to start")
                        continue
                    emit({"type": "worker", **info[actor]})
                    idle.append(actor)
            if not starting and not idle and not in_flight:
                raise TuckerSegError("no worker could be started; see the Ray logs "
                                     "(/tmp/ray/session_latest/logs)")
            # give work to idle workers (one at a time while warming up the caches, until the
            # first worker has its engines prepared)
            if warming and engines_ready_marker(outdir).exists():
                warming = False
            while idle and pending and not (warming and in_flight):
                actor = idle.pop()
                case = pending.popleft()
                attempts[case.case_id] = attempts.get(case.case_id, 0) + 1
                ref = actor.run.remote(case.as_dict(), attempts[case.case_id])
                in_flight[ref] = (actor, case)
                emit({"type": "dispatch", "case_id": case.case_id, "attempt": attempts[case.case_id],
                      "pid": info.get(actor, {}).get("pid")})
            if not in_flight:
                ray.wait(list(starting.values()), num_returns=1, timeout=1.0)
                continue
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            for ref in ready:
                actor, case = in_flight.pop(ref)
                try:
                    row = ray.get(ref)
                except (RayActorError, WorkerCrashedError) as exc:
                    why = f"{type(exc).__name__}"
                    bar.log(f"batch: worker {info.get(actor, {}).get('pid')} died during case "
                            f"{case.case_id} (attempt {attempts[case.case_id]})")
                    retire(actor, why)
                    for stale in (outdir / CASES_DIR).glob(f".tmp-{case.case_id}-*"):
                        shutil.rmtree(stale, ignore_errors=True)  # the dead attempt's partial output
                    if attempts[case.case_id] <= cluster.max_retries:
                        pending.appendleft(case)  # the next idle worker (a live one) takes it
                        continue
                    row = {"case_id": case.case_id, "input": str(case.path), "status": "failed",
                           "attempts": attempts[case.case_id],
                           "error": f"the worker died {attempts[case.case_id]} times while "
                                    f"segmenting this case (out of memory?)"}
                else:
                    idle.append(actor)
                    if row.get("status") == "done":
                        warming = False
                    elif warming and sum(attempts.values()) >= 3:
                        warming = False  # inputs keep failing: stop waiting for a warm cache
                manifest.record(row)
                processed += 1
                bar.case(row)
                emit({"type": "case", "row": row})
    except KeyboardInterrupt:
        raise _Interrupted(processed) from None
    finally:
        bar.close()
        for actor in list(info) + list(starting):
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
    return processed
