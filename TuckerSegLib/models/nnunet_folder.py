"""nnU-Net v2 trained-model folders: plans, dataset.json, fold checkpoints -> a network.

The layout is nnU-Net's (``<folder>/{plans.json, dataset.json, fold_N/checkpoint_final.pth}``),
which is also how TotalSegmentator stores its weights. Plans in the old (v1-style) format that
TotalSegmentator ships are converted by nnU-Net's own ``PlansManager``; the network is built by
the trainer class named in the checkpoint, exactly as nnU-Net's predictor does.
"""
from __future__ import annotations

import inspect
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

from torch import nn

from TuckerSegLib.errors import ModelError
from TuckerSegLib.models.checkpoint import file_fingerprint, file_sha256, load_checkpoint

DEFAULT_CHECKPOINT = "checkpoint_final.pth"

# TotalSegmentator ships old-format plans on purpose; nnU-Net converts them and warns each time.
warnings.filterwarnings("ignore", message="Detected old nnU-Net plans format")


@dataclass
class NnUNetModel:
    """A loaded nnU-Net model: the network (eval mode, CPU) and what is needed to run and name it."""

    network: Optional[nn.Module]  # None: loaded without it (``load_model_folder(with_network=False)``)
    plans: dict
    dataset_json: dict
    configuration: str
    patch_size: Tuple[int, ...]
    num_input_channels: int
    num_classes: int
    label_names: Dict[int, str]
    trainer_name: str
    folder: Path
    fold: Union[int, str]
    checkpoint_path: Path
    manifest: Optional[dict] = None  # set for compressed-model folders (TuckerSegLib.models.compressed_file)

    @property
    def source_fingerprint(self) -> str:
        return file_fingerprint(self.checkpoint_path)

    def source_sha256(self) -> str:
        return file_sha256(self.checkpoint_path)


def _read_json(path: Path) -> dict:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise ModelError(f"not an nnU-Net model folder: {path.name} missing in {path.parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} does not hold a JSON object")
    return data


def label_names_from_dataset_json(dataset_json: dict) -> Dict[int, str]:
    """``{label id: name}`` from new-style (name -> id) or old-style (id -> name) ``labels``."""
    labels = dataset_json.get("labels", {})
    names: Dict[int, str] = {}
    for key, value in labels.items():
        if isinstance(value, int) or (isinstance(value, str) and value.isdigit() and not str(key).isdigit()):
            names[int(value)] = str(key)
        elif str(key).isdigit():
            names[int(key)] = str(value)
        elif isinstance(value, (list, tuple)):  # region-based labels: first id names the region
            names[int(value[0])] = str(key)
    return names


