"""TotalSegmentator's installed weights: where they are, which task needs which, getting them.

Why: ``tuckerseg segment`` must find the same weights TotalSegmentator uses (``$TOTALSEG_HOME_DIR``,
``$TOTALSEG_WEIGHTS_PATH``), let TotalSegmentator's own downloader fetch missing ones when online,
and say in one line what to do when offline. Everything defers to TotalSegmentator's own config
(``get_weights_dir``, ``TASK_CONFIGS``, ``TASK_ID_WEIGHTS_CONFIGS``) so that both agree.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from TuckerSegLib.errors import InputError, WeightsMissingError

PLANS = "nnUNetPlans"
CONFIGURATION = "3d_fullres"
CHECKPOINT = "checkpoint_final.pth"


@dataclass(frozen=True)
class TaskModels:
    """The nnU-Net models one TotalSegmentator task (and mode) runs, in order."""

    task: str
    dataset_ids: tuple
    trainer: str
    plans: str = PLANS
    configuration: str = CONFIGURATION


def weights_dir() -> Path:
    """TotalSegmentator's weights folder (nnU-Net results root), as TotalSegmentator resolves it."""
    from totalsegmentator.config import get_weights_dir

    return Path(get_weights_dir())


def task_models(task: str = "total", fast: bool = False, fastest: bool = False) -> TaskModels:
    """Dataset ids and trainer of a task, read from TotalSegmentator's own task table."""
    from totalsegmentator.map_tasks_config import TASK_CONFIGS
    from totalsegmentator.python_api import get_task_config

    if task not in TASK_CONFIGS:
        raise InputError(f"unknown task {task!r}; TotalSegmentator's tasks include: "
                         f"{', '.join(sorted(TASK_CONFIGS)[:12])}, ...")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            cfg = get_task_config(task, fast=fast, fastest=fastest, quiet=True)
    except ValueError as exc:  # e.g. "task X does not work with option --fast"
        raise InputError(str(exc)) from None
    ids = cfg["task_id"]
    ids = tuple(ids) if isinstance(ids, (list, tuple)) else (ids,)
    return TaskModels(task=task, dataset_ids=ids, trainer=cfg["trainer"],
                      plans=cfg.get("plans") or PLANS, configuration=cfg.get("model") or CONFIGURATION)


def task_modality(task: str) -> str:
    """"CT" or "MR": the images a TotalSegmentator task segments, by its own registry where it has
    one (recent versions), else by its naming rule (MR tasks end in ``_mr``)."""
    try:
        from totalsegmentator.registry import task_modality as registry_modality
    except ImportError:
        return "MR" if task.endswith("_mr") else "CT"
    return registry_modality(task)


def dataset_folder_name(dataset_id: int) -> str:
    """The folder name TotalSegmentator downloads a dataset id into."""
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS

    info = TASK_ID_WEIGHTS_CONFIGS.get(dataset_id)
    if info is None:
        raise InputError(f"dataset {dataset_id} is not a TotalSegmentator model")
    name = info["foldername"]
    if info.get("rel_path"):
        name = str(Path(info["rel_path"]) / name)
    return name


def model_folder(dataset_id: int, trainer: Optional[str] = None, plans: str = PLANS,
                 configuration: str = CONFIGURATION, root: Optional[Path] = None) -> Path:
    """nnU-Net results folder of a model: ``<root>/DatasetXXX_.../<trainer>__<plans>__<config>``.

    Same layout as nnunetv2's ``get_output_folder``; the dataset folder is the one TotalSegmentator
    downloads (or, if another ``DatasetXXX_*`` folder is present, that one, as nnU-Net would find).
    """
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

    root = Path(root) if root is not None else weights_dir()
    if trainer is None:
        trainer = _default_trainer(dataset_id)
    name = dataset_folder_name(dataset_id)
    if not (root / name).exists():
        found = sorted(root.glob(f"Dataset{dataset_id:03d}_*")) if root.exists() else []
        if found:
            name = found[0].name
    return root / name / convert_trainer_plans_config_to_identifier(trainer, plans, configuration)


