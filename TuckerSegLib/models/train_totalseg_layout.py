"""Train a TotalSegmentator-layout network on the shared real CT; write it as a model folder.

Why: a speed-up is judged by the agreement it keeps on a TRAINED network in TotalSegmentator's
layout; random-weight test models and the phantom demo model are not that. This trains one
(dataset 297, ``total --fast``, 3 mm, 118 outputs, by default at half width) on the only labelled
real CT there is: ``example_ct_sm`` (= ``example_ct[:, :, 82:112]``) with TotalSegmentator's own
``example_seg_fast`` labels (ids = ``class_map["total"]`` = dataset 297's output channels).

Split (z = last NIfTI axis of ``example_ct``; import these, never re-derive them):
``TRAIN_SLICES`` 82..101 (20 labelled slices, the only ones the loss sees), ``HELDOUT_SLICES``
102..111 (10 labelled slices, evaluation only), ``UNLABELLED_SLICES`` 0..81 (no labels; for
calibration or distillation, never for evaluation). ``write_part`` writes each as a NIfTI.
The held-out part is the upper end: 27 of its 32 classes also occur in the training slices.

Faithful to nnU-Net where it matters for inference: the plans' preprocessor (``run_case``, as the
predictor runs it), the network built from the plans the way nnU-Net builds it, nnU-Net's
deep-supervised Dice+CE loss, zero padding like its data loader and predictor. The loop itself is
small (Adam or SGD, poly learning rate, random crops with foreground oversampling, intensity
augmentation; bf16 autocast on CUDA). Held-out Dice is computed as nnU-Net's predictor computes a
volume that fits one patch (centred zero padding to the patch, one forward, argmax).

No flips by default: TotalSegmentator's trainers are ``NoMirroring`` because many classes are
left/right pairs; mirroring left-right would teach swapped labels (``--flip-axes`` allows it).

GPU machines without nnU-Net's dependencies: ``--prepare-gpu DIR`` (here) writes the preprocessed
data (``bundle.npz``) and the pure-Python sources of nnunetv2 and dynamic_network_architectures;
there, ``--bundle DIR/bundle.npz`` trains with torch and numpy only (benchmarks/train_reference_gpu.sh).

Usage: ``nice -n 10 python -m TuckerSegLib.models.train_totalseg_layout --out ROOT [--steps N]
[--crop 32x112x128] [--width-scale 0.5] [--export-safetensors DIR --export-dtype fp16]``;
``--import-safetensors DIR --out ROOT`` rebuilds the folder from exported shards.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import pydoc
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from TuckerSegLib.models.checkpoint import file_sha256
from TuckerSegLib.errors import InputError, ModelError
from TuckerSegLib.models.totalseg_archs import DATASET_FOLDERS, class_map, totalseg_plans
from TuckerSegLib.models.totalseg_layout import CONFIGURATION, model_dir, write_model_folder

# -- the data split (z indices of example_ct, half-open ranges) -----------------------------------
LABELLED_SLICES = range(82, 112)    # example_ct_sm / example_seg_fast cover these
TRAIN_SLICES = range(82, 102)       # labelled, the only slices training sees
HELDOUT_SLICES = range(102, 112)    # labelled, evaluation only
UNLABELLED_SLICES = range(0, 82)    # no labels: calibration / distillation input
PARTS: Dict[str, range] = {"train": TRAIN_SLICES, "heldout": HELDOUT_SLICES,
                           "unlabelled": UNLABELLED_SLICES}
DATA_ENV = "TUCKERSEG_TEST_DATA"
CT_FILE = "example_ct.nii.gz"
SEG_FILE = "example_seg_fast.nii.gz"  # labels of LABELLED_SLICES, ids = class_map["total"]

DEFAULT_DATASET = 297
EXPORT_MANIFEST = "tuckerseg_export.json"
EXPORT_FORMAT = 1
BUNDLE_FORMAT = 1
MAX_NONFINITE_STEPS = 5  # skipped steps in a row before training stops as diverged

Log = Callable[[str], None]


def default_data_dir() -> Path:
    """``$TUCKERSEG_TEST_DATA``, else ``shared/data`` beside the checkout (as the tests find it)."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _check_data(data_dir: Path) -> None:
    for name in (CT_FILE, SEG_FILE):
        if not (data_dir / name).is_file():
            raise InputError(f"{name} not found in {data_dir} (set {DATA_ENV} to the shared data folder)")


