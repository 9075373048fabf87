"""Segment one CT with a plain nnU-Net model folder through nnU-Net's own predictor.

Used by ``tuckerseg demo`` and ``tuckerseg eval`` for nnU-Net folders (TotalSegmentator tasks go
through ``pipeline.segment``). The image is read with the reader class named in the model's
plans (as ``nnUNetv2_predict`` would) and the result is exported with the same class, so the
geometry handling is nnU-Net's. A (compressed) network replaces the checkpoint's network in the
predictor; its state dict replaces ``list_of_parameters`` because the predictor reloads those
parameters before every case.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import numpy as np

from TuckerSegLib.devices import torch_device
from TuckerSegLib.errors import InputError, ModelError
from TuckerSegLib.progress import NullProgress, Progress


def load_predictor(model_folder: Union[str, Path], fold: int = 0,
                   checkpoint_name: str = "checkpoint_final.pth", device: str = "auto",
                   tile_step_size: float = 0.5):
    """An initialised ``nnUNetPredictor`` for ``model_folder`` (no mirroring, Gaussian tiles)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    folder = Path(model_folder)
    checkpoint = folder / f"fold_{fold}" / checkpoint_name
    for needed in (folder / "plans.json", folder / "dataset.json", checkpoint):
        if not needed.is_file():
            raise ModelError(f"not an nnU-Net model folder: {needed} is missing")
    dev = torch_device(device)
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints a CPU notice
        predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True,
                                    use_mirroring=False, perform_everything_on_device=dev.type == "cuda",
                                    device=dev, verbose=False, verbose_preprocessing=False,
                                    allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(folder), use_folds=(fold,),
                                                       checkpoint_name=checkpoint_name)
    return predictor


def predict_volume(model: Union[str, Path, object], image: Union[str, Path, np.ndarray],
                   affine: Optional[np.ndarray] = None, network=None, device: str = "auto",
                   progress: Optional[Progress] = None, fold: int = 0) -> np.ndarray:
    """Label map (uint8/uint16) of ``image`` in the voxel order of the input NIfTI / array.

    ``model`` is an nnU-Net trained-model folder or a predictor from ``load_predictor``.
    ``image`` is a NIfTI path, or an array in NIfTI voxel order with its ``affine``.
    ``network`` (optional) replaces the folder's network, e.g. a Tucker-compressed one.
    """
    import nibabel as nib
    import torch

    progress = progress or NullProgress()
    predictor = model if hasattr(model, "predict_single_npy_array") else \
        load_predictor(model, fold=fold, device=device)
    if network is not None:
        network = network.to(predictor.device).eval()
        predictor.network = network
        predictor.list_of_parameters = [network.state_dict()]
    reader = predictor.plans_manager.image_reader_writer_class()
    with tempfile.TemporaryDirectory(prefix="tuckerseg-predict-") as tmp:
        if isinstance(image, np.ndarray):
            if affine is None:
                raise InputError("an image array needs its affine")
            if image.ndim != 3:
                raise InputError(f"expected a 3-D image, got shape {image.shape}")
            path = os.path.join(tmp, "image.nii")
            nib.save(nib.Nifti1Image(np.asarray(image, dtype=np.float32), affine), path)
        else:
            path = str(image)
            if not Path(path).is_file():
                raise InputError(f"input image not found: {path}")
        try:
            data, props = reader.read_images([path])
        except Exception as exc:
            raise InputError(f"cannot read {path}: {exc}") from None
        progress.log(f"predicting {tuple(data.shape[1:])} voxels with nnU-Net's predictor")
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            seg = predictor.predict_single_npy_array(data, props, None, None, False)
        out = os.path.join(tmp, "seg.nii")
        with contextlib.redirect_stdout(io.StringIO()):
            reader.write_seg(seg, out, props)
        result = np.asanyarray(nib.load(out).dataobj)
        return np.array(result)
