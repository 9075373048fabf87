"""CTs -> the arrays the network sees, and random training patches from them.

Why: distillation and calibration must feed the network what nnU-Net's predictor feeds it, or the
compressed network is tuned to the wrong input distribution. So each CT goes through nnU-Net's own
preprocessor (the plans' class, normally ``DefaultPreprocessor``) ``run_case`` with the model's plans, configuration and dataset.json (reader
class from the plans, transpose, crop to non-zero, resampling to the model spacing,
CTNormalization). Patches of the model's patch size are then drawn the way nnU-Net's trainer does
(random position, zero padding when the volume is smaller, optionally forced onto foreground).
"""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from TuckerSegLib.errors import InputError
from TuckerSegLib.models.nnunet_folder import NnUNetModel, plans_manager
from TuckerSegLib.progress import NullProgress, Progress

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def check_ct(path: Union[str, Path]) -> Path:
    """An existing, readable, finite, non-constant 3-D NIfTI CT in Hounsfield units, or a one-line
    ``InputError``.

    The checks are the pipeline's (``inputs.check_input``, ``inputs.check_modality``); nnU-Net's
    reader would fail on bad files deep inside, with tracebacks that do not name the problem, and
    an MR image would pass silently as calibration or validation data of a CT network. DICOM
    folders are refused here because the model's NIfTI reader preprocesses the training data.
    """
    from TuckerSegLib.inputs import check_input, check_modality

    checked = check_input(path)
    if checked.kind != "nifti":
        raise InputError(f"{checked.path} is a DICOM folder; convert it to NIfTI (.nii.gz) for "
                         f"calibration and fine-tuning")
    check_modality(checked, "CT", "calibrating, validating or fine-tuning a CT network")
    return checked.path


@dataclass
class Case:
    """One preprocessed CT: ``data`` (channels, x, y, z) float32, ``seg`` (1, x, y, z) or None."""

    name: str
    data: np.ndarray
    seg: Optional[np.ndarray] = None

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.data.shape[1:])


def case_name(path: Union[str, Path]) -> str:
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES[::-1]:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def preprocess(model: NnUNetModel, images: Sequence[Union[str, Path]],
               labels: Optional[Sequence[Optional[Union[str, Path]]]] = None,
               progress: Optional[Progress] = None) -> List[Case]:
    """Preprocess CTs (one channel each; ``labels`` optional, aligned with ``images``)."""
    progress = progress or NullProgress()
    if not images:
        raise InputError("no CT given")
    if model.num_input_channels != 1:
        raise InputError(f"the model takes {model.num_input_channels} input channels; only "
                         f"single-channel (CT) models are supported")
    labels = list(labels) if labels is not None else [None] * len(images)
    paths = [check_ct(p) for p in images]
    pm = plans_manager(model.plans)
    cm = pm.get_configuration(model.configuration)
    pre = cm.preprocessor_class(verbose=False)  # DefaultPreprocessor unless the plans name another
    cases = []
    for i, (path, lab) in enumerate(zip(paths, labels)):
        progress.update((i + 0.5) / len(paths), f"preprocessing {path.name}")
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                data, seg, _ = pre.run_case([str(path)], str(lab) if lab else None, pm, cm,
                                            model.dataset_json)
        except Exception as exc:  # nnU-Net's reader / resampler: name the file
            raise InputError(f"cannot preprocess {path}: {type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:160]}") from None
        data = np.ascontiguousarray(data, dtype=np.float32)
        if not np.isfinite(data).all():
            raise InputError(f"{path} gives non-finite values after nnU-Net's normalisation")
        cases.append(Case(case_name(path), data,
                          # without a label file nnU-Net still returns a crop mask as "seg": drop it
                          np.ascontiguousarray(seg, dtype=np.int16) if lab and seg is not None else None))
    return cases


