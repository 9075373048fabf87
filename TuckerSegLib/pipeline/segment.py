"""Segment a CT with TotalSegmentator's own pipeline and compressed networks: one call.

Why: the command line, the Python API and the Slicer module all need the same thing: validate the
input, make sure the weights are there, run ``totalsegmentator.python_api.totalsegmentator`` with
every nnU-Net predictor swapped to the compressed network (see ``predictor_hook``), write the
result atomically, and report what it cost.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from TuckerSegLib.devices import resolve_device
from TuckerSegLib.errors import InputError, TuckerSegError
from TuckerSegLib.inputs import check_input, check_modality
from TuckerSegLib.pipeline.lazy_imports import defer_training_imports
from TuckerSegLib.pipeline.predictor_hook import compressed_predictors
from TuckerSegLib.progress import JsonProgress, NullProgress, Progress
from TuckerSegLib.specs import INT8_MIN_AGREEMENT, CompressionSpec, RunSpec, check_mode, compression_spec

# before anything imports TotalSegmentator's pipeline (which imports nnU-Net's trainer)
defer_training_imports()


@dataclass
class SegmentResult:
    """What ``segment`` produced and what it cost."""

    output: Path
    labels: Dict[int, str]
    seconds: float
    timings: Dict[str, float]
    params: int
    macs: int
    params_original: int
    macs_original: int
    ratio: float  # the ratio asked for; with a quality target, the fraction of the MACs it kept
    policy: str
    task: str
    mode: str
    device: str
    models: List[Dict[str, Any]] = field(default_factory=list)
    files: List[str] = field(default_factory=list)  # every file written (segmentation, statistics)
    min_agreement: Optional[float] = None  # the quality target asked for, if any
    predicted_agreement: Optional[float] = None  # with stock TotalSegmentator; None: not measured
    agreement_source: str = ""

    def to_event(self) -> dict:
        """The JSON-serialisable ``result`` event payload (the Slicer module reads these keys)."""
        d = asdict(self)
        d["output"] = str(self.output)
        d["labels"] = {str(k): v for k, v in self.labels.items()}
        return d

    def summary(self) -> str:
        """One line for the terminal."""
        chosen = (f"quality target {self.min_agreement:g}" if self.min_agreement is not None
                  else f"ratio {self.ratio:g} ({self.policy})")
        agreement = ("predicted agreement not measured" if self.predicted_agreement is None
                     else f"predicted agreement {self.predicted_agreement:.3f}")
        return (f"segmented in {self.seconds:.1f} s: {len(self.models)} network(s), "
                f"params {self.params / 1e6:.2f} M (original {self.params_original / 1e6:.2f} M), "
                f"MACs {self.macs / 1e9:.1f} G/patch (original {self.macs_original / 1e9:.1f} G, "
                f"{100 * self.macs / max(1, self.macs_original):.0f} % kept), {chosen}, {agreement} "
                f"({self.agreement_source}), {len(self.labels)} labels -> {self.output}")


def overall_agreement(models: Sequence[Dict[str, Any]]) -> Tuple[Optional[float], str]:
    """The run's predicted agreement: the models' own, weighted by their number of classes (the
    mean Dice over all structures when each model's classes count alike); None if any is unknown."""
    if not models:
        return None, "no network ran"
    if any(m.get("predicted_agreement") is None for m in models):
        unknown = [m for m in models if m.get("predicted_agreement") is None]
        return None, unknown[0].get("agreement_source") or "not measured"
    weights = [max(1, int(m.get("num_classes") or 1) - 1) for m in models]
    value = sum(w * float(m["predicted_agreement"]) for w, m in zip(weights, models)) / sum(weights)
    sources = list(dict.fromkeys(m.get("agreement_source", "") for m in models))
    return round(value, 4), "; ".join(s for s in sources if s)


def _labels(task: str, roi_subset: Optional[Sequence[str]]) -> Dict[int, str]:
    from totalsegmentator.map_to_binary import class_map

    if task not in class_map:
        return {}
    labels = {int(k): v for k, v in class_map[task].items()}
    if roi_subset:
        unknown = sorted(set(roi_subset) - set(labels.values()))
        if unknown:
            raise InputError(f"unknown structure(s) in roi_subset: {', '.join(unknown)} "
                             f"(see `TotalSegmentator --help` / class names of task {task})")
        labels = {k: v for k, v in labels.items() if v in set(roi_subset)}
    return labels


def _prepare_output(output: Path, ml: bool) -> Path:
    """Check the output location and return a temporary path beside it (same filesystem)."""
    if ml and not str(output).lower().endswith((".nii", ".nii.gz")):
        raise InputError(f"with multilabel output (--ml) the output must be a .nii or .nii.gz file, "
                         f"got {output}")
    parent = output.parent
    if not parent.is_dir():
        raise InputError(f"output folder does not exist: {parent}")
    if output.exists() and output.is_dir() == ml:
        kind = "a folder" if ml else "a file"
        raise InputError(f"output {output} exists and is {kind}")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".tuckerseg-write-test-"):
            pass
    except OSError as exc:
        raise InputError(f"output folder is not writable: {parent} ({exc.strerror or exc})") from None
    tag = f".tuckerseg-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if ml:
        suffix = ".nii.gz" if str(output).lower().endswith(".nii.gz") else ".nii"
        return parent / f"{tag}{suffix}"
    return parent / tag


