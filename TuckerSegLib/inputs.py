"""Check a CT before TotalSegmentator sees it, so that bad input gets one clear line.

Why: TotalSegmentator and nnU-Net fail on bad input deep inside worker processes (or call
``sys.exit``), with tracebacks that do not say what is wrong with the file. These checks are cheap
(header plus one pass over the voxels, slab by slab) and name the problem. An image of the wrong
modality does not fail at all: a CT network segments an MR image (or a CT stored without its
rescale intercept) into confident nonsense, so ``check_modality`` refuses what cannot be a CT.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from TuckerSegLib.errors import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# A CT in Hounsfield units shows air (about -1000 HU) or lung (-500 and below) somewhere; fat alone
# reaches about -190. MR and PET images, and CTs stored without their rescale intercept, have no
# voxel this low.
CT_LOWEST_HU_AT_MOST = -200.0
DICOM_MODALITY_TAG = "0008|0060"


@dataclass(frozen=True)
class CheckedInput:
    """A validated input: its path, kind ("nifti" or "dicom"), shape and voxel spacing."""

    path: Path
    kind: str
    shape: Tuple[int, ...]
    spacing: Tuple[float, ...]
    value_range: Tuple[float, float]  # lowest and highest voxel value
    modality: Optional[str] = None  # a DICOM series' Modality tag (CT, MR, PT, ...); None for NIfTI


def _check_voxels(shape: Tuple[int, ...], slabs, where: str) -> Tuple[float, float]:
    if len(shape) != 3:
        raise InputError(f"{where} is a {len(shape)}D image with shape {tuple(shape)}; a 3D CT is needed")
    if min(shape) < 1:
        raise InputError(f"{where} is empty (shape {tuple(shape)})")
    lo, hi = np.inf, -np.inf
    for slab in slabs:
        slab = np.asarray(slab)
        if slab.dtype.kind == "f" and not np.isfinite(slab).all():
            raise InputError(f"{where} contains NaN or infinite voxel values")
        if slab.size:
            lo, hi = min(lo, float(slab.min())), max(hi, float(slab.max()))
    if lo == hi:
        raise InputError(f"{where} is empty: every voxel has the value {lo:g}")
    return lo, hi


def _check_nifti(path: Path) -> CheckedInput:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    except Exception as exc:
        raise InputError(f"{path} is not a readable NIfTI image ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:120]})") from None
    if len(shape) != 3:
        _check_voxels(shape, [], str(path))  # raises: not a 3D image
    step = max(1, 2 ** 24 // max(1, shape[0] * shape[1]))  # ~16 M voxels per slab
    try:
        slabs = (img.dataobj[:, :, k:k + step] for k in range(0, shape[2], step))
        value_range = _check_voxels(shape, slabs, str(path))
    except InputError:
        raise
    except Exception as exc:  # truncated or corrupt data
        raise InputError(f"{path} cannot be read ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:120]})") from None
    if any(not np.isfinite(z) or z <= 0 for z in zooms):
        raise InputError(f"{path} has invalid voxel spacing {zooms}")
    return CheckedInput(path, "nifti", shape, zooms, value_range)


def _check_dicom(path: Path) -> CheckedInput:
    import SimpleITK as sitk

    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM would print "No Series were found"
    try:
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(str(path))
    except Exception:
        series = ()
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)
    if not series:
        raise InputError(f"{path} is a folder without a DICOM series (and not a .nii/.nii.gz file)")
    try:
        files = reader.GetGDCMSeriesFileNames(str(path), series[0])
        reader.SetFileNames(files)
        reader.MetaDataDictionaryArrayUpdateOn()  # for the Modality tag
        image = reader.Execute()
    except Exception as exc:
        raise InputError(f"the DICOM series in {path} cannot be read ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:120]})") from None
    array = sitk.GetArrayViewFromImage(image)
    shape = tuple(int(s) for s in image.GetSize())
    value_range = _check_voxels(shape if image.GetDimension() == 3 else tuple(array.shape), [array], str(path))
    modality = None
    if reader.HasMetaDataKey(0, DICOM_MODALITY_TAG):
        modality = reader.GetMetaData(0, DICOM_MODALITY_TAG).strip().upper() or None
    return CheckedInput(path, "dicom", shape, tuple(float(s) for s in image.GetSpacing()), value_range, modality)


def check_input(path: Union[str, Path]) -> CheckedInput:
    """Validate a CT: an existing, readable 3D NIfTI file or DICOM folder, finite and not empty."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"input not found: {p}")
    if p.is_dir():
        return _check_dicom(p)
    if not str(p).lower().endswith(NIFTI_SUFFIXES):
        raise InputError(f"{p} is neither a NIfTI file (.nii, .nii.gz) nor a DICOM folder")
    return _check_nifti(p)


def check_modality(checked: CheckedInput, modality: str, purpose: str) -> None:
    """Refuse an image that cannot be a CT when ``modality`` (of ``purpose``, e.g. "task 'total'")
    is "CT": a DICOM series whose Modality tag says otherwise, or an image without a voxel at or
    below ``CT_LOWEST_HU_AT_MOST`` (no air, no lung: not in Hounsfield units).

    Why: nothing downstream fails on the wrong modality; a CT network labels an MR image without
    complaint. "MR" checks nothing: TotalSegmentator's MR models were trained on MR and CT, and MR
    intensities have no fixed scale.
    """
    if modality.upper() != "CT":
        return
    if checked.modality and checked.modality != "CT":
        raise InputError(f"{checked.path} is a DICOM series of modality {checked.modality} (its Modality "
                         f"tag), but {purpose} segments CT images")
    lowest, highest = checked.value_range
    if lowest > CT_LOWEST_HU_AT_MOST:
        raise InputError(f"{checked.path} does not look like a CT in Hounsfield units: its values run from "
                         f"{lowest:.4g} to {highest:.4g}, with no air or lung (nothing at or below "
                         f"{CT_LOWEST_HU_AT_MOST:g} HU); {purpose} needs a CT in HU (an MR image needs an MR "
                         f"task such as total_mr; a CT stored without its rescale intercept needs it applied)")
