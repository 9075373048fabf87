"""Swap each nnU-Net predictor's network for a compressed one while TotalSegmentator runs.

Why: TotalSegmentator builds one ``nnUNetPredictor`` per model and calls
``initialize_from_trained_model_folder`` then ``predict_from_files``. Replacing that one method for
the duration of a run keeps every other step of TotalSegmentator (resampling, cropping, pasting
parts, statistics, saving) untouched. The replacement loads the model folder as ``spec`` asks
(``model_loading``, checkpoints read with ``torch.load(weights_only=True)``), prepares the engine
that runs it (``engines.prepare_network``) and hands both to nnU-Net's own
``manual_initialization``. Single cases go through nnU-Net's in-process path
(``nnunet_speedups``).

Prepared models are kept for the life of the process (``WARM_MODELS`` of them): a second
``segment`` in the same process (a batch worker, a warm worker) neither loads nor converts again.
A one-shot process (the ``tuckerseg segment`` command) keeps none (``keep_warm=False``): each
network is freed once its prediction ends, so ``total``'s five networks are not all in memory at
the end.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

from torch import nn

from TuckerSegLib.engines.base import EngineInfo
from TuckerSegLib.errors import EngineError
from TuckerSegLib.models.checkpoint import file_fingerprint
from TuckerSegLib.pipeline.model_loading import LoadedModel, load_model
from TuckerSegLib.pipeline.nnunet_speedups import cpu_sliding_window, in_process_predict_from_files, parallel_argmax
from TuckerSegLib.progress import NullProgress, Progress
from TuckerSegLib.specs import CompressionSpec, RunSpec
from TuckerSegLib.storage import model_cache_dir

# Prepared models kept per process, most recently used last (TotalSegmentator's total task uses 5).
WARM_MODELS = 6
_warm: "OrderedDict[tuple, Tuple[LoadedModel, nn.Module, Optional[EngineInfo], Tuple[Optional[float], str]]]" = OrderedDict()


@dataclass
class ModelUse:
    """What one model folder cost in a run (for the summary and the result event)."""

    folder: str
    dataset_id: Optional[int]
    params: int
    macs: int
    params_original: int
    macs_original: int
    patch_size: Tuple[int, ...]
    load_seconds: float
    predict_seconds: float = 0.0
    manifest: dict = field(default_factory=dict)
    engine: dict = field(default_factory=dict)  # EngineInfo.as_dict() of the engine that ran it
    warm: bool = False  # prepared by an earlier run in this process
    num_classes: int = 0  # output classes, background included
    predicted_agreement: Optional[float] = None  # with the original network; None: not measured
    agreement_source: str = ""  # where predicted_agreement comes from


def _dataset_id(folder: Path) -> Optional[int]:
    name = folder.parent.name
    if name.startswith("Dataset") and name[7:10].isdigit():
        return int(name[7:10])
    return None


def _known_quality(folder: Path, spec: CompressionSpec, given: Optional[Path]) -> Tuple[Optional[float], str]:
    """Predicted agreement known before loading: the original's, or a given folder's own validation."""
    if given is not None:
        from TuckerSegLib.models.compressed_file import read_manifest

        after = read_manifest(given).get("report", {}).get("finetune", {}).get("validation", {}).get("after") or {}
        if "mean_dice" in after:
            return float(after["mean_dice"]), f"distillation's own validation ({given.name})"
        return None, "not measured"
    if spec.is_original:
        return 1.0, "original network"
    return None, "not measured"


def _curve_quality(folder: Path, loaded: LoadedModel, cache_dir: Optional[Path], checkpoint: Path
                   ) -> Tuple[Optional[float], str]:
    """An explicit ratio's agreement read off the model's quality curve, where one was measured."""
    from TuckerSegLib.compression.quality_curve import curves
    from TuckerSegLib.models.checkpoint import file_fingerprint

    found = curves(folder, cache_dir, file_fingerprint(checkpoint)) if checkpoint.is_file() else {}
    if not found:
        return None, "not measured (a quality target measures it: --min-agreement)"
    curve = max(found.values(), key=lambda c: len(c.points))
    value = curve.predicted(loaded.macs / max(1, loaded.macs_original))
    if value is None:
        return None, "not measured at this ratio (--min-agreement measures it)"
    return round(value, 4), "interpolated on the model's quality curve"


def _weights_stamp(folder: Path, folds, checkpoint_name: str) -> tuple:
    """Each checkpoint's size and mtime: a warm model is reused only for the same weights."""
    paths = (folder / f"fold_{f}" / checkpoint_name for f in folds)
    return tuple(file_fingerprint(p) if p.is_file() else None for p in paths)


