"""``tuckerseg finetune`` as a Python API: model in, distilled compressed-model folder out.

Why a separate module: the command line, the benchmark and the tests all need the same chain:
resolve teacher and student, preprocess the CTs, (data-aware) compress, distil, write a
compressed-model folder that ``segment``, ``info`` and the Slicer module load like any other.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union


from TuckerSegLib.compression.compress import CompressionData, compress_model
from TuckerSegLib.compression.quality_curve import register_distilled
from TuckerSegLib.models.compressed_file import CompressionResult
from TuckerSegLib.network.surgery import factorise_structure
from TuckerSegLib.specs import CompressionSpec
from TuckerSegLib.errors import InputError, ModelError
from TuckerSegLib.finetune.distill import DistillConfig, distill, list_checkpoints
from TuckerSegLib.compression.ct_patches import Augment, PatchSampler, labelled_dataset, network_stride, preprocess
from TuckerSegLib.models.nnunet_folder import DEFAULT_CHECKPOINT, NnUNetModel, load_model_folder
from TuckerSegLib.progress import NullProgress, Progress
from TuckerSegLib.devices import torch_device

PathLike = Union[str, Path]


def totalseg_model_folder(dataset_id: int) -> Path:
    """The nnU-Net folder of a TotalSegmentator dataset id in TotalSegmentator's weights folder."""
    from totalsegmentator.config import get_weights_dir

    root = Path(get_weights_dir())
    found = sorted(root.glob(f"Dataset{dataset_id:03d}_*/*__*__3d_fullres")) if root.is_dir() else []
    if not found:
        raise ModelError(f"TotalSegmentator model {dataset_id} is not installed in {root} "
                         f"(run TotalSegmentator once with network access, or import its weights)")
    return found[0]


def resolve_model(model: PathLike) -> Path:
    """A model argument (folder, or TotalSegmentator dataset id such as ``291`` / ``Dataset291``)."""
    text = str(model)
    digits = text[len("Dataset"):] if text.startswith("Dataset") else text
    if not Path(text).exists() and digits.isdigit():
        return totalseg_model_folder(int(digits))
    path = Path(text)
    if not path.exists():
        raise ModelError(f"model not found: {text} (give an nnU-Net model folder, a compressed-model "
                         f"folder or a TotalSegmentator dataset id)")
    return path


def load_teacher_and_student(model: PathLike, fold: Union[int, str] = 0,
                             checkpoint_name: str = DEFAULT_CHECKPOINT
                             ) -> Tuple[NnUNetModel, Optional[NnUNetModel]]:
    """``(teacher, student or None)``: a compressed-model folder brings its own student and
    names its teacher (``manifest.source``); an nnU-Net folder is only the teacher."""
    from TuckerSegLib.models.compressed_file import is_compressed_folder, load_compressed

    folder = resolve_model(model)
    if is_compressed_folder(folder):
        student = load_compressed(folder)
        src = student.manifest["source"]
        teacher_dir = Path(src["folder"])
        if not teacher_dir.is_dir():
            raise ModelError(f"the original model of {folder} is not available at {teacher_dir}; "
                             f"distillation needs it as the teacher")
        return load_model_folder(teacher_dir, src.get("fold", 0), src.get("checkpoint", DEFAULT_CHECKPOINT)), student
    return load_model_folder(folder, fold, checkpoint_name), None


def _read_run_info(work_dir: Path) -> dict:
    checkpoints = list_checkpoints(work_dir)
    if not checkpoints:
        raise InputError(f"--resume: no checkpoint in {work_dir}")
    return json.loads((checkpoints[-1] / "state.json").read_text()).get("run_info", {})


def default_work_dir(output: Path) -> Path:
    output = Path(output)
    return output.parent / f".{output.name}.finetune-work"


PHANTOM_SEED0 = 7_000  # phantom seeds of the transfer set: PHANTOM_SEED0 + i (the demo uses others)


def phantom_cts(folder: Path, count: int, seed0: int = PHANTOM_SEED0) -> List[Path]:
    """``count`` synthetic phantom CTs (``compression.phantom``) written as NIfTI into ``folder``."""
    from TuckerSegLib.compression.phantom import make_phantom, write_phantom

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for seed in range(seed0, seed0 + count):
        path = folder / f"phantom_{seed}.nii.gz"
        if not path.is_file():
            write_phantom(make_phantom(seed), path)
        out.append(path)
    return out


