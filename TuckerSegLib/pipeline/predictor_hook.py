"""Swap each nnU-Net predictor's network for a compressed one while TotalSegmentator runs.

Why: TotalSegmentator builds one ``nnUNetPredictor`` per model and calls
``initialize_from_trained_model_folder`` then ``predict_from_files``. Replacing that one method for
the duration of a run keeps every other step of TotalSegmentator (resampling, cropping, pasting
parts, statistics, saving) untouched; ``predict_from_files`` of a single case is only routed to
nnU-Net's in-process ``predict_from_files_sequential`` (see ``_in_process_predict_from_files``).
The replacement does what nnU-Net's method does, except that it loads checkpoints with
``torch.load(weights_only=True)`` and takes the network from the compression cache;
``list_of_parameters`` is set to the new network's state dict because the predictor reloads it
into the network before every case.
"""
from __future__ import annotations

import functools
import inspect
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from TuckerSegLib.errors import EngineError, ModelError
from TuckerSegLib.models.checkpoint import load_checkpoint
from TuckerSegLib.models.nnunet_folder import build_network
from TuckerSegLib.progress import NullProgress, Progress

# Engines turn a (compressed) PyTorch network into the module the predictor runs. "torch" runs it
# as is; other engines (e.g. OpenVINO) register a wrapper here: fn(network, patch_size, device).
# The predictor calls ``load_state_dict(list_of_parameters[0])`` on the module before each case, so
# a wrapper must accept the wrapped network's state dict (e.g. delegate it, or ignore identical ones).
EngineFn = Callable[[nn.Module, Tuple[int, ...], torch.device], nn.Module]
ENGINES: Dict[str, EngineFn] = {"torch": lambda network, patch_size, device: network}


def register_engine(name: str, fn: EngineFn) -> None:
    """Make an inference engine available to the hook under ``name``."""
    ENGINES[name] = fn


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


def _params_and_macs(network: nn.Module, patch_size: Tuple[int, ...], in_channels: int = 1) -> Tuple[int, int]:
    """Params and MACs per patch, in the project's convention (``TuckerSegLib.network.cost``)."""
    from TuckerSegLib.network.cost import count_cost as _count

    cost = _count(network, (1, in_channels, *patch_size))
    return int(cost.params), int(cost.macs)


def _dataset_id(folder: Path) -> Optional[int]:
    name = folder.parent.name
    if name.startswith("Dataset") and name[7:10].isdigit():
        return int(name[7:10])
    return None