def original_run(run: RunSpec) -> RunSpec:
    """How the original network runs when a target falls back to it: exactly as stock runs it
    (PyTorch) unless the user chose the engine or INT8."""
    return replace(run, engine="torch") if run.engine == "auto" and run.precision != "int8" else run


def how_choice_runs(choice, run: RunSpec) -> Tuple[CompressionSpec, Optional[Path], RunSpec]:
    """``(spec, compressed folder or None, run)`` of a quality target's ``TargetChoice``: a lower
    precision measured faster here and meeting the target runs on OpenVINO; the original at f32
    runs as stock does, or on the faster engine it was measured on (``fast_original``). The hook
    runs this; a background search prepares it for the next run."""
    if choice.precision == "int8":  # the INT8 model the search quantised and measured
        from TuckerSegLib.pipeline.quality_target import target_int8_run

        return choice.spec, choice.compressed_folder, target_int8_run(run)
    if choice.precision != "f32":
        return choice.spec, choice.compressed_folder, replace(run, engine="openvino", precision=choice.precision)
    if choice.fallback and choice.point is not None:  # the original measured on a faster engine
        return choice.spec, choice.compressed_folder, replace(run, engine=choice.point.engine)
    return choice.spec, choice.compressed_folder, original_run(run) if choice.fallback else run


def prepare_for_run(folder: Path, folds: list, checkpoint_name: str, spec: CompressionSpec, run: RunSpec,
                    device, cache_dir: Optional[Path], given: Optional[Path] = None,
                    progress: Optional[Progress] = None) -> Tuple[LoadedModel, nn.Module, Optional[EngineInfo]]:
    """The model loaded as ``spec`` asks and the module that runs it (an engine's, with its files
    cached beside the model; several folds: PyTorch eager, the weights swapped per fold)."""
    progress = progress or NullProgress()
    loaded = load_model(folder, folds, checkpoint_name, spec, cache_dir, given, progress)
    if len(loaded.parameters) > 1:
        # several folds: nnU-Net loads each fold's weights into the network in turn, which
        # engines with compiled-in weights cannot do; PyTorch eager runs them
        if run.engine not in ("auto", "torch") or run.precision == "int8":
            raise EngineError(f"engine {run.engine} ({run.precision}) runs one fold; "
                              f"{folder} asks for {len(loaded.parameters)}")
        return loaded, loaded.network, None
    from TuckerSegLib.engines import prepare_network

    int8_data = None
    if run.precision == "int8":  # phantoms (and the user's CTs) through the model's plans
        from TuckerSegLib.engines.int8_data import model_int8_data

        int8_data = model_int8_data(loaded.plans_manager.plans, loaded.configuration,
                                    loaded.dataset_json, loaded.in_channels, loaded.patch_size,
                                    run.int8_calibration)
    module, info = prepare_network(loaded.network, loaded.patch_size, loaded.in_channels, device, run,
                                   model_cache_dir(folder, cache_dir), progress=progress, int8_data=int8_data)
    loaded.parameters = [module.state_dict()]  # {}: the weights are compiled into the engine
    return loaded, module, info