def labelled_dataset(dataset_dir: Union[str, Path]) -> Tuple[List[Path], List[Path]]:
    """``(images, labels)`` of an nnU-Net raw dataset folder (``imagesTr``/``labelsTr``)."""
    root = Path(dataset_dir)
    if not (root / "imagesTr").is_dir() or not (root / "labelsTr").is_dir():
        raise InputError(f"{root} is not an nnU-Net dataset folder (imagesTr/ and labelsTr/ needed)")
    ending = ".nii.gz"
    if (root / "dataset.json").is_file():
        try:
            ending = json.loads((root / "dataset.json").read_text()).get("file_ending", ending)
        except json.JSONDecodeError:
            raise InputError(f"{root / 'dataset.json'} is not valid JSON") from None
    images, labels = [], []
    for lab in sorted((root / "labelsTr").glob(f"*{ending}")):
        case = lab.name[: -len(ending)]
        extra = sorted((root / "imagesTr").glob(f"{case}_0001{ending}"))
        if extra:
            raise InputError(f"case {case} in {root} has more than one channel; only CT models are supported")
        img = root / "imagesTr" / f"{case}_0000{ending}"
        if not img.is_file():
            raise InputError(f"{root}: label {lab.name} has no image {img.name}")
        images.append(img)
        labels.append(lab)
    if not images:
        raise InputError(f"{root}/labelsTr holds no {ending} label files")
    return images, labels


@dataclass(frozen=True)
class Augment:
    """Intensity and geometry augmentation of unlabelled training patches (a transfer set).

    The teacher labels whatever the student sees, so augmented patches need no labels; they only
    need to stay near the CTs the model will meet. Per patch: a zoom in ``zoom`` (a crop of
    ``patch / zoom`` voxels resampled trilinearly to the patch), optional flips along ``flip_axes``,
    then on the normalised intensities ``x * scale + shift`` (scale in ``1 +- scale``, shift in
    ``+- shift``) and Gaussian noise of standard deviation up to ``noise``.
    """

    zoom: Tuple[float, float] = (0.85, 1.15)
    flip_axes: Tuple[int, ...] = ()
    scale: float = 0.1
    shift: float = 0.1
    noise: float = 0.05

    def as_dict(self) -> dict:
        return {"zoom": list(self.zoom), "flip_axes": list(self.flip_axes), "scale": self.scale,
                "shift": self.shift, "noise": self.noise}


class ResumableRng:
    """A sampler whose draws resume where a checkpoint left them: ``state`` is its numpy
    generator's state, JSON-serialisable (``self.rng`` is set by the sampler)."""

    rng: np.random.Generator

    @property
    def state(self) -> dict:
        return self.rng.bit_generator.state

    @state.setter
    def state(self, value: dict) -> None:
        self.rng.bit_generator.state = value