class CompressedPredictorHook:
    """Context manager: while active, nnU-Net predictors initialise with compressed networks."""

    def __init__(self, ratio: float = 1.0, policy: str = "budget", cache_dir: Optional[Path] = None,
                 engine: str = "torch", progress: Optional[Progress] = None,
                 on_model: Optional[Callable[[int, Path], None]] = None,
                 compressed_models: Optional[Dict[str, Path]] = None, precision: str = "auto",
                 shapes: str = "as-is", in_process: bool = True):
        from TuckerSegLib.engines import ENGINE_CHOICES, PRECISION_CHOICES

        if engine not in ENGINES and engine not in ENGINE_CHOICES:
            raise EngineError(f"inference engine {engine!r} is not available (available: "
                              f"{', '.join(sorted(set(ENGINES) | set(ENGINE_CHOICES)))})")
        if precision not in PRECISION_CHOICES:
            raise EngineError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISION_CHOICES)}")
        self.precision = precision
        self.shapes = shapes
        self.engine_infos: list = []  # EngineInfo per model, in load order
        self.ratio = float(ratio)
        self.policy = policy
        self.cache_dir = cache_dir
        self.engine = engine
        self.progress = progress or NullProgress()
        self.on_model = on_model  # on_model(index, folder) once a model is loaded, before it predicts
        self.models: List[ModelUse] = []
        # resolved original model folder -> compressed-model folder to use instead of the cache
        # (e.g. one written by ``tuckerseg finetune``)
        self.compressed_models = {str(Path(k).resolve()): Path(v) for k, v in (compressed_models or {}).items()}
        self._original = None
        self._original_predict = None
        self.in_process = in_process
        self._t_last: Optional[float] = None

    # -- the replacement of nnUNetPredictor.initialize_from_trained_model_folder ----------------
    def _initialize(self, predictor, model_training_output_dir: str,
                    use_folds: Union[Tuple[Union[int, str]], None],
                    checkpoint_name: str = "checkpoint_final.pth") -> None:
        import nnunetv2.inference.predict_from_raw_data as prd
        from batchgenerators.utilities.file_and_folder_operations import join, load_json
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        self._close_previous()
        folder = Path(model_training_output_dir)
        t0 = time.perf_counter()
        if use_folds is None:
            use_folds = prd.nnUNetPredictor.auto_detect_available_folds(str(folder), checkpoint_name)
        if isinstance(use_folds, str):
            use_folds = [use_folds]
        use_folds = [int(f) if f != "all" else f for f in use_folds]
        if len(use_folds) != 1 and self.ratio < 1.0:
            raise ModelError(f"compressed models support one fold, {folder} asks for folds {use_folds}")
        try:
            dataset_json = load_json(join(str(folder), "dataset.json"))
            plans = load_json(join(str(folder), "plans.json"))
        except FileNotFoundError as exc:
            raise ModelError(f"model folder {folder} is incomplete: {exc.filename} is missing") from None
        plans_manager = PlansManager(plans)

        manifest: dict = {}
        given = self.compressed_models.get(str(folder.resolve()))
        if self.ratio >= 1.0 and given is None:
            # Stock behaviour: nnU-Net's own network, every requested fold's weights.
            checkpoints = [load_checkpoint(folder / f"fold_{f}" / checkpoint_name) for f in use_folds]
            first = checkpoints[0]
            trainer_name = first["trainer_name"]
            configuration_name = first["init_args"]["configuration"]
            mirroring = first.get("inference_allowed_mirroring_axes")
            configuration_manager = plans_manager.get_configuration(configuration_name)
            num_in = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
            network = build_network(plans, dataset_json, configuration_name, trainer_name,
                                    initialise=False)
            network.load_state_dict(first["network_weights"])
            parameters = [c["network_weights"] for c in checkpoints]
            patch = tuple(int(p) for p in configuration_manager.patch_size)
            params0, macs0 = _params_and_macs(network, patch, num_in)
            params, macs = params0, macs0
        else:
            # Compressed: from the cache (built once, then loaded without the original checkpoint).
            from TuckerSegLib.models.cache import get_compressed_model

            self.progress.stage("compress", f"compressed network for {folder.parent.name} "
                                            f"(ratio {self.ratio:g}, {self.policy})")
            if given is not None:
                from TuckerSegLib.models.compressed_file import load_compressed

                model = load_compressed(given)
            else:
                model = get_compressed_model(folder, fold=use_folds[0], policy=self.policy,
                                             ratio=self.ratio, cache_dir=self.cache_dir,
                                             checkpoint_name=checkpoint_name, progress=self.progress)
            network = model.network.eval()
            manifest = model.manifest or {}
            trainer_name = model.trainer_name
            configuration_manager = plans_manager.get_configuration(model.configuration)
            if "NoMirroring" in trainer_name:
                mirroring = None  # what these trainers store; saves reading the original checkpoint
            else:
                ckpt = load_checkpoint(folder / f"fold_{use_folds[0]}" / checkpoint_name)
                mirroring = ckpt.get("inference_allowed_mirroring_axes")
            parameters = [network.state_dict()]
            patch = tuple(int(p) for p in model.patch_size)
            report = manifest.get("report", {})
            if "original" in report and "compressed" in report:
                params0, macs0 = int(report["original"]["params"]), int(report["original"]["macs"])
                params, macs = int(report["compressed"]["params"]), int(report["compressed"]["macs"])
            else:
                params, macs = _params_and_macs(network, patch, model.num_input_channels)
                params0, macs0 = params, macs

        engine_info: dict = {}
        from TuckerSegLib.engines import ENGINE_CHOICES
        if self.engine in ENGINES and self.engine not in ENGINE_CHOICES:  # a registered custom engine
            network = ENGINES[self.engine](network, patch, predictor.device)
        elif len(parameters) > 1:
            # several folds: nnU-Net loads each fold's weights into the network in turn, which
            # engines with compiled-in weights cannot do; PyTorch eager runs them
            if self.engine not in ("auto", "torch"):
                raise EngineError(f"engine {self.engine} runs one fold; {folder} asks for {len(parameters)}")
        else:
            from TuckerSegLib.engines import prepare_network
            from TuckerSegLib.models.cache import default_cache_dir

            engine_cache = Path(self.cache_dir) if self.cache_dir else default_cache_dir(folder)
            n_in = num_in if self.ratio >= 1.0 else model.num_input_channels
            network, info = prepare_network(network, patch, n_in, predictor.device, self.engine,
                                            self.precision, engine_cache, shapes=self.shapes,
                                            progress=self.progress)
            parameters = [network.state_dict()]  # {}: the weights are compiled into the engine
            self.engine_infos.append(info)
            engine_info = info.as_dict()
            self.progress.log(info.summary())
        predictor.plans_manager = plans_manager
        predictor.configuration_manager = configuration_manager
        predictor.list_of_parameters = parameters
        predictor.network = network
        predictor.dataset_json = dataset_json
        predictor.trainer_name = trainer_name
        predictor.allowed_mirroring_axes = mirroring
        predictor.label_manager = _parallel_argmax(plans_manager.get_label_manager(dataset_json))
        if os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t"):
            predictor.network = torch.compile(predictor.network)

        now = time.perf_counter()
        self.models.append(ModelUse(folder=str(folder), dataset_id=_dataset_id(folder), params=params,
                                    macs=macs, params_original=params0, macs_original=macs0,
                                    patch_size=patch, load_seconds=now - t0, manifest=manifest,
                                    engine=engine_info))
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
        if self.in_process:
            try:  # TotalSegmentator patches predict_from_files on import: wrap its version, not under it
                import totalsegmentator.nnunet  # noqa: F401
            except ImportError:
                pass
            self._original_predict = nnUNetPredictor.predict_from_files
            nnUNetPredictor.predict_from_files = _in_process_predict_from_files(self._original_predict)
        return self

    def __exit__(self, *exc) -> None:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        self._close_previous()
        if self._original is not None:
            nnUNetPredictor.initialize_from_trained_model_folder = self._original
            self._original = None
        if self._original_predict is not None:
            nnUNetPredictor.predict_from_files = self._original_predict
            self._original_predict = None