class CompressedPredictorHook:
    """Context manager: while active, nnU-Net predictors initialise with compressed networks."""

    def __init__(self, spec: CompressionSpec, run: RunSpec, cache_dir: Optional[Path] = None,
                 progress: Optional[Progress] = None,
                 on_model: Optional[Callable[[int, Path], None]] = None,
                 compressed_models: Optional[Dict[str, Path]] = None, in_process: bool = True,
                 keep_warm: bool = True):
        self.spec = spec
        self.run = run
        self.cache_dir = cache_dir
        self.progress = progress or NullProgress()
        self.on_model = on_model  # on_model(index, folder) once a model is loaded, before it predicts
        self.models: List[ModelUse] = []
        self.engine_infos: List[EngineInfo] = []  # per model, in load order
        # resolved original model folder -> compressed-model folder to use instead of the cache
        # (e.g. one written by ``tuckerseg finetune``)
        self.compressed_models = {str(Path(k).resolve()): Path(v) for k, v in (compressed_models or {}).items()}
        self.in_process = in_process
        self.keep_warm = keep_warm  # False: prepared models are not kept for later runs
        self._original = None
        self._original_predict = None
        self._original_argmax = None
        self._original_window = None
        self._t_last: Optional[float] = None
        self._patch_checks: list = []  # forward pre-hooks removed on exit (prepared modules stay warm)
        # quality curves to measure in the background once the run has ended (search "background")
        self.pending_searches: list = []

    def _prepared(self, predictor, folder: Path, folds: list, checkpoint_name: str
                  ) -> Tuple[LoadedModel, nn.Module, Optional[EngineInfo], Tuple[Optional[float], str], bool]:
        """The loaded model, the module that runs it and its predicted agreement (with its
        source), from this process's warm models if there."""
        given = self.compressed_models.get(str(folder.resolve()))
        key = (str(folder.resolve()), tuple(folds), checkpoint_name, self.spec, self.run,
               str(predictor.device), str(self.cache_dir), str(given),
               _weights_stamp(folder, folds, checkpoint_name))
        if key in _warm:
            _warm.move_to_end(key)
            return (*_warm[key], True)
        spec, run, quality = self.spec, self.run, _known_quality(folder, self.spec, given)
        provisional = False  # what runs while the curve is measured elsewhere is not kept warm
        if spec.is_target and given is None:
            from TuckerSegLib.pipeline import background_search
            from TuckerSegLib.pipeline.quality_target import (DEFERRED_PRECISIONS, choose_for_target,
                                                              lower_precisions, original_on_fast_engine)

            precisions = lower_precisions(run, predictor.device)
            choice = choose_for_target(folder, spec, folds[0], checkpoint_name, predictor.device,
                                       self.cache_dir, self.progress, precisions=precisions,
                                       measure=spec.search == "now", defer=DEFERRED_PRECISIONS,
                                       fast_original=original_on_fast_engine(run, predictor.device))
            if choice is None or choice.pending:  # what is not measured yet, a detached search measures
                log = background_search.log_path(folder, self.cache_dir)
                self.pending_searches.append(background_search.SearchRequest(
                    folder, spec, folds[0], checkpoint_name, str(predictor.device), self.cache_dir, precisions, run))
            if choice is None:  # search "background": stock's network now, the curve for later runs
                self.progress.log(f"{folder.parent.name}: quality target {spec.min_agreement:g} not measured on "
                                  f"this machine yet: running the original network; its quality curve is "
                                  f"measured in the background once this run ends (log: {log}), later runs use it")
                spec, provisional = spec.concrete(1.0), True
                quality = (1.0, "original network (the quality target's curve is being measured in the background)")
                run = original_run(run)
            else:
                self.progress.log(f"{folder.parent.name}: {choice.summary(spec.min_agreement)}")
                if choice.pending:  # not kept warm: a warm worker's later requests pick up the search
                    provisional = True
                    self.progress.log(f"{folder.parent.name}: {' and '.join(choice.pending)} not measured on this "
                                      f"machine yet: measured in the background once this run ends (log: {log}), "
                                      f"later runs may choose it")
                spec, given, run = how_choice_runs(choice, run)
                quality = (choice.agreement, choice.source)
        loaded, module, info = prepare_for_run(folder, folds, checkpoint_name, spec, run, predictor.device,
                                               self.cache_dir, given, self.progress)
        if quality[0] is None and not spec.is_original:
            quality = _curve_quality(folder, loaded, self.cache_dir, folder / f"fold_{folds[0]}" / checkpoint_name)
        if self.keep_warm and not provisional:
            _warm[key] = (loaded, module, info, quality)
            while len(_warm) > WARM_MODELS:
                _warm.popitem(last=False)
        return loaded, module, info, quality, False

    # -- the replacement of nnUNetPredictor.initialize_from_trained_model_folder ----------------
    def _initialize(self, predictor, model_training_output_dir: str,
                    use_folds: Union[Tuple[Union[int, str]], None],
                    checkpoint_name: str = "checkpoint_final.pth") -> None:
        import nnunetv2.inference.predict_from_raw_data as prd

        self._close_previous()
        folder = Path(model_training_output_dir)
        t0 = time.perf_counter()
        if use_folds is None:
            use_folds = prd.nnUNetPredictor.auto_detect_available_folds(str(folder), checkpoint_name)
        if isinstance(use_folds, str):
            use_folds = [use_folds]
        folds = [int(f) if f != "all" else f for f in use_folds]
        loaded, module, info, quality, warm = self._prepared(predictor, folder, folds, checkpoint_name)
        if info is not None:
            self.engine_infos.append(info)
            self.progress.log(info.summary())
        if isinstance(module, nn.Module):  # a cancel lands between two patches
            self._patch_checks.append(module.register_forward_pre_hook(lambda *_: self.progress.check()))
        predictor.manual_initialization(module, loaded.plans_manager, loaded.configuration_manager,
                                        loaded.parameters, loaded.dataset_json, loaded.trainer_name,
                                        loaded.mirroring)

        now = time.perf_counter()
        self.models.append(ModelUse(folder=str(folder), dataset_id=_dataset_id(folder), params=loaded.params,
                                    macs=loaded.macs, params_original=loaded.params_original,
                                    macs_original=loaded.macs_original, patch_size=loaded.patch_size,
                                    load_seconds=now - t0, manifest=loaded.manifest,
                                    engine=info.as_dict() if info is not None else {}, warm=warm,
                                    num_classes=len(loaded.dataset_json.get("labels", {})),
                                    predicted_agreement=quality[0], agreement_source=quality[1]))
        self._t_last = now
        if self.on_model is not None:  # prediction with this model starts now
            self.on_model(len(self.models) - 1, folder)

    def _close_previous(self) -> None:
        """Attribute the time since the last model loaded to that model's prediction."""
        if self.models and self._t_last is not None:
            self.models[-1].predict_seconds = time.perf_counter() - self._t_last
            self._t_last = None

    # -- context manager ------------------------------------------------------------------------
    def __enter__(self) -> "CompressedPredictorHook":
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        hook = self
        self._original = nnUNetPredictor.initialize_from_trained_model_folder

        def initialize_from_trained_model_folder(predictor, model_training_output_dir, use_folds,
                                                 checkpoint_name="checkpoint_final.pth"):
            return hook._initialize(predictor, model_training_output_dir, use_folds, checkpoint_name)

        nnUNetPredictor.initialize_from_trained_model_folder = initialize_from_trained_model_folder
        from nnunetv2.utilities.label_handling.label_handling import LabelManager

        self._original_argmax = LabelManager.convert_probabilities_to_segmentation
        LabelManager.convert_probabilities_to_segmentation = parallel_argmax(self._original_argmax)
        self._original_window = nnUNetPredictor._internal_predict_sliding_window_return_logits
        nnUNetPredictor._internal_predict_sliding_window_return_logits = cpu_sliding_window(self._original_window)
        if self.in_process:
            try:  # TotalSegmentator patches predict_from_files on import: wrap its version, not under it
                import totalsegmentator.nnunet  # noqa: F401
            except ImportError:
                pass
            self._original_predict = nnUNetPredictor.predict_from_files
            nnUNetPredictor.predict_from_files = in_process_predict_from_files(self._original_predict)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        if exc_type is None:  # after the run, not during it: the search would compete for the CPU
            from TuckerSegLib.pipeline import background_search

            for request in self.pending_searches:
                background_search.start(request)
        self.pending_searches.clear()
        self._close_previous()
        for handle in self._patch_checks:
            handle.remove()
        self._patch_checks.clear()
        if self._original is not None:
            nnUNetPredictor.initialize_from_trained_model_folder = self._original
            self._original = None
        if self._original_argmax is not None:
            from nnunetv2.utilities.label_handling.label_handling import LabelManager

            LabelManager.convert_probabilities_to_segmentation = self._original_argmax
            self._original_argmax = None
        if self._original_predict is not None:
            nnUNetPredictor.predict_from_files = self._original_predict
            self._original_predict = None
        if self._original_window is not None:
            nnUNetPredictor._internal_predict_sliding_window_return_logits = self._original_window
            self._original_window = None


@contextmanager
def compressed_predictors(spec: CompressionSpec, run: RunSpec, cache_dir: Optional[Path] = None,
                          progress: Optional[Progress] = None,
                          on_model: Optional[Callable[[int, Path], None]] = None,
                          compressed_models: Optional[Dict[str, Path]] = None, keep_warm: bool = True,
                          ) -> Iterator[CompressedPredictorHook]:
    """``with compressed_predictors(spec, run) as hook: totalsegmentator(...)``; see ``hook.models``."""
    with CompressedPredictorHook(spec, run, cache_dir, progress, on_model, compressed_models,
                                 keep_warm=keep_warm) as hook:
        yield hook


def clear_warm_models() -> None:
    """Forget this process's prepared models (the next run loads and prepares again)."""
    _warm.clear()