class PatchSampler(ResumableRng):
    """Random patches of ``patch_size`` from preprocessed cases; resumable through ``state``.

    A fraction ``foreground`` of patches is centred on a random labelled voxel where the case
    has labels (as nnU-Net's trainer oversamples foreground); the others are placed uniformly.
    Volumes smaller than the patch are zero padded (nnU-Net pads with 0 after normalisation too).
    With ``augment`` (unlabelled cases only) each patch is zoomed, flipped and its intensities
    varied as ``Augment`` says; every random choice comes from the sampler's own generator.
    """

    def __init__(self, cases: Sequence[Case], patch_size: Sequence[int], seed: int = 0,
                 foreground: float = 0.0, augment: Optional[Augment] = None):
        if not cases:
            raise InputError("no preprocessed CT to sample patches from")
        self.cases = list(cases)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.foreground = float(foreground)
        self.augment = augment
        self.rng = np.random.default_rng(seed)
        self._fg: Dict[int, np.ndarray] = {}

    # -- sampling ---------------------------------------------------------------------------
    def _foreground_voxels(self, i: int) -> np.ndarray:
        if i not in self._fg:
            seg = self.cases[i].seg
            fg = np.argwhere(seg[0] > 0) if seg is not None else np.zeros((0, 3), dtype=np.int64)
            if len(fg) > 100_000:  # a subsample is enough to pick centres from
                fg = fg[np.random.default_rng(i).choice(len(fg), 100_000, replace=False)]
            self._fg[i] = fg
        return self._fg[i]

    def _corner(self, i: int) -> Tuple[int, ...]:
        shape = self.cases[i].shape
        fg = self._foreground_voxels(i) if self.foreground > 0 else None
        if fg is not None and len(fg) and self.rng.random() < self.foreground:
            centre = fg[self.rng.integers(len(fg))]
            lo = [int(c) - p // 2 for c, p in zip(centre, self.patch_size)]
        else:
            lo = [int(self.rng.integers(min(0, s - p), max(0, s - p) + 1))
                  for s, p in zip(shape, self.patch_size)]
        # keep as much of the patch inside the volume as possible
        return tuple(int(np.clip(l, min(0, s - p), max(0, s - p)))
                     for l, s, p in zip(lo, shape, self.patch_size))

    def crop(self, i: int, corner: Sequence[int]) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """The patch of case ``i`` at ``corner`` (may lie partly outside: zero padded)."""
        case = self.cases[i]
        src, dst = [], []
        for c, s, p in zip(corner, case.shape, self.patch_size):
            a, b = max(c, 0), min(c + p, s)
            src.append(slice(a, b))
            dst.append(slice(a - c, b - c))
        x = np.zeros((case.data.shape[0], *self.patch_size), dtype=np.float32)
        x[(slice(None), *dst)] = case.data[(slice(None), *src)]
        y = None
        if case.seg is not None:
            y = np.zeros((1, *self.patch_size), dtype=np.int16)
            y[(slice(None), *dst)] = np.maximum(case.seg[(slice(None), *src)], 0)  # -1 (outside crop) -> 0
        return x, y

    def _augmented(self, i: int) -> Tuple[np.ndarray, None]:
        """One augmented patch of case ``i`` (zoom, flips, intensity, noise)."""
        aug, rng, target = self.augment, self.rng, self.patch_size
        zoom = float(rng.uniform(*aug.zoom))
        size = tuple(max(2, int(round(p / zoom))) for p in target)
        saved, self.patch_size = self.patch_size, size
        try:
            x, _ = self.crop(i, self._corner(i))
        finally:
            self.patch_size = saved
        t = torch.from_numpy(x)[None]
        if size != target:
            t = torch.nn.functional.interpolate(t, size=target, mode="trilinear", align_corners=False)
        flips = [a + 2 for a in aug.flip_axes if rng.random() < 0.5]
        if flips:
            t = torch.flip(t, flips)
        scale = 1.0 + float(rng.uniform(-aug.scale, aug.scale))
        shift = float(rng.uniform(-aug.shift, aug.shift))
        t = t * scale + shift
        if aug.noise > 0:
            sigma = float(rng.uniform(0, aug.noise))
            noise = np.random.default_rng(int(rng.integers(2 ** 63))).standard_normal(t.shape, dtype=np.float32)
            t = t + sigma * torch.from_numpy(noise)
        return np.ascontiguousarray(t[0].numpy(), dtype=np.float32), None

    def sample(self, batch_size: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(images (B, C, *patch), labels (B, 1, *patch) or None)``."""
        xs, ys = [], []
        for _ in range(batch_size):
            i = int(self.rng.integers(len(self.cases)))
            if self.augment is not None and self.cases[i].seg is None:
                xs.append(self._augmented(i)[0])
                ys.append(None)
                continue
            x, y = self.crop(i, self._corner(i))
            xs.append(x)
            ys.append(y)
        labels = None if any(y is None for y in ys) else torch.from_numpy(np.stack(ys).astype(np.int64))
        return torch.from_numpy(np.stack(xs)), labels

    def fixed_patches(self, count: int, seed: int = 12345) -> torch.Tensor:
        """``count`` patches drawn with their own generator (held-out / calibration sets), never
        augmented."""
        saved, saved_aug = self.rng, self.augment
        self.rng, self.augment = np.random.default_rng(seed), None
        try:
            return self.sample(count)[0]
        finally:
            self.rng, self.augment = saved, saved_aug


def network_stride(network: torch.nn.Module, ndim: int = 3) -> Tuple[int, ...]:
    """Total downsampling of a U-Net encoder per axis (product of its stage strides); 1s if unknown."""
    strides = getattr(getattr(network, "encoder", None), "strides", None)
    total = [1] * ndim
    for s in strides or []:
        s = [int(s)] * ndim if np.isscalar(s) else [int(v) for v in s]
        total = [a * b for a, b in zip(total, s)]
    return tuple(total)
