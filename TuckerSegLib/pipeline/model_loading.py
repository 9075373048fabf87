"""The network nnU-Net's predictor runs for one model folder: stock weights or compressed ones.

Why apart from the hook: what a model folder turns into (plans, the network, the weights the
predictor loads before each case, and what it costs) is the same whether TotalSegmentator's
pipeline asks for it or a warm worker does; the hook only decides when.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from torch import nn

from TuckerSegLib.errors import ModelError
from TuckerSegLib.engines.base import fingerprints_from_file
from TuckerSegLib.models.checkpoint import file_fingerprint, load_checkpoint
from TuckerSegLib.models.nnunet_folder import build_network
from TuckerSegLib.network.cost import count_cost
from TuckerSegLib.progress import NullProgress, Progress
from TuckerSegLib.specs import CompressionSpec
from TuckerSegLib.storage import merge_json, model_cache_dir, read_json

COSTS_FILE = "costs.json"  # in a model's cache folder: the original network's cost per patch


@dataclass
class LoadedModel:
    """What ``nnUNetPredictor.manual_initialization`` takes, plus the model's cost per patch."""

    network: nn.Module
    parameters: List[dict]  # the weights nnU-Net loads into the network before each case, per fold
    plans_manager: object
    configuration_manager: object
    dataset_json: dict
    trainer_name: str
    mirroring: Optional[Tuple[int, ...]]
    patch_size: Tuple[int, ...]
    in_channels: int
    params: int
    macs: int
    params_original: int
    macs_original: int
    manifest: dict = field(default_factory=dict)
    configuration: str = "3d_fullres"  # the plans' configuration the network was built from


def _read_plans(folder: Path) -> Tuple[dict, dict]:
    from batchgenerators.utilities.file_and_folder_operations import load_json

    try:
        return load_json(str(folder / "dataset.json")), load_json(str(folder / "plans.json"))
    except FileNotFoundError as exc:
        raise ModelError(f"model folder {folder} is incomplete: {exc.filename} is missing") from None


def load_model(folder: Path, folds: Sequence[Union[int, str]], checkpoint_name: str,
               spec: CompressionSpec, cache_dir: Optional[Path] = None,
               compressed_folder: Optional[Path] = None,
               progress: Optional[Progress] = None) -> LoadedModel:
    """``folder``'s network as ``spec`` asks: stock (every fold's weights) at ratio 1.0, else the
    compressed network from the cache (built once) or from ``compressed_folder`` (e.g. finetune's)."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    progress = progress or NullProgress()
    if len(folds) != 1 and (not spec.is_original or compressed_folder is not None):
        raise ModelError(f"compressed models support one fold, {folder} asks for folds {list(folds)}")
    dataset_json, plans = _read_plans(folder)
    plans_manager = PlansManager(plans)
    if spec.is_original and compressed_folder is None:
        checkpoints = [load_checkpoint(folder / f"fold_{f}" / checkpoint_name) for f in folds]
        first = checkpoints[0]
        configuration = first["init_args"]["configuration"]
        configuration_manager = plans_manager.get_configuration(configuration)
        in_channels = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
        network = build_network(plans, dataset_json, configuration, first["trainer_name"], initialise=False)
        network.load_state_dict(first["network_weights"])
        patch = tuple(int(p) for p in configuration_manager.patch_size)
        cache = model_cache_dir(folder, cache_dir)
        checkpoint = (folder / f"fold_{folds[0]}" / checkpoint_name).resolve()
        fingerprints_from_file(network, f"{checkpoint}|{file_fingerprint(checkpoint)}", cache)
        params, macs = original_cost(network, (1, in_channels, *patch), cache)
        return LoadedModel(network, [c["network_weights"] for c in checkpoints], plans_manager,
                           configuration_manager, dataset_json, first["trainer_name"],
                           first.get("inference_allowed_mirroring_axes"), patch, in_channels,
                           params, macs, params, macs, configuration=configuration)

    progress.stage("compress", f"compressed network for {folder.parent.name} "
                               f"(ratio {spec.ratio:g}, {spec.policy})")
    if compressed_folder is not None:
        from TuckerSegLib.models.compressed_file import load_compressed

        model = load_compressed(compressed_folder)
    else:
        from TuckerSegLib.compression.cache import get_compressed_model

        model = get_compressed_model(folder, spec, fold=folds[0], cache_dir=cache_dir,
                                     checkpoint_name=checkpoint_name, progress=progress)
    network = model.network.eval()
    manifest = model.manifest or {}
    if "NoMirroring" in model.trainer_name:
        mirroring = None  # what these trainers store; saves reading the original checkpoint
    else:
        mirroring = load_checkpoint(folder / f"fold_{folds[0]}" / checkpoint_name).get(
            "inference_allowed_mirroring_axes")
    patch = tuple(int(p) for p in model.patch_size)
    report = manifest.get("report", {})
    if "original" in report and "compressed" in report:
        params0, macs0 = int(report["original"]["params"]), int(report["original"]["macs"])
        params, macs = int(report["compressed"]["params"]), int(report["compressed"]["macs"])
    else:
        cost = count_cost(network, (1, model.num_input_channels, *patch))
        params0 = params = int(cost.params)
        macs0 = macs = int(cost.macs)
    return LoadedModel(network, [network.state_dict()], plans_manager,
                       plans_manager.get_configuration(model.configuration), dataset_json,
                       model.trainer_name, mirroring, patch, model.num_input_channels,
                       params, macs, params0, macs0, manifest, configuration=model.configuration)


def original_cost(network: nn.Module, input_shape: Sequence[int], cache: Path) -> Tuple[int, int]:
    """``(params, MACs per patch)`` of an original network, counted once per architecture and
    input shape and kept in the model's cache folder.

    Why: counting traces the network (0.1-0.3 s of a warm start of a full-width 3 mm network on
    2 cores) to print the same two numbers every run. A cache that cannot be written only means
    counting again next time."""
    key = hashlib.sha256(f"{network!r}|{tuple(int(s) for s in input_shape)}".encode()).hexdigest()[:24]
    known = read_json(cache / COSTS_FILE).get(key)
    if isinstance(known, list) and len(known) == 2 and all(isinstance(v, int) for v in known):
        return known[0], known[1]
    cost = count_cost(network, input_shape)
    counted = (int(cost.params), int(cost.macs))
    try:
        merge_json(cache / COSTS_FILE, {key: list(counted)})
    except OSError:
        pass
    return counted