def write_part(part: str, folder: Path, data_dir: Optional[Path] = None) -> Tuple[Path, Optional[Path]]:
    """Write one part of the split as NIfTI: ``(ct, labels)`` (labels None for ``unlabelled``).

    The CT comes from ``example_ct`` (int16), labels from ``example_seg_fast``; the affine is
    shifted to the first slice, so each part lies where it lies in ``example_ct``. Files are named
    ``example_ct_<part>_z<first>-<last>.nii.gz`` / ``example_seg_fast_<part>_z...``.
    """
    import nibabel as nib

    if part not in PARTS:
        raise InputError(f"unknown part {part!r}; choose from {', '.join(PARTS)}")
    data_dir = Path(data_dir or default_data_dir())
    _check_data(data_dir)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    z = PARTS[part]
    tag = f"{part}_z{z.start}-{z.stop - 1}"
    ct = nib.load(str(data_dir / CT_FILE))
    affine = ct.affine.copy()
    affine[:3, 3] += ct.affine[:3, 2] * z.start
    voxels = np.asanyarray(ct.dataobj)[:, :, z.start:z.stop]
    header = ct.header.copy()
    header.set_data_dtype(np.int16)
    ct_path = folder / f"example_ct_{tag}.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(voxels.astype(np.int16)), affine, header), str(ct_path))
    if part == "unlabelled":
        return ct_path, None
    seg = nib.load(str(data_dir / SEG_FILE))
    k0 = z.start - LABELLED_SLICES.start
    labels = np.asanyarray(seg.dataobj)[:, :, k0:k0 + len(z)].astype(np.uint8)
    seg_header = seg.header.copy()
    seg_header.set_data_dtype(np.uint8)
    seg_path = folder / f"example_seg_fast_{tag}.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(labels), affine, seg_header), str(seg_path))
    return ct_path, seg_path


def write_heldout_ct(folder: Path, data_dir: Optional[Path] = None) -> Tuple[Path, Path]:
    """Held-out CT and its TotalSegmentator labels (evaluation only)."""
    ct, seg = write_part("heldout", folder, data_dir)
    return ct, seg  # type: ignore[return-value]


def write_train_ct(folder: Path, data_dir: Optional[Path] = None) -> Tuple[Path, Path]:
    """Training CT and labels (the network saw these; fine for calibration, not for evaluation)."""
    ct, seg = write_part("train", folder, data_dir)
    return ct, seg  # type: ignore[return-value]


def write_unlabelled_ct(folder: Path, data_dir: Optional[Path] = None) -> Path:
    """Unlabelled CT (z 0..81; never seen in training, no labels): calibration / distillation."""
    return write_part("unlabelled", folder, data_dir)[0]


# -- preprocessed data ---------------------------------------------------------------------------

@dataclass
class Bundle:
    """What training needs, preprocessed: plans, dataset.json, the network's construction and the
    arrays (``(1, z, y, x)`` float32 images, ``(z, y, x)`` uint8 labels in nnU-Net's axis order)."""

    dataset_id: int
    width_scale: float
    plans: dict
    dataset_json: dict
    network: dict  # class_name, kwargs, requires_import, input_channels, num_classes
    patch_size: List[int]
    batch_size: int
    batch_dice: bool
    train_data: np.ndarray
    train_seg: np.ndarray
    heldout_data: np.ndarray
    heldout_seg: np.ndarray
    context_data: Optional[np.ndarray] = None  # the whole example_ct (held-out Dice in context)
    split: dict = field(default_factory=dict)

    def save(self, path: Path) -> Path:
        meta = {k: getattr(self, k) for k in ("dataset_id", "width_scale", "plans", "dataset_json",
                                              "network", "patch_size", "batch_size", "batch_dice", "split")}
        meta["format"] = BUNDLE_FORMAT
        arrays = {k: getattr(self, k) for k in ("train_data", "train_seg", "heldout_data", "heldout_seg")}
        if self.context_data is not None:
            arrays["context_data"] = self.context_data
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, meta=np.array(json.dumps(meta)), **arrays)
        return path

    @classmethod
    def load(cls, path: Path) -> "Bundle":
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.pop("format", None) != BUNDLE_FORMAT:
                raise InputError(f"{path}: not a bundle of format {BUNDLE_FORMAT}")
            arrays = {k: z[k] for k in z.files if k != "meta"}
        return cls(**meta, **arrays)


def _label_remap(dataset_id: int) -> Optional[np.ndarray]:
    """Lookup table total-id -> dataset label id (None where identical, as for 297/298)."""
    from totalsegmentator.map_to_binary import class_map as ts_class_map

    total = ts_class_map["total"]
    target = class_map(dataset_id)
    if target == dict(total):
        return None
    by_name = {name: idx for idx, name in target.items()}
    lut = np.zeros(max(total) + 1, dtype=np.uint8)
    for idx, name in total.items():
        lut[idx] = by_name.get(name, 0)
    return lut


def network_spec(plans: dict, dataset_json: dict) -> dict:
    """How nnU-Net builds the network from these plans (class, kwargs, in/out channels), as JSON.

    Why: a GPU machine without nnU-Net's dependencies rebuilds the same network from this with
    ``build_training_network`` (the test checks it equals ``nnunet_folder.build_network``).
    """
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    from TuckerSegLib.models.nnunet_folder import plans_manager

    pm = plans_manager(plans)
    cm = pm.get_configuration(CONFIGURATION)
    return {"class_name": cm.network_arch_class_name,
            "kwargs": json.loads(json.dumps(cm.network_arch_init_kwargs)),
            "requires_import": list(cm.network_arch_init_kwargs_req_import),
            "input_channels": int(determine_num_input_channels(pm, cm, dataset_json)),
            "num_classes": int(pm.get_label_manager(dataset_json).num_segmentation_heads)}