def _commit_output(tmp: Path, output: Path, ml: bool) -> None:
    """Move the finished result into place (a rename; folders are merged file by file)."""
    if ml or not output.exists():
        os.replace(tmp, output)
        return
    for item in tmp.iterdir():
        os.replace(item, output / item.name)
    tmp.rmdir()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _compressed_models_by_source(folders: Sequence[Union[str, Path]]) -> Dict[str, Path]:
    """``{original model folder: compressed-model folder}`` from each folder's manifest."""
    from TuckerSegLib.models.compressed_file import read_manifest

    out: Dict[str, Path] = {}
    for folder in folders:
        source = read_manifest(folder).get("source", {}).get("folder")
        if not source:
            raise InputError(f"{folder}: its manifest does not name the model it was made from")
        out[str(Path(source).resolve())] = Path(folder)
    return out


def models_needed(task: str, mode: str = "default", roi_subset: Optional[Sequence[str]] = None,
                  robust_crop: bool = False, body_seg: bool = False) -> Dict[int, str]:
    """``{dataset id: trainer}`` of every model a run uses, in order: TotalSegmentator's cropping
    or body model first (as its pipeline runs them), then the task's."""
    from TuckerSegLib.models.totalseg import task_models

    models = task_models(task, fast=mode == "fast", fastest=mode == "fastest")
    needed: Dict[int, str] = {}
    if roi_subset and task.startswith("total") and not task.endswith("_mr"):
        needed[297 if robust_crop else 298] = "nnUNetTrainer_4000epochs_NoMirroring"
    elif body_seg:
        needed[300] = "nnUNetTrainer"
    for i in models.dataset_ids:
        needed.setdefault(i, models.trainer)
    return needed


def is_multilabel_path(output: Union[str, Path]) -> bool:
    """An output named .nii or .nii.gz is one multilabel file; anything else is a folder."""
    return str(output).lower().endswith((".nii", ".nii.gz"))


def _model_stage_message(index: int, count: int, name: str) -> str:
    """The ``predict`` stage message as model ``index`` (from 0) of ``count`` starts to predict."""
    return f"model {index + 1}/{count}: {name}"


_LAST_MODEL_STAGE = re.compile(r"^model (\d+)/(\1): ")  # _model_stage_message's, for the last model


def last_model_started(event: dict) -> bool:
    """True for the progress event of a run's last model starting to predict: every model is then
    loaded and its engine prepared (engine caches are on disk)."""
    return event.get("type") == "stage" and event.get("stage") == "predict" and \
        bool(_LAST_MODEL_STAGE.match(str(event.get("message", ""))))