def finetune(model: PathLike, images: Sequence[PathLike], output: PathLike,
             spec: Optional[CompressionSpec] = None, config: Optional[DistillConfig] = None,
             device: str = "auto", labels_dir: Optional[PathLike] = None, resume: bool = False,
             work_dir: Optional[PathLike] = None, init: str = "calibrated",
             val_images: Sequence[PathLike] = (), val_patches: int = 4,
             fold: Union[int, str] = 0, checkpoint_name: str = DEFAULT_CHECKPOINT,
             progress: Optional[Progress] = None, phantoms: int = 0, augment: bool = False,
             crop: Optional[Sequence[int]] = None) -> dict:
    """Distil a compressed student from its original and write ``output`` (a compressed-model folder).

    ``init`` is how a new student is made from an nnU-Net folder: ``calibrated`` (data-aware factors
    from the same CTs) or ``hosvd``. ``labels_dir`` (an nnU-Net raw dataset) adds nnU-Net's Dice+CE
    loss on its labelled cases. The transfer set is ``images`` plus ``phantoms`` synthetic phantom
    CTs, optionally augmented (``augment``); the teacher labels all of it. ``crop`` is the training
    patch (default: the model's patch; smaller crops change what InstanceNorm sees). Agreement is
    measured on ``val_patches`` patches (the model's patch size) of ``val_images`` (held out), else
    of the training CTs. Returns the summary that is also stored as the report's ``finetune``; its
    ``validation`` is the validated agreement.
    """
    from TuckerSegLib.compression.calibration import collect_stats
    from TuckerSegLib.finetune.plots import save_loss_curve
    from TuckerSegLib.models.compressed_file import save_compressed

    progress = progress or NullProgress()
    config = config or DistillConfig()
    if labels_dir is not None and config.recipe == "fast":
        raise InputError("--labels trains on labelled patches, which the fast recipe does not cache; "
                         "add --recipe classic")
    if init not in ("calibrated", "hosvd"):
        raise InputError(f"unknown init {init!r}; use calibrated or hosvd")
    output = Path(output)
    if output.exists() and not (output / "manifest.json").is_file():
        if not output.is_dir() or any(output.iterdir()):
            raise InputError(f"output {output} exists and is not a compressed-model folder; not overwriting it")
    work = Path(work_dir) if work_dir else default_work_dir(output)
    dev = torch_device(device)
    t0 = time.perf_counter()

    progress.stage("load", f"loading {model}")
    teacher, student_model = load_teacher_and_student(model, fold, checkpoint_name)
    if student_model is None and spec is None and not resume:
        raise InputError("--ratio is needed to compress an nnU-Net model folder")

    progress.stage("preprocess", "preprocessing CTs with nnU-Net's preprocessor")
    images = list(images or [])
    user_cts = [Path(p).name for p in images]
    if phantoms < 0:
        raise InputError("--phantoms must be 0 or more")
    if phantoms:
        progress.stage("phantoms", f"writing {phantoms} synthetic phantom CTs")
        images += phantom_cts(work / "phantoms", phantoms)
    label_files: List[Optional[Path]] = [None] * len(images)
    if labels_dir is not None:
        li, ll = labelled_dataset(labels_dir)
        images += li
        label_files += ll
    if not images:
        raise InputError("no CT given (-i CT [CT ...], --phantoms N or --labels DATASET_DIR)")
    cases = preprocess(teacher, images, label_files, progress=progress)
    val_cases = preprocess(teacher, list(val_images), progress=progress) if val_images else cases
    # The model's patch by default: nnU-Net's InstanceNorms normalise over the whole input, so the
    # original's answers on a smaller crop are not its answers in context (on the trained full-width
    # 297 network, half-patch crops agreed 0.03 mean Dice with the same voxels predicted in a whole
    # patch), and a student trained on them learns another function than the one it replaces.
    crop = tuple(int(c) for c in (teacher.patch_size if crop is None else crop))
    stride = network_stride(teacher.network, len(teacher.patch_size))
    if len(crop) != len(teacher.patch_size) or min(crop) < 1 or any(c % s for c, s in zip(crop, stride)):
        raise InputError(f"--crop needs {len(teacher.patch_size)} positive multiples of the network's stride "
                         f"{'x'.join(map(str, stride))}, got {'x'.join(map(str, crop))}")
    aug = Augment() if augment else None
    sampler = PatchSampler(cases, crop, seed=config.seed,
                           foreground=0.33 if labels_dir is not None else 0.0, augment=aug)
    val = PatchSampler(val_cases, teacher.patch_size).fixed_patches(val_patches, seed=config.seed + 10_000) \
        if val_patches > 0 else None

    if resume:
        info = _read_run_info(work)
        names = [Path(p).name for p in images]
        if info.get("data") and info["data"] != names:
            progress.log(f"warning: resuming with other CTs than the run started with "
                         f"({', '.join(info['data'])}); the loss curve will not continue smoothly")
        student = factorise_structure(copy.deepcopy(teacher.network), info["layer_ranks"])
        layer_ranks, report = info["layer_ranks"], info["report"]
    elif student_model is not None:
        student = student_model.network
        layer_ranks = student_model.manifest["layers"]
        report = copy.deepcopy(student_model.manifest["report"])
        report.pop("finetune", None)
    else:
        calibration = None
        if init == "calibrated":
            progress.stage("calibrate", "activation statistics for data-aware factors")
            patches = PatchSampler(cases, teacher.patch_size, seed=config.seed + 20_000).sample(
                max(4, 2 * len(cases)))[0]
            calibration = collect_stats(teacher.network.to(dev), patches, device=dev,
                                        sources=[Path(p).name for p in images], progress=progress)
            teacher.network.to("cpu")
        progress.stage("compress", f"compressing ({spec.policy}, ratio {spec.ratio:g})")
        data = CompressionData(calibration=calibration) if calibration is not None else None
        result = compress_model(teacher, spec, data, progress=progress)
        student, layer_ranks, report = result.network, result.layer_ranks, result.report

    progress.stage("distill", f"distilling for up to {config.steps} steps on {dev} ({config.recipe} recipe)")
    res = distill(teacher.network, student, sampler, config, work, device=dev, resume=resume,
                  val_patches=val, progress=progress, started_at=t0,
                  run_info={"layer_ranks": layer_ranks, "report": report,
                            "data": [Path(p).name for p in images]})
    held_out = bool(val_images)
    summary = {
        "steps": res.steps,
        "stopped": res.stopped,
        "recipe": config.recipe,
        "loss_curve": [round(v, 6) for v in res.loss_curve],
        "teacher": {"folder": str(teacher.folder.resolve()), "fold": teacher.fold,
                    "checkpoint": teacher.checkpoint_path.name},
        "data": [Path(p).name for p in images],
        "transfer_set": {"cts": user_cts, "phantoms": phantoms,
                         "phantom_seeds": [PHANTOM_SEED0, PHANTOM_SEED0 + phantoms] if phantoms else None,
                         "labelled_cases": len(images) - len(user_cts) - phantoms,
                         "augmentation": aug.as_dict() if aug is not None else None,
                         "crop": list(crop), "teacher_cache": res.extra.get("teacher_cache")},
        "labels": str(labels_dir) if labels_dir is not None else None,
        # The validated agreement: mean Dice of the student's argmax against the original's, over
        # the foreground classes either finds, on ``patches`` patches of ``patch_size`` from
        # ``data`` (``held_out``: CTs not trained on), in float32.
        "validation": {"data": [Path(p).name for p in val_images] or "training CTs",
                       "held_out": held_out, "patches": len(val) if val is not None else 0,
                       "patch_size": list(teacher.patch_size),
                       "measure": "mean Dice of argmax vs the original over classes present, float32",
                       "before": res.agreement_before, "after": res.agreement_after,
                       # the student saved is the best measured: ``after`` is its agreement,
                       # ``last`` the last step's (they differ where training made it worse)
                       "kept_step": res.extra.get("kept_step"), "last": res.extra.get("last_agreement")},
        "agreement_curve": res.agreement_curve,
        "config": asdict(config),
        "init": "compressed folder" if student_model is not None else init,
        "device": str(dev),
        "precision": res.extra.get("precision"),
        "compiled": res.extra.get("compiled"),
        "steps_per_second": res.extra.get("steps_per_second"),
        "cpu_seconds_per_step": res.extra.get("cpu_seconds_per_step"),
        "train_seconds": res.extra.get("train_seconds"),
        "resumed_from": res.resumed_from,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    progress.stage("save", f"writing {output}")
    student.to("cpu").eval()
    final_report = {**report, "finetune": summary}
    save_compressed(output, teacher, CompressionResult(student, layer_ranks, final_report))
    save_loss_curve(res.loss_curve, output / "loss_curve.png",
                    title=f"distillation loss ({teacher.folder.name})")
    # offered to quality targets (segment --min-agreement), which validate it on their own patches
    register_distilled(teacher.folder, output)
    return summary