def _in_process_predict_from_files(original: Callable) -> Callable:
    """``predict_from_files`` that runs one case in this process (``predict_from_files_sequential``).

    Why: TotalSegmentator predicts one case per call; nnU-Net's pipelined path spawns a
    preprocessing worker and an export pool for it, and on a small CPU those spawns (each imports
    torch and nnU-Net) cost more than the work: about 7 s around a 3 s network on example_ct with
    --fast. The sequential path runs the same preprocessing (``run_case``), prediction and export
    functions, so the output is the same; several cases or parts keep the pipelined path.
    """
    @functools.wraps(original)  # TotalSegmentator's version inspects its own signature
    def predict_from_files(predictor, list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                           save_probabilities=False, overwrite=True, num_processes_preprocessing=None,
                           num_processes_segmentation_export=None, folder_with_segs_from_prev_stage=None,
                           num_parts=1, part_id=0, **kwargs):
        sequential = getattr(predictor, "predict_from_files_sequential", None)
        case = _single_case(predictor, list_of_lists_or_source_folder) if num_parts == 1 else None
        if sequential is not None and case is not None and \
                all(k in inspect.signature(sequential).parameters for k in kwargs):
            return sequential(case, output_folder_or_list_of_truncated_output_files,
                              save_probabilities=save_probabilities, overwrite=overwrite,
                              folder_with_segs_from_prev_stage=folder_with_segs_from_prev_stage, **kwargs)
        extra = {k: v for k, v in (("num_processes_preprocessing", num_processes_preprocessing),
                                   ("num_processes_segmentation_export", num_processes_segmentation_export))
                 if v is not None}
        return original(predictor, list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                        save_probabilities=save_probabilities, overwrite=overwrite,
                        folder_with_segs_from_prev_stage=folder_with_segs_from_prev_stage,
                        num_parts=num_parts, part_id=part_id, **extra, **kwargs)

    return predict_from_files