def plans_manager(plans: dict):
    """nnU-Net's ``PlansManager`` of ``plans`` (old-format plans convert with a warning, silenced)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PlansManager(plans)


def build_network(plans: dict, dataset_json: dict, configuration: str = "3d_fullres",
                  trainer_name: str = "nnUNetTrainer", deep_supervision: bool = False,
                  initialise: bool = True) -> nn.Module:
    """The architecture of a model (untrained), built the way nnU-Net's predictor builds it
    (``deep_supervision=True``: as its trainer builds it for training).

    ``initialise=False`` skips nnU-Net's random initialisation, for a caller that loads every
    weight next (strictly): it saves a fifth of a second per model load. It builds on the CPU with
    ``allow_init=False`` where the trainer uses nnU-Net's own ``build_network_architecture``: not on
    the meta device, whose random initialisers import ``torch._dynamo`` (a second of every run,
    deferred by ``pipeline.lazy_imports``).
    """
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    pm = plans_manager(plans)
    try:
        cm = pm.get_configuration(configuration)
    except (KeyError, RuntimeError) as exc:
        raise ModelError(f"configuration {configuration!r} not in the plans ({exc})") from None
    n_in = determine_num_input_channels(pm, cm, dataset_json)
    n_out = pm.get_label_manager(dataset_json).num_segmentation_heads
    build = _trainer_class(trainer_name).build_network_architecture
    arch = (cm.network_arch_class_name, cm.network_arch_init_kwargs, cm.network_arch_init_kwargs_req_import,
            n_in, n_out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not initialise and build is nnUNetTrainer.build_network_architecture:  # what it calls, minus the init
            return get_network_from_plans(*arch, allow_init=False, deep_supervision=deep_supervision)
        if "plans_manager" in inspect.signature(build).parameters:  # the signature of some nnU-Net versions
            return build(pm, cm, n_in, n_out, enable_deep_supervision=deep_supervision)
        return build(*arch, enable_deep_supervision=deep_supervision)


def _trainer_class(trainer_name: str):
    """nnU-Net's trainer class by name (TotalSegmentator's custom trainers included)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    if trainer_name == "nnUNetTrainer":
        return nnUNetTrainer
    cls = _trainer_class_by_source(trainer_name)
    if cls is not None:
        return cls
    try:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name  # nnunetv2 >= 2.6
        cls = recursive_find_trainer_class_by_name(trainer_name)
    except ImportError:
        import nnunetv2
        from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

        cls = recursive_find_python_class(str(Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"),
                                          trainer_name, "nnunetv2.training.nnUNetTrainer")
    except Exception:
        cls = None
    if cls is None:
        try:  # TotalSegmentator registers a few trainers of its own
            from totalsegmentator import custom_trainers

            cls = getattr(custom_trainers, trainer_name, None)
        except Exception:
            cls = None
    # Trainers that do not override the architecture build it like the base trainer.
    return cls or nnUNetTrainer


def _trainer_class_by_source(trainer_name: str):
    """The trainer class from the one nnU-Net module whose source defines it, or None.

    Why: nnU-Net finds a trainer by importing every trainer module until one has it, 0.67 s of a
    warm case on 2 cores (3 ms here, ``benchmarks/bench_nnunet_speedups.py``); the class a module
    defines is in its text. Anything other than
    exactly one defining module (or a failing import) leaves the search to nnU-Net.
    """
    import importlib
    import re

    import nnunetv2

    root = Path(nnunetv2.__path__[0])
    pattern = re.compile(rf"^class\s+{re.escape(trainer_name)}\s*[(:]", re.MULTILINE)
    found = []
    for path in (root / "training" / "nnUNetTrainer").rglob("*.py"):
        try:
            if pattern.search(path.read_text(encoding="utf-8", errors="ignore")):
                found.append(path)
        except OSError:
            return None
    if len(found) != 1:
        return None
    module = ".".join(("nnunetv2", *found[0].relative_to(root).with_suffix("").parts))
    try:
        return getattr(importlib.import_module(module), trainer_name, None)
    except Exception:
        return None


def _clean_state_dict(state: dict) -> dict:
    """Strip wrappers that torch.compile / DataParallel add to parameter names."""
    out = {}
    for k, v in state.items():
        for prefix in ("_orig_mod.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_model_folder(folder: Union[str, Path], fold: Union[int, str] = 0,
                      checkpoint_name: str = DEFAULT_CHECKPOINT, with_network: bool = True) -> NnUNetModel:
    """Load an nnU-Net trained-model folder; every problem is a one-line ``ModelError``.

    ``with_network=False``: everything but the network (``network`` is None, ``with_weights``
    adds it), for callers that may need only the plans and the checkpoint's identity: the
    checkpoint is memory-mapped and its tensors are not read, and no network is built."""
    folder = Path(folder)
    if not folder.exists():
        raise ModelError(f"model folder not found: {folder}")
    if not folder.is_dir():
        raise ModelError(f"not a folder: {folder}")
    if not (folder / "plans.json").is_file():
        raise ModelError(f"not an nnU-Net model folder (no plans.json): {folder}")
    plans = _read_json(folder / "plans.json")
    dataset_json = _read_json(folder / "dataset.json")
    ckpt_path = folder / f"fold_{fold}" / checkpoint_name
    if not ckpt_path.is_file():
        folds = sorted(p.name for p in folder.glob("fold_*") if (p / checkpoint_name).is_file())
        raise ModelError(f"no {checkpoint_name} for fold {fold} in {folder}"
                         + (f" (available: {', '.join(folds)})" if folds else ""))
    ckpt = load_checkpoint(ckpt_path, mmap=not with_network)
    if "network_weights" not in ckpt:
        raise ModelError(f"{ckpt_path} is not an nnU-Net checkpoint (no network_weights)")
    trainer_name = str(ckpt.get("trainer_name", "nnUNetTrainer"))
    configuration = str((ckpt.get("init_args") or {}).get("configuration", "3d_fullres"))
    network = _network(folder, plans, dataset_json, configuration, trainer_name, ckpt_path, ckpt) \
        if with_network else None
    pm = plans_manager(plans)
    cm = pm.get_configuration(configuration)
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    return NnUNetModel(
        network=network, plans=pm.plans, dataset_json=dataset_json, configuration=configuration,
        patch_size=tuple(int(p) for p in cm.patch_size),
        num_input_channels=determine_num_input_channels(pm, cm, dataset_json),
        num_classes=pm.get_label_manager(dataset_json).num_segmentation_heads,
        label_names=label_names_from_dataset_json(dataset_json), trainer_name=trainer_name,
        folder=folder, fold=fold, checkpoint_path=ckpt_path)


def with_weights(model: NnUNetModel) -> NnUNetModel:
    """``model`` with its network (loaded now where ``load_model_folder(with_network=False)`` left it out)."""
    if model.network is None:
        model.network = load_model_folder(model.folder, model.fold, model.checkpoint_path.name).network
    return model


def _network(folder: Path, plans: dict, dataset_json: dict, configuration: str, trainer_name: str,
             ckpt_path: Path, ckpt: dict) -> nn.Module:
    """The network of ``plans`` with the checkpoint's weights, in eval mode."""
    try:
        network = build_network(plans, dataset_json, configuration, trainer_name, initialise=False)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"cannot build the network from {folder}/plans.json: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    try:
        network.load_state_dict(_clean_state_dict(ckpt["network_weights"]))
    except RuntimeError as exc:
        raise ModelError(f"weights in {ckpt_path} do not match the architecture in plans.json: "
                         f"{str(exc).splitlines()[0]}") from None
    return network.eval()