def build_training_network(spec: dict, deep_supervision: bool = True) -> torch.nn.Module:
    """The network of ``spec`` exactly as nnU-Net's ``get_network_from_plans`` builds and
    initialises it (needs only torch and dynamic_network_architectures)."""
    kwargs = dict(spec["kwargs"])
    for key in spec["requires_import"]:
        if kwargs[key] is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    cls = pydoc.locate(spec["class_name"])
    if cls is None:
        raise ModelError(f"network class {spec['class_name']} not found (dynamic_network_architectures?)")
    net = cls(input_channels=spec["input_channels"], num_classes=spec["num_classes"],
              deep_supervision=deep_supervision, **kwargs)
    if hasattr(net, "initialize"):
        net.apply(net.initialize)
    return net


def _run_case(ct: Path, seg: Optional[Path], plans: dict, dataset_json: dict) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """nnU-Net's preprocessing of one file, as its predictor runs it (the plans' preprocessor)."""
    import contextlib
    import io

    from TuckerSegLib.models.nnunet_folder import plans_manager

    pm = plans_manager(plans)
    cm = pm.get_configuration(CONFIGURATION)
    pre = cm.preprocessor_class(verbose=False)
    with contextlib.redirect_stdout(io.StringIO()):
        data, s, _ = pre.run_case([str(ct)], str(seg) if seg else None, pm, cm, dataset_json)
    data = np.ascontiguousarray(data, dtype=np.float32)
    if seg is None:
        return data, None
    s = np.asarray(s[0])
    s[s < 0] = 0
    return data, np.ascontiguousarray(s.astype(np.uint8))


def prepare(dataset_id: int = DEFAULT_DATASET, width_scale: float = 0.5,
            data_dir: Optional[Path] = None) -> Bundle:
    """Preprocess the split with nnU-Net's own preprocessor for ``dataset_id`` at ``width_scale``."""
    import nibabel as nib

    data_dir = Path(data_dir or default_data_dir())
    _check_data(data_dir)
    plans, dataset_json = totalseg_plans(dataset_id, width_scale)
    lut = _label_remap(dataset_id)
    cfg = plans["configurations"][CONFIGURATION]
    with tempfile.TemporaryDirectory(prefix="tuckerseg_train_") as tmp:
        arrays = {}
        for part in ("train", "heldout"):
            ct, seg = write_part(part, Path(tmp), data_dir)
            if lut is not None:
                img = nib.load(str(seg))
                remapped = lut[np.asanyarray(img.dataobj)]
                nib.save(nib.Nifti1Image(remapped, img.affine, img.header), str(seg))
            arrays[part] = _run_case(ct, seg, plans, dataset_json)
        context, _ = _run_case(data_dir / CT_FILE, None, plans, dataset_json)
    raw_shape = nib.load(str(data_dir / CT_FILE)).shape[::-1]
    if tuple(context.shape[1:]) != tuple(raw_shape):  # resampled or cropped: z indices do not map
        context = None
    split = {"ct": CT_FILE, "labels": SEG_FILE, "axis": "z (last NIfTI axis of example_ct)",
             "train_slices": [TRAIN_SLICES.start, TRAIN_SLICES.stop - 1],
             "heldout_slices": [HELDOUT_SLICES.start, HELDOUT_SLICES.stop - 1],
             "unlabelled_slices": [UNLABELLED_SLICES.start, UNLABELLED_SLICES.stop - 1]}
    return Bundle(dataset_id=dataset_id, width_scale=float(width_scale), plans=plans,
                  dataset_json=dataset_json, network=network_spec(plans, dataset_json),
                  patch_size=[int(p) for p in cfg["patch_size"]], batch_size=int(cfg["batch_size"]),
                  batch_dice=bool(cfg.get("batch_dice", False)),
                  train_data=arrays["train"][0], train_seg=arrays["train"][1],
                  heldout_data=arrays["heldout"][0], heldout_seg=arrays["heldout"][1],
                  context_data=context, split=split)


# -- evaluation ----------------------------------------------------------------------------------

