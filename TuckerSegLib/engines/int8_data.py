"""What INT8 is calibrated and validated on: phantom CTs, plus the user's CTs where given.

Why: INT8 scales come from the activations on the calibration data, and the agreement that
decides which layers stay in f32 is measured on the validation data; both must look like what
nnU-Net's predictor feeds the network. So every volume (the built-in phantom CTs, and the user's
NIfTI CTs) goes through nnU-Net's own preprocessor with the model's plans
(``compression.probe_data.default_validation``, ``compression.ct_patches.preprocess``).
Calibration patches are drawn at random positions (body edges and air included, as the sliding
window sees them); validation patches are the sliding window's own tiles of other volumes (other
phantoms; other positions of the user's CTs). ``exclude`` names CTs that must never be used (the
CT a benchmark evaluates on): asking for one is an error.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from TuckerSegLib.engines.int8 import Int8Data
from TuckerSegLib.errors import InputError

# Phantom seeds: apart from the probe's (0-3), budget validation's (300-303), the demo's.
CALIBRATION_SEEDS = (400, 401, 402, 403)
VALIDATION_SEEDS = (500, 501, 502)
CALIBRATION_PATCHES = 8
VALIDATION_PATCHES = 4


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve() or Path(a).samefile(b)
    except OSError:
        return False


def _tiles(volume: torch.Tensor, patch: Sequence[int], step: float = 0.5) -> List[Tuple[int, ...]]:
    """Corners of nnU-Net's sliding-window tiles (centred, padded when the volume is smaller)."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    shape = tuple(volume.shape[1:])
    padded = [max(s, p) for s, p in zip(shape, patch)]
    offsets = [-(ps - s) // 2 for ps, s in zip(padded, shape)]
    steps = compute_steps_for_sliding_window(padded, list(patch), step)
    corners = [()]
    for axis_steps, off in zip(steps, offsets):
        corners = [c + (int(s) + off,) for c in corners for s in axis_steps]
    return corners


def _pick(items: list, count: int) -> list:
    """``count`` items spread evenly over the list (all when fewer)."""
    if len(items) <= count:
        return list(items)
    idx = np.linspace(0, len(items) - 1, count).round().astype(int)
    return [items[i] for i in dict.fromkeys(idx.tolist())]


def model_int8_data(plans: dict, configuration: str, dataset_json: dict, in_channels: int,
                    patch: Sequence[int], cts: Sequence[str] = (), exclude: Sequence[str] = (),
                    n_calibration: int = CALIBRATION_PATCHES, n_validation: int = VALIDATION_PATCHES,
                    calibration_seeds: Sequence[int] = CALIBRATION_SEEDS,
                    validation_seeds: Sequence[int] = VALIDATION_SEEDS) -> Int8Data:
    """INT8 data for an nnU-Net model (its plans), from phantoms and the user's ``cts``.

    Nothing is computed until INT8 is actually quantised (a warm start needs only ``identity``).
    """
    cts = [str(c) for c in cts]
    for c in cts:
        for e in exclude:
            if _same_file(c, e):
                raise InputError(f"{c} is the CT being evaluated; it must not be INT8 calibration data")
    from TuckerSegLib.compression.ct_patches import check_ct

    for c in cts:
        check_ct(c)
    patch = tuple(int(p) for p in patch)
    model = SimpleNamespace(plans=plans, configuration=configuration, dataset_json=dataset_json,
                            num_input_channels=in_channels, patch_size=patch)
    ct_ids = []
    for c in cts:
        st = Path(c).stat()
        ct_ids.append(f"{Path(c).resolve()}:{st.st_size}:{st.st_mtime_ns}")
    identity = hashlib.sha256(repr(("model-data-v2", patch, in_channels, tuple(calibration_seeds),
                                    tuple(validation_seeds), n_calibration, n_validation,
                                    tuple(ct_ids))).encode()).hexdigest()[:24]
    description = {
        "calibration": f"{n_calibration} patches at random positions of torso phantom CTs "
                       f"{list(calibration_seeds)}" + (f" and of {len(cts)} user CT(s)" if cts else "")
                       + ", preprocessed by nnU-Net with the model's plans",
        "validation": f"up to {n_validation} sliding-window tiles of torso phantom CTs {list(validation_seeds)}"
                      + (" and of the user CT(s) at other positions" if cts else ""),
    }
    cache: dict = {}

    def volumes(which: str) -> List[torch.Tensor]:
        from TuckerSegLib.compression.probe_data import default_validation

        key = "phantoms-" + which
        if key not in cache:
            seeds = calibration_seeds if which == "cal" else validation_seeds
            cache[key] = default_validation(model, seeds, torso=True).build()
        if "cts" not in cache:
            from TuckerSegLib.compression.ct_patches import preprocess

            cache["cts"] = [torch.from_numpy(c.data) for c in preprocess(model, cts)] if cts else []
        return cache[key]

    def calibration() -> List[torch.Tensor]:
        from TuckerSegLib.compression.ct_patches import Case, PatchSampler

        phantoms = volumes("cal")
        if not phantoms:  # not a single-channel 3-D CT model: noise (z-scored inputs)
            return random_patches(patch, in_channels, n_calibration, seed=11)
        sources = phantoms + cache["cts"]
        per = max(1, int(np.ceil(n_calibration / len(sources))))
        out = []
        for i, vol in enumerate(sources):
            sampler = PatchSampler([Case(f"v{i}", vol.numpy())], patch, seed=1000 + i)
            out += list(sampler.fixed_patches(per, seed=2000 + i))
        return _pick(out, n_calibration)

    def validation() -> List[torch.Tensor]:
        from TuckerSegLib.compression.ct_patches import Case, PatchSampler

        phantoms = volumes("val")
        if not phantoms:
            return random_patches(patch, in_channels, n_validation, seed=12)
        out = []
        per_source = []
        for i, vol in enumerate(phantoms):
            sampler = PatchSampler([Case(f"p{i}", vol.numpy())], patch)
            per_source.append([torch.from_numpy(sampler.crop(0, c)[0]) for c in _tiles(vol, patch)])
        for i, vol in enumerate(cache["cts"]):  # positions other than calibration's random ones
            sampler = PatchSampler([Case(f"c{i}", vol.numpy())], patch)
            tiles = _tiles(vol, patch, step=1.0)
            per_source.append([torch.from_numpy(sampler.crop(0, c)[0]) for c in _pick(tiles, n_validation)])
        # round robin over the sources, so that each contributes
        while len(out) < n_validation and any(per_source):
            for tiles in per_source:
                if tiles and len(out) < n_validation:
                    out.append(tiles.pop(len(tiles) // 2))
        return out

    return Int8Data(calibration, validation, identity, description, tuple(cts))


def random_patches(patch: Sequence[int], in_channels: int, count: int, seed: int = 0) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(in_channels, *[int(p) for p in patch], generator=g) for _ in range(count)]


def random_int8_data(patch: Sequence[int], in_channels: int = 1, n_calibration: int = CALIBRATION_PATCHES,
                     n_validation: int = 2, seed: int = 0) -> Int8Data:
    """Standard-normal patches, for networks without plans (tests, random-weight benchmarks):
    nnU-Net's inputs are z-scored, so this is the right scale, but not a CT's distribution."""
    identity = f"random-v1|{tuple(patch)}|{in_channels}|{n_calibration}|{n_validation}|{seed}"
    return Int8Data(lambda: random_patches(patch, in_channels, n_calibration, seed),
                    lambda: random_patches(patch, in_channels, n_validation, seed + 7919),
                    identity,
                    {"calibration": f"{n_calibration} standard-normal noise patches",
                     "validation": f"{n_validation} other standard-normal noise patches"})


def data_for(plans: Optional[dict], configuration: Optional[str], dataset_json: Optional[dict],
             in_channels: int, patch: Sequence[int], cts: Sequence[str] = ()) -> Int8Data:
    """``model_int8_data`` when the plans are known, else ``random_int8_data``."""
    if plans is None or configuration is None or dataset_json is None:
        if cts:
            raise InputError("INT8 calibration CTs need the model's plans (an nnU-Net model folder)")
        return random_int8_data(patch, in_channels)
    return model_int8_data(plans, configuration, dataset_json, in_channels, patch, cts)