def _parallel_argmax(label_manager):
    """``label_manager`` whose argmax over classes runs on every core.

    Why: nnU-Net takes it with numpy on one core, about 0.5 s of a 3 s compressed --fast run on
    2 cores for 118 classes. ``torch.max`` over the class axis gives the same labels (the first
    maximum on ties, as numpy) and dtype. Region-based models keep nnU-Net's own code.
    """
    if getattr(label_manager, "has_regions", True):
        return label_manager
    original = label_manager.convert_probabilities_to_segmentation

    def convert_probabilities_to_segmentation(predicted_probabilities):
        is_numpy = isinstance(predicted_probabilities, np.ndarray)
        probs = torch.from_numpy(predicted_probabilities) if is_numpy else predicted_probabilities
        if isinstance(probs, torch.Tensor) and probs.device.type == "cpu" and probs.dim() >= 2 and \
                probs.shape[0] == label_manager.num_segmentation_heads:
            with torch.inference_mode():
                labels = probs.max(0).indices
            return labels.numpy() if is_numpy else labels
        return original(predicted_probabilities)

    label_manager.convert_probabilities_to_segmentation = convert_probabilities_to_segmentation
    return label_manager


def _single_case(predictor, source) -> Optional[List[List[str]]]:
    """nnU-Net's list of lists for ``source`` (a folder of nnU-Net inputs or a list of cases) when it
    holds one case, else None.

    Why a list: given a folder, nnU-Net forks a pool of 12 processes to list its files (0.4 s on a
    2-core CPU for one case); the list, built by nnU-Net's own ``create_paths_fn``, is the same.
    """
    if isinstance(source, (list, tuple)):
        return list(source) if len(source) == 1 else None
    import re

    ending = (getattr(predictor, "dataset_json", None) or {}).get("file_ending")
    if not ending or not Path(source).is_dir():
        return None
    from nnunetv2.utilities.utils import create_paths_fn

    # nnU-Net's input naming, CASE_XXXX<ending>; outputs (CASE<ending>) may share the folder
    pattern = re.compile(r"(.+)_\d{4}" + re.escape(ending))
    files = sorted(f.name for f in Path(source).iterdir() if f.is_file() and f.name.endswith(ending))
    cases = {m.group(1) for m in (pattern.fullmatch(f) for f in files) if m}
    if len(cases) != 1:
        return None
    return [create_paths_fn(str(source), files, ending, cases.pop())]


@contextmanager
def compressed_predictors(ratio: float = 1.0, policy: str = "budget", cache_dir: Optional[Path] = None,
                          engine: str = "torch", progress: Optional[Progress] = None,
                          on_model: Optional[Callable[[int, Path], None]] = None,
                          compressed_models: Optional[Dict[str, Path]] = None,
                          precision: str = "auto", shapes: str = "as-is"
                          ) -> Iterator[CompressedPredictorHook]:
    """``with compressed_predictors(ratio=0.5) as hook: totalsegmentator(...)``; see ``hook.models``."""
    hook = CompressedPredictorHook(ratio, policy, cache_dir, engine, progress, on_model, compressed_models,
                                   precision, shapes)
    with hook:
        yield hook