def _pad_to(data: np.ndarray, shape: Sequence[int]) -> Tuple[np.ndarray, Tuple[slice, ...]]:
    """Centred zero padding to at least ``shape`` (nnU-Net's ``pad_nd_image``) and the slicer back."""
    diff = [max(0, int(p) - s) for p, s in zip(shape, data.shape[1:])]
    below = [d // 2 for d in diff]
    widths = [(0, 0)] + [(b, d - b) for b, d in zip(below, diff)]
    back = tuple(slice(b, b + s) for b, s in zip(below, data.shape[1:]))
    return np.pad(data, widths), back


def _starts(size: int, patch: int, step: float = 0.5) -> List[int]:
    """nnU-Net's sliding-window start positions along one axis."""
    n = int(np.ceil((size - patch) / (patch * step))) + 1
    if n == 1:
        return [0]
    return [int(round(i * (size - patch) / (n - 1))) for i in range(n)]


@torch.no_grad()
def predict_labels(network: torch.nn.Module, data: np.ndarray, patch: Sequence[int],
                   device: torch.device, amp_dtype: Optional[torch.dtype] = None) -> np.ndarray:
    """Argmax labels of a preprocessed volume (nnU-Net's predictor for one patch: centred zero
    padding, one forward; larger volumes: tiles at step 0.5, logits averaged uniformly)."""
    padded, back = _pad_to(data, patch)
    shape = padded.shape[1:]
    x_all = torch.from_numpy(padded)[None]
    tiles = [(z, y, x) for z in _starts(shape[0], patch[0]) for y in _starts(shape[1], patch[1])
             for x in _starts(shape[2], patch[2])]
    logits = None
    for z, y, x in tiles:
        sl = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = network(x_all[(slice(None), slice(None)) + sl].to(device))[0]
        if len(tiles) == 1:  # the usual case here: no accumulation buffer (118 x patch floats)
            return out.argmax(0).cpu().numpy().astype(np.uint8)[back]
        if logits is None:
            logits = torch.zeros((out.shape[0],) + tuple(shape))
            counts = torch.zeros(shape)
        logits[(slice(None),) + sl] += out.float().cpu()
        counts[sl] += 1
    labels = (logits / counts).argmax(0).numpy().astype(np.uint8)
    return labels[back]


def dice_per_class(pred: np.ndarray, ref: np.ndarray, classes: Sequence[int]) -> Dict[int, float]:
    """Dice of each class (NaN where absent from both)."""
    out = {}
    for c in classes:
        p, r = pred == c, ref == c
        denom = int(p.sum()) + int(r.sum())
        out[int(c)] = float("nan") if denom == 0 else 2.0 * int((p & r).sum()) / denom
    return out


def evaluate(network: torch.nn.Module, bundle: Bundle, device: torch.device,
             amp_dtype: Optional[torch.dtype] = None, context: bool = True) -> dict:
    """Held-out Dice against TotalSegmentator's labels, mean over the classes in the held-out
    reference (``mean_dice``), over those also in the training slices (``mean_dice_seen``), and
    the same held-out slices predicted inside the whole example_ct (``in_context_mean_dice``)."""
    was_training = network.training
    decoder = getattr(network, "decoder", None)
    ds = getattr(decoder, "deep_supervision", None)
    network.eval()
    if ds is not None:
        decoder.deep_supervision = False
    try:
        ref = bundle.heldout_seg
        classes = [int(c) for c in np.unique(ref) if c > 0]
        seen = set(int(c) for c in np.unique(bundle.train_seg) if c > 0)
        pred = predict_labels(network, bundle.heldout_data, bundle.patch_size, device, amp_dtype)
        scores = dice_per_class(pred, ref, classes)
        names = {int(v): k for k, v in bundle.dataset_json["labels"].items()}
        result = {
            "mean_dice": float(np.mean([scores[c] for c in classes])) if classes else float("nan"),
            "mean_dice_seen": float(np.mean([scores[c] for c in classes if c in seen]))
            if seen & set(classes) else float("nan"),
            "n_classes": len(classes), "n_classes_seen": len(seen & set(classes)),
            "predicted_classes": int(len(set(np.unique(pred).tolist()) - {0})),
            "per_class": {names.get(c, str(c)): round(scores[c], 4) for c in classes},
        }
        if context and bundle.context_data is not None:
            full = predict_labels(network, bundle.context_data, bundle.patch_size, device, amp_dtype)
            # nnU-Net order (z, y, x): the held-out slices are rows z of the whole CT
            part = full[HELDOUT_SLICES.start:HELDOUT_SLICES.stop]
            ctx = dice_per_class(part, ref, classes)
            result["in_context_mean_dice"] = float(np.mean([ctx[c] for c in classes]))
        return result
    finally:
        if ds is not None:
            decoder.deep_supervision = ds
        network.train(was_training)


# -- training ------------------------------------------------------------------------------------

def parse_crop(text: str, n_stages: int = 5) -> List[int]:
    """``64`` or ``32x112x128`` (nnU-Net axis order z, y, x) -> sizes, each a multiple of
    2**(stages-1) (16 for the 3 mm networks)."""
    parts = [p for p in str(text).lower().replace(",", "x").split("x") if p]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise InputError(f"--crop {text!r}: give one size or z x y x x, e.g. 64 or 32x112x128") from None
    if len(sizes) == 1:
        sizes = sizes * 3
    m = 2 ** (n_stages - 1)
    if len(sizes) != 3 or any(s <= 0 or s % m for s in sizes):
        raise InputError(f"--crop {text!r}: three positive multiples of {m} needed")
    return sizes


class CropSampler:
    """Random training crops with zero padding and foreground oversampling (one sample in three,
    rounded per batch like nnU-Net: the second of two, centred on a voxel of a random class present).

    Unlike nnU-Net's loader, a volume smaller than the crop lands ANYWHERE inside it, not centred:
    with one 20-slice training volume, no spatial augmentation and the full patch as crop, centring
    feeds the identical input every step and the network memorises positions (first H200 runs:
    held-out Dice 0.08-0.10, about 0 on the whole CT).
    """

    def __init__(self, data: np.ndarray, seg: np.ndarray, crop: Sequence[int], rng: np.random.Generator,
                 oversample: float = 0.33):
        self.data, self.seg, self.crop, self.rng = data, seg, [int(c) for c in crop], rng
        self.oversample = oversample
        self.fg = {int(c): np.argwhere(seg == c) for c in np.unique(seg) if c > 0}

    def _corner(self, force_fg: bool) -> List[int]:
        lo_hi = [(min(0, s - p), max(0, s - p)) for s, p in zip(self.seg.shape, self.crop)]
        if force_fg and self.fg:
            cls = list(self.fg)[int(self.rng.integers(len(self.fg)))]
            centre = self.fg[cls][int(self.rng.integers(len(self.fg[cls])))]
            # the voxel anywhere in the crop's middle half, the volume kept inside where it is smaller
            return [int(np.clip(c - p // 2 + self.rng.integers(-(p // 4), p // 4 + 1), lo, hi))
                    for c, p, (lo, hi) in zip(centre, self.crop, lo_hi)]
        return [int(self.rng.integers(lo, hi + 1)) for lo, hi in lo_hi]

    def crop_at(self, corner: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
        x = np.zeros((self.data.shape[0], *self.crop), dtype=np.float32)
        y = np.zeros(tuple(self.crop), dtype=np.uint8)
        src, dst = [], []
        for c, s, p in zip(corner, self.seg.shape, self.crop):
            a, b = max(c, 0), min(c + p, s)
            src.append(slice(a, b))
            dst.append(slice(a - c, b - c))
        x[(slice(None), *dst)] = self.data[(slice(None), *src)]
        y[tuple(dst)] = self.seg[tuple(src)]
        return x, y

    def batch(self, n: int) -> Tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for i in range(n):
            force = not i < round(n * (1 - self.oversample))
            x, y = self.crop_at(self._corner(force))
            xs.append(x)
            ys.append(y[None])
        return np.stack(xs), np.stack(ys)


def _augment(x: np.ndarray, y: np.ndarray, rng: np.random.Generator,
             flip_axes: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """Intensity augmentation (scale/shift, Gaussian noise) and optional flips (axes z=0,y=1,x=2)."""
    for b in range(x.shape[0]):
        if rng.random() < 0.5:
            x[b] = x[b] * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1)
        if rng.random() < 0.15:
            x[b] = x[b] + rng.normal(0.0, np.sqrt(rng.uniform(0, 0.1)), x[b].shape).astype(np.float32)
        for a in flip_axes:
            if rng.random() < 0.5:
                x[b] = np.flip(x[b], a + 1)
                y[b] = np.flip(y[b], a + 1)
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def _loss(n_outputs: int, batch_dice: bool):
    """nnU-Net's training loss: Dice+CE per deep-supervision output, weights 1/2^i, last 0."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    weights = np.array([1 / (2 ** i) for i in range(n_outputs)])
    weights[-1] = 0
    weights = weights / weights.sum()
    base = DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=None,
                          dice_class=MemoryEfficientSoftDiceLoss)
    return DeepSupervisionWrapper(base, weights)


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """``auto``: bf16 on CUDA, none elsewhere (``bf16`` also works on CPUs with AVX-512 bf16, about
    1.5-2x faster there; weights and the optimiser stay float32 either way)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def train(bundle: Bundle, steps: int = 300, crop: Optional[Sequence[int]] = None,
          device: str = "auto", seed: int = 0, optimizer: str = "adam", lr: Optional[float] = None,
          amp: str = "auto", time_budget: Optional[float] = None, eval_every: int = 100,
          log_every: int = 10, flip_axes: Sequence[int] = (), batch_size: Optional[int] = None,
          eval_context: bool = True, log: Log = print) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Train; returns (float32 CPU state dict, summary). The learning rate follows nnU-Net's poly
    schedule over ``steps``, or over ``time_budget`` seconds when that runs out first."""
    from TuckerSegLib.devices import torch_device

    dev = torch_device(device)
    amp_dtype = resolve_amp(amp, dev)
    eval_amp = amp_dtype if dev.type == "cuda" else None  # as nnU-Net's predictor: autocast on CUDA only
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if dev.type == "cuda":
        torch.cuda.manual_seed_all(seed)
        torch.backends.cudnn.benchmark = True
    crop = list(crop or bundle.patch_size)
    batch = int(batch_size or bundle.batch_size)
    network = build_training_network(bundle.network, deep_supervision=True).to(dev)
    network.train()
    n_params = sum(p.numel() for p in network.parameters())
    n_out = len(bundle.network["kwargs"]["strides"]) - 1
    loss_fn = _loss(n_out, bundle.batch_dice)
    if optimizer == "adam":
        lr = lr or 3e-3
        opt = torch.optim.Adam(network.parameters(), lr=lr, weight_decay=3e-5)
    elif optimizer == "sgd":  # nnU-Net's own
        lr = lr or 1e-2
        opt = torch.optim.SGD(network.parameters(), lr=lr, momentum=0.99, nesterov=True, weight_decay=3e-5)
    else:
        raise InputError(f"unknown optimizer {optimizer!r} (adam or sgd)")
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 and dev.type == "cuda" else None
    sampler = CropSampler(bundle.train_data, bundle.train_seg, crop, rng)
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or "cpu")
    log(f"training dataset {bundle.dataset_id} width x{bundle.width_scale} ({n_params / 1e6:.2f} M params) "
        f"on {dev} ({device_name}), crop {crop}, batch {batch}, {steps} steps"
        + (f" / {time_budget:.0f} s" if time_budget else "") + f", {optimizer} lr {lr}, amp {amp_dtype}")
    losses: List[List[float]] = []
    evals: List[dict] = []
    running = None
    value = float("nan")
    t0 = time.perf_counter()
    eval_seconds = 0.0
    step = 0
    nonfinite = 0
    while step < steps:
        progress = step / steps
        if time_budget:
            progress = max(progress, (time.perf_counter() - t0 - eval_seconds) / time_budget)
        if progress >= 1:
            break
        for g in opt.param_groups:
            g["lr"] = lr * (1 - progress) ** 0.9
        xb, yb = _augment(*sampler.batch(batch), rng, flip_axes)
        x = torch.from_numpy(xb).to(dev, non_blocking=True)
        y = torch.from_numpy(yb).to(dev, non_blocking=True).float()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outs = network(x)
        outs = [o.float() for o in outs]
        targets = [torch.nn.functional.interpolate(y, size=o.shape[2:], mode="nearest-exact") for o in outs]
        loss = loss_fn(outs, targets)
        value = float(loss.detach())
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
            scaler.step(opt)  # skips non-finite steps itself
            scaler.update()
        else:
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
            if not (math.isfinite(value) and math.isfinite(float(norm))):
                nonfinite += 1  # one bad batch must not write NaN into every weight
                if nonfinite >= MAX_NONFINITE_STEPS:
                    raise ModelError(f"training diverged at step {step + 1}: {nonfinite} steps in a row gave a "
                                     f"non-finite loss or gradient (lower --lr, a larger --crop or --amp none)")
                continue
            nonfinite = 0
            opt.step()
        running = value if running is None else 0.9 * running + 0.1 * value
        step += 1
        if step == 1 or step % log_every == 0:
            losses.append([step, round(value, 5), round(running, 5)])
            log(f"step {step:5d}  loss {value:.4f}  running {running:.4f}  "
                f"{time.perf_counter() - t0:.0f} s")
        if eval_every and step % eval_every == 0:
            te = time.perf_counter()
            ev = evaluate(network, bundle, dev, eval_amp, eval_context)
            eval_seconds += time.perf_counter() - te
            evals.append({"step": step, "mean_dice": round(ev["mean_dice"], 4),
                          "in_context_mean_dice": round(ev.get("in_context_mean_dice", float("nan")), 4)})
            log(f"step {step:5d}  held-out mean Dice {ev['mean_dice']:.3f} "
                f"(seen classes {ev['mean_dice_seen']:.3f}, in context "
                f"{ev.get('in_context_mean_dice', float('nan')):.3f})")
    seconds = time.perf_counter() - t0
    if not losses or losses[-1][0] != step:
        losses.append([step, round(value, 5), round(running, 5)])
    final = evaluate(network, bundle, dev, eval_amp, eval_context)
    log(f"done: {step} steps in {seconds:.0f} s; held-out mean Dice {final['mean_dice']:.3f} over "
        f"{final['n_classes']} classes (seen classes {final['mean_dice_seen']:.3f}, in context "
        f"{final.get('in_context_mean_dice', float('nan')):.3f})")
    weights = {k: v.detach().float().cpu().contiguous() for k, v in network.state_dict().items()}
    summary = {
        "script": "python -m TuckerSegLib.models.train_totalseg_layout",
        "dataset_id": bundle.dataset_id, "width_scale": bundle.width_scale,
        "features_per_stage": bundle.network["kwargs"].get("features_per_stage"),
        "params": n_params, "crop": crop, "batch_size": batch,
        "steps": step, "steps_planned": steps, "time_budget_s": time_budget,
        "seconds": round(seconds, 1), "seconds_per_step": round((seconds - eval_seconds) / max(step, 1), 3),
        "device": str(dev), "device_name": device_name, "threads": torch.get_num_threads(),
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "none",
        "optimizer": optimizer, "lr": lr, "seed": seed, "flip_axes": list(flip_axes),
        "torch": torch.__version__, "losses": losses, "heldout_evals": evals,
        "heldout": final, "split": bundle.split,
    }
    return weights, summary


def _json_safe(obj):
    """NaN -> None, so training.json stays strict JSON."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_trained_folder(root: Path, bundle: Bundle, weights: Dict[str, torch.Tensor], summary: dict) -> Path:
    """The TotalSegmentator-layout folder with the trained weights and ``fold_0/training.json``."""
    folder = write_model_folder(root, bundle.dataset_id, bundle.plans, bundle.dataset_json, weights,
                                current_epoch=int(summary.get("steps", 0)))
    (folder / "fold_0" / "training.json").write_text(json.dumps(_json_safe(summary), indent=1))
    return folder


# -- safetensors export / import ----------------------------------------------------------------

def _dedupe(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """One entry per distinct tensor (nnU-Net modules reference convs twice); aliases -> kept key."""
    kept: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    seen: Dict[tuple, str] = {}
    for k, v in state.items():
        ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if ident in seen and v.numel():
            aliases[k] = seen[ident]
        else:
            seen[ident] = k
            kept[k] = v
    return kept, aliases


def export_safetensors(folder: Path, out_dir: Path, max_file_mb: float = 15.0,
                       dtype: str = "fp32") -> List[Path]:
    """Write a model folder's weights as safetensors shards of at most ``max_file_mb`` MB (10^6
    bytes) plus ``tuckerseg_export.json`` (plans, dataset.json, checkpoint keys, aliases, sha256,
    training.json): what ``import_safetensors`` needs to rebuild the folder.

    Why: files come back from GPU machines in pieces of at most 16 MiB.
    """
    from safetensors.torch import save_file

    from TuckerSegLib.models.checkpoint import load_checkpoint

    folder = Path(folder)
    ckpt = load_checkpoint(folder / "fold_0" / "checkpoint_final.pth")
    kept, aliases = _dedupe(ckpt["network_weights"])
    target = {"fp32": torch.float32, "fp16": torch.float16}.get(dtype)
    if target is None:
        raise InputError(f"--export-dtype {dtype!r}: fp32 or fp16")
    tensors = {}
    for k, v in kept.items():
        v = v.detach().cpu()
        if v.is_floating_point():
            if target == torch.float16 and float(v.abs().max() if v.numel() else 0) > 65504:
                raise ModelError(f"{k} exceeds the fp16 range; export as fp32")
            v = v.to(target)
        tensors[k] = v.contiguous()
    limit = int(max_file_mb * 1e6)
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 16  # safetensors: 8-byte header length, JSON header (about name + 100 bytes a tensor), data
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size() + len(k) + 100
        if nbytes + 16 > limit:
            raise ModelError(f"tensor {k} ({nbytes / 1e6:.2f} MB) is larger than --max-file-mb {max_file_mb}")
        if size + nbytes > limit and shards[-1]:
            shards.append({})
            size = 16
        shards[-1][k] = v
        size += nbytes
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, entries = [], []
    for i, shard in enumerate(shards, 1):
        path = out_dir / f"weights-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path))
        if path.stat().st_size > limit:
            raise ModelError(f"{path.name} is {path.stat().st_size} bytes, over the {limit} limit")
        entries.append({"file": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path),
                        "tensors": len(shard)})
        written.append(path)
    training = folder / "fold_0" / "training.json"
    dataset_id = next((i for i, n in DATASET_FOLDERS.items() if n == folder.parent.name), None)
    manifest = {
        "format": EXPORT_FORMAT, "dtype": dtype, "dataset_id": dataset_id,
        "folder": f"{folder.parent.name}/{folder.name}",
        "plans": json.loads((folder / "plans.json").read_text()),
        "dataset_json": json.loads((folder / "dataset.json").read_text()),
        "trainer_name": ckpt.get("trainer_name"),
        "configuration": (ckpt.get("init_args") or {}).get("configuration", CONFIGURATION),
        "inference_allowed_mirroring_axes": ckpt.get("inference_allowed_mirroring_axes"),
        "current_epoch": ckpt.get("current_epoch", 0),
        "keys": list(ckpt["network_weights"].keys()), "aliases": aliases, "shards": entries,
        "training": json.loads(training.read_text()) if training.is_file() else None,
    }
    path = out_dir / EXPORT_MANIFEST
    path.write_text(json.dumps(manifest, indent=1))
    return written + [path]


def import_safetensors(src: Path, root: Path) -> Path:
    """Rebuild the TotalSegmentator-layout folder under ``root`` from ``export_safetensors`` output
    (shards checked by sha256, weights back to float32, loaded strictly into nnU-Net's network)."""
    from safetensors.torch import load_file

    from TuckerSegLib.models.nnunet_folder import build_network

    src = Path(src)
    manifest_path = src / EXPORT_MANIFEST
    if not manifest_path.is_file():
        raise InputError(f"{manifest_path} not found: not a TuckerSeg safetensors export")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != EXPORT_FORMAT:
        raise InputError(f"{manifest_path}: export format {manifest.get('format')} not supported")
    loaded: Dict[str, torch.Tensor] = {}
    for entry in manifest["shards"]:
        path = src / entry["file"]
        if not path.is_file() or file_sha256(path) != entry["sha256"]:
            raise InputError(f"{path} missing or corrupt (sha256 differs from {EXPORT_MANIFEST})")
        loaded.update(load_file(str(path)))
    loaded = {k: (v.float() if v.is_floating_point() else v) for k, v in loaded.items()}
    state = {}
    for k in manifest["keys"]:
        state[k] = loaded[manifest["aliases"].get(k, k)]
    dataset_id = manifest["dataset_id"]
    plans, dataset_json = manifest["plans"], manifest["dataset_json"]
    network = build_network(plans, dataset_json, manifest["configuration"], manifest["trainer_name"],
                            initialise=False)
    network.load_state_dict(state)  # strict: the shards fit the architecture in the plans
    folder = write_model_folder(root, dataset_id, plans, dataset_json, network.state_dict(),
                                current_epoch=int(manifest.get("current_epoch") or 0))
    training = dict(manifest.get("training") or {})
    training["imported_from"] = {"dir": str(src), "dtype": manifest["dtype"],
                                 "shards": [e["file"] for e in manifest["shards"]]}
    (folder / "fold_0" / "training.json").write_text(json.dumps(training, indent=1))
    return folder


def evaluate_folder(folder: Path, bundle: Bundle, device: str = "cpu") -> dict:
    """Held-out Dice of a written (or imported) folder, loaded the way TuckerSeg loads models, in
    float32; merged into its ``fold_0/training.json`` as ``heldout_fp32``."""
    from TuckerSegLib.devices import torch_device
    from TuckerSegLib.models.nnunet_folder import load_model_folder

    dev = torch_device(device)
    model = load_model_folder(folder)
    result = evaluate(model.network.to(dev), bundle, dev, None)
    path = Path(folder) / "fold_0" / "training.json"
    training = json.loads(path.read_text()) if path.is_file() else {}
    training["heldout_fp32"] = result
    path.write_text(json.dumps(_json_safe(training), indent=1))
    return result


# -- GPU preparation -----------------------------------------------------------------------------

def prepare_gpu(out_dir: Path, dataset_id: int, width_scale: float, data_dir: Optional[Path]) -> Path:
    """Write ``bundle.npz`` and the pure-Python nnunetv2 / dynamic_network_architectures sources
    (``site/``) for a machine that has torch and numpy but not nnU-Net's dependencies."""
    import dynamic_network_architectures
    import nnunetv2

    out_dir = Path(out_dir)
    prepare(dataset_id, width_scale, data_dir).save(out_dir / "bundle.npz")
    for pkg in (nnunetv2, dynamic_network_architectures):
        src = Path(pkg.__path__[0])
        dst = out_dir / "site" / src.name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return out_dir


# -- command line ---------------------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="weights root (TOTALSEG_WEIGHTS_PATH) to write the folder into")
    parser.add_argument("--dataset", type=int, default=DEFAULT_DATASET, help="dataset id (default 297)")
    parser.add_argument("--width-scale", type=float, default=0.5, help="feature widths x this (1.0 = full)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds of training; the poly schedule ends then if steps do not end it first")
    parser.add_argument("--crop", default=None,
                        help="training crop, z x y x x, multiples of 16 (default: the plans' patch 112x112x128)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the plans' (2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    parser.add_argument("--lr", type=float, default=None, help="default 3e-3 (adam) / 1e-2 (sgd)")
    parser.add_argument("--amp", choices=["auto", "none", "bf16", "fp16"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--flip-axes", type=int, nargs="*", default=[],
                        help="mirror augmentation axes (0=z, 1=y, 2=x); none by default (left/right classes)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--data", type=Path, default=None, help=f"shared data folder (default ${DATA_ENV} or ../shared/data)")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="preprocessed bundle.npz (from --prepare-gpu) instead of preprocessing here")
    parser.add_argument("--prepare-gpu", type=Path, metavar="DIR",
                        help="write DIR/bundle.npz and DIR/site (nnunetv2 sources) for a GPU machine, then exit")
    parser.add_argument("--write-parts", type=Path, metavar="DIR",
                        help="write the train / held-out / unlabelled NIfTI parts into DIR, then exit")
    parser.add_argument("--export-safetensors", type=Path, metavar="DIR",
                        help="after training (or with --no-train, from --out), write safetensors shards into DIR")
    parser.add_argument("--max-file-mb", type=float, default=15.0)
    parser.add_argument("--export-dtype", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--no-train", action="store_true", help="export the folder already under --out")
    parser.add_argument("--evaluate", action="store_true",
                        help="held-out Dice (float32) of the folder under --out, then exit")
    parser.add_argument("--import-safetensors", type=Path, metavar="DIR",
                        help="rebuild the folder under --out from DIR (an export), then exit")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.write_parts:
            for part in PARTS:
                for p in write_part(part, args.write_parts, args.data):
                    if p:
                        print(p)
            return 0
        if args.prepare_gpu:
            print(prepare_gpu(args.prepare_gpu, args.dataset, args.width_scale, args.data))
            return 0
        if args.out is None:
            parser.error("--out ROOT is needed")
        if args.import_safetensors:
            print(import_safetensors(args.import_safetensors, args.out))
            return 0
        if args.evaluate:
            bundle = Bundle.load(args.bundle) if args.bundle else prepare(args.dataset, args.width_scale, args.data)
            result = evaluate_folder(model_dir(args.out, args.dataset), bundle, args.device)
            print(json.dumps(_json_safe({k: v for k, v in result.items() if k != "per_class"})))
            return 0
        if args.no_train:
            folder = model_dir(args.out, args.dataset)
        else:
            bundle = Bundle.load(args.bundle) if args.bundle else prepare(args.dataset, args.width_scale, args.data)
            if args.bundle and abs(bundle.width_scale - args.width_scale) > 1e-9:
                print(f"note: the bundle was prepared for width x{bundle.width_scale}; using that")
            n_stages = int(bundle.network["kwargs"]["n_stages"])
            crop = parse_crop(args.crop, n_stages) if args.crop else None
            weights, summary = train(bundle, steps=args.steps, crop=crop, device=args.device, seed=args.seed,
                                     optimizer=args.optimizer, lr=args.lr, amp=args.amp,
                                     time_budget=args.time_budget, eval_every=args.eval_every,
                                     log_every=args.log_every, flip_axes=args.flip_axes,
                                     batch_size=args.batch_size)
            summary["argv"] = list(sys.argv[1:] if argv is None else argv)
            folder = write_trained_folder(args.out, bundle, weights, summary)
            print(f"wrote {folder}")
        if args.export_safetensors:
            for p in export_safetensors(folder, args.export_safetensors, args.max_file_mb, args.export_dtype):
                print(f"exported {p} ({p.stat().st_size / 1e6:.1f} MB)")
    except (InputError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