def segment(input: Union[str, Path], output: Union[str, Path],
            compression: Optional[CompressionSpec] = None, run: RunSpec = RunSpec(), *,
            task: str = "total", mode: str = "default", roi_subset: Optional[Sequence[str]] = None,
            ml: Optional[bool] = None, cache_dir: Optional[Union[str, Path]] = None,
            progress: Optional[Progress] = None, allow_download: bool = True, quiet: bool = False,
            compressed_models: Sequence[Union[str, Path]] = (), keep_warm: bool = True,
            **totalseg_kwargs: Any) -> SegmentResult:
    """Segment ``input`` (NIfTI file or DICOM folder) into ``output`` with compressed networks.

    ``compression`` says which networks run (ratio 1.0 = stock TotalSegmentator; None: the
    default quality target, as on the command line; see ``TuckerSegLib.compression``), ``run``
    how (engine, precision, layer forms, device; see
    ``TuckerSegLib.engines``); both were validated where they were built. ``mode`` is
    TotalSegmentator's resolution (default, fast, fastest). Other TotalSegmentator options
    (``statistics``, ``body_seg``, ``nr_thr_resamp``, ...) pass through ``totalseg_kwargs``.
    ``output`` is one multilabel file with ``ml`` (default: when it is named .nii or .nii.gz),
    else a folder with one file per class. Raises ``TuckerSegError`` subclasses with one-line
    messages. ``compressed_models``: compressed-model folders (e.g. from ``tuckerseg finetune``)
    used for the models they were made from, instead of compressing those. ``keep_warm``: keep the
    prepared networks for a later ``segment`` in this process; a one-shot process passes False
    and frees each network once it has predicted (``total`` then holds one of its five at a time).
    """
    from TuckerSegLib.models.totalseg import ensure_weights, task_modality

    import inspect

    from totalsegmentator.python_api import totalsegmentator
    # nnU-Net's predictor and TotalSegmentator's pipeline (about 3 s of imports on 2 cores) load
    # here, before the run's clock starts: a result's timings are the run's, not imports'
    from nnunetv2.inference import predict_from_raw_data  # noqa: F401
    from totalsegmentator import nnunet  # noqa: F401

    given_twice = set(totalseg_kwargs) & {"fast", "fastest", "ml", "task", "roi_subset", "device", "quiet"}
    unknown = set(totalseg_kwargs) - set(inspect.signature(totalsegmentator).parameters)
    if unknown or given_twice:
        raise TypeError(f"segment() does not take {', '.join(sorted(unknown | given_twice))}: plain options "
                        f"(ratio, policy, fast, device, engine, ...) go to TuckerSegLib.segment")
    progress = progress or NullProgress()
    compression = compression or compression_spec()
    t_start = time.perf_counter()
    timings: Dict[str, float] = {}
    fast, fastest = mode == "fast", mode == "fastest"
    ml = is_multilabel_path(output) if ml is None else bool(ml)
    roi_subset = list(roi_subset) if roi_subset else None

    given = _compressed_models_by_source(compressed_models)
    if compression.is_original and run.engine == "auto" and not given and run.precision != "int8":
        # ratio 1.0 promises stock TotalSegmentator voxel for voxel: PyTorch runs exactly what
        # stock nnU-Net runs, while a compiled engine's float rounding can flip near-tied voxels.
        run = replace(run, engine="torch")
    progress.stage("check", "checking input")
    checked = check_input(input)
    output = Path(output).expanduser().absolute()
    trainers = models_needed(task, mode, roi_subset, bool(totalseg_kwargs.get("robust_crop")),
                             bool(totalseg_kwargs.get("body_seg")))  # refuses an unknown task
    check_modality(checked, task_modality(task), f"task {task!r}")
    labels = _labels(task, roi_subset)
    ts_device = resolve_device(run.device)
    tmp = _prepare_output(output, ml)
    timings["check"] = time.perf_counter() - t_start

    needed = list(trainers)
    progress.stage("weights", "checking TotalSegmentator weights")
    t0 = time.perf_counter()
    ensure_weights(dict.fromkeys(needed), allow_download=allow_download, trainers=trainers)
    timings["weights"] = time.perf_counter() - t0
    progress.update(0.05, "weights ready", stage="weights")

    n_models = len(needed)

    def on_model(index: int, folder: Path) -> None:
        progress.stage("predict", _model_stage_message(index, n_models, folder.parent.name))
        progress.update(0.05 + 0.9 * index / max(1, n_models), f"model {index + 1}/{n_models}",
                        stage="predict")

    t0 = time.perf_counter()
    try:
        with compressed_predictors(compression, run, cache_dir=Path(cache_dir) if cache_dir else None,
                                   progress=progress, on_model=on_model, compressed_models=given,
                                   keep_warm=keep_warm) as hook:
            # quiet: TotalSegmentator's prints go to stderr, JSON event lines stay on stdout.
            if quiet and isinstance(progress, JsonProgress) and progress.stream is None:
                progress.stream = sys.stdout
            stdout = contextlib.redirect_stdout(sys.stderr) if quiet else contextlib.nullcontext()
            with stdout:
                totalsegmentator(str(checked.path), str(tmp), ml=ml, fast=fast, fastest=fastest,
                                 task=task, roi_subset=roi_subset, device=ts_device, quiet=quiet,
                                 **totalseg_kwargs)
        if not tmp.exists():
            raise TuckerSegError(f"TotalSegmentator finished without writing {output}")
        _commit_output(tmp, output, ml)
    except SystemExit as exc:  # TotalSegmentator calls sys.exit on some input problems
        _remove(tmp)
        raise InputError(f"TotalSegmentator stopped: {exc.code}") from None
    except BaseException:
        _remove(tmp)
        raise
    timings["segment"] = time.perf_counter() - t0
    for i, m in enumerate(hook.models):
        timings[f"model_{i + 1}_load"] = m.load_seconds
        timings[f"model_{i + 1}_predict"] = m.predict_seconds

    if ml:
        files = [str(output)] + [str(output.parent / n) for n in ("statistics.json",)
                                 if totalseg_kwargs.get("statistics") and (output.parent / n).exists()]
    else:
        files = sorted(str(f) for f in output.iterdir() if f.is_file())
    used = [{"dataset_id": m.dataset_id, "folder": m.folder, "params": m.params, "macs": m.macs,
             "params_original": m.params_original, "macs_original": m.macs_original,
             "patch_size": list(m.patch_size), "load_seconds": round(m.load_seconds, 3),
             "predict_seconds": round(m.predict_seconds, 3), "engine": m.engine, "warm": m.warm,
             "num_classes": m.num_classes, "predicted_agreement": m.predicted_agreement,
             "agreement_source": m.agreement_source,
             "compressed_model": str(given[str(Path(m.folder).resolve())])
             if str(Path(m.folder).resolve()) in given else None} for m in hook.models]
    seconds = time.perf_counter() - t_start
    result = SegmentResult(
        output=output, labels=labels, seconds=seconds, timings={k: round(v, 3) for k, v in timings.items()},
        params=sum(m.params for m in hook.models), macs=sum(m.macs for m in hook.models),
        params_original=sum(m.params_original for m in hook.models),
        macs_original=sum(m.macs_original for m in hook.models),
        ratio=compression.ratio if not compression.is_target else
        round(sum(m.macs for m in hook.models) / max(1, sum(m.macs_original for m in hook.models)), 4),
        policy=compression.policy, task=task, mode=mode, device=ts_device,
        models=used, files=files, min_agreement=compression.min_agreement)
    result.predicted_agreement, result.agreement_source = overall_agreement(used)
    progress.update(1.0, "done", stage="predict")
    progress.result(result.to_event())
    return result


def segment_api(input: Union[str, Path], output: Union[str, Path], ratio: Optional[float] = None,
                min_agreement: Optional[float] = None, policy: str = "budget", task: str = "total",
                fast: bool = False, fastest: bool = False, roi_subset: Optional[Sequence[str]] = None,
                ml: Optional[bool] = None, device: str = "auto", engine: str = "auto", precision: str = "auto",
                layer_forms: str = "auto", validate_on: Sequence[Union[str, Path]] = (),
                int8_min_agreement: float = INT8_MIN_AGREEMENT, int8_calibration: Sequence[str] = (),
                quality_search: str = "now", **kwargs: Any) -> SegmentResult:
    """``segment`` with plain options, validated into specs here (the Python API's entry point).
    ``quality_search="background"``: a target whose curve is not measured yet runs the original
    now and measures the curve in a detached process (the command line's default)."""
    return segment(input, output, compression_spec(ratio, min_agreement, policy, validate_on, quality_search),
                   RunSpec(engine=engine, precision=precision, layer_forms=layer_forms, device=device,
                           int8_min_agreement=int8_min_agreement, int8_calibration=tuple(int8_calibration)),
                   task=task, mode=check_mode(fast, fastest), roi_subset=roi_subset, ml=ml, **kwargs)