def _default_trainer(dataset_id: int) -> str:
    from totalsegmentator.map_tasks_config import TASK_CONFIGS

    for cfg in TASK_CONFIGS.values():
        modes = cfg["sub_modes"].values() if "sub_modes" in cfg else [cfg]
        for mode in modes:
            ids = mode.get("task_id")
            ids = ids if isinstance(ids, list) else [ids]
            if dataset_id in ids and mode.get("trainer"):
                return mode["trainer"]
    raise InputError(f"no trainer known for dataset {dataset_id}")


def weights_present(dataset_id: int, trainer: Optional[str] = None, fold: int = 0,
                    root: Optional[Path] = None) -> bool:
    """Whether the model folder holds plans, dataset.json and the fold's final checkpoint."""
    folder = model_folder(dataset_id, trainer, root=root)
    return all((folder / f).is_file() for f in ("plans.json", "dataset.json", f"fold_{fold}/{CHECKPOINT}"))


def _missing_message(ids: Sequence[int], root: Path, reason: str = "") -> str:
    names = ", ".join(str(i) for i in ids)
    why = f" ({reason})" if reason else ""
    return (f"TotalSegmentator weights for dataset(s) {names} are not in {root} and could not be "
            f"downloaded{why}; download the zip file(s) on a machine with internet access "
            f"(https://github.com/wasserth/TotalSegmentator/releases) and import each with "
            f"`totalseg_import_weights -i FILE.zip`, or point TOTALSEG_WEIGHTS_PATH / "
            f"TOTALSEG_HOME_DIR at a folder that has them")


def ensure_weights(dataset_ids: Iterable[int], allow_download: bool = True,
                   trainers: Optional[Dict[int, str]] = None) -> List[Path]:
    """Make sure the models exist; download missing ones with TotalSegmentator's own downloader.

    Returns the model folders. Raises ``WeightsMissingError`` (one line naming the folder and how
    to import weights) when a model is missing and cannot be downloaded.
    """
    ids = list(dataset_ids)
    trainers = trainers or {}
    root = weights_dir()
    missing = [i for i in ids if not weights_present(i, trainers.get(i))]
    if missing and allow_download:
        from totalsegmentator.config import setup_nnunet
        from totalsegmentator.libs import download_pretrained_weights

        setup_nnunet()
        for i in missing:
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    download_pretrained_weights(i)
            except Exception as exc:  # offline, proxy, HTTP error: all mean "not available"
                raise WeightsMissingError(
                    _missing_message(missing, root, f"{type(exc).__name__}: "
                                                    f"{' '.join(str(exc).split())[:120]}")) from None
        missing = [i for i in ids if not weights_present(i, trainers.get(i))]
    if missing:
        raise WeightsMissingError(_missing_message(missing, root))
    return [model_folder(i, trainers.get(i)) for i in ids]


def installed_tasks(root: Optional[Path] = None) -> Dict[str, List[int]]:
    """TotalSegmentator tasks/modes whose weights are all present, e.g. {"total --fast": [297]}."""
    from totalsegmentator.map_tasks_config import TASK_CONFIGS

    root = Path(root) if root is not None else weights_dir()
    found: Dict[str, List[int]] = {}
    for task, cfg in TASK_CONFIGS.items():
        modes = cfg["sub_modes"].items() if "sub_modes" in cfg else [("default", cfg)]
        for mode, mcfg in modes:
            ids = mcfg.get("task_id")
            if ids is None:
                continue
            ids = list(ids) if isinstance(ids, list) else [ids]
            trainer = mcfg.get("trainer")
            try:
                ok = all(weights_present(i, trainer, root=root) for i in ids)
            except InputError:
                ok = False
            if ok:
                found[task if mode == "default" else f"{task} --{mode}"] = ids
    return found
