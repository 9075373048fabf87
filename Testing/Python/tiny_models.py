"""Small, real nnU-Net v2 model folders for tests (random weights, real network classes).

``write_model_folder`` writes ``plans.json`` (new format), ``dataset.json`` and
``fold_0/checkpoint_final.pth`` the way nnU-Net's trainer saves them, so that nnU-Net's own
predictor and our loaders read them like any trained model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

ARCH_CLASSES = {
    "plain": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "resenc": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
}


def make_plans(features: Sequence[int] = (8, 16, 32, 32), patch: Sequence[int] = (32, 32, 32),
               spacing: Sequence[float] = (3.0, 3.0, 3.0), arch: str = "plain", dim: int = 3) -> dict:
    n = len(features)
    conv = "torch.nn.modules.conv.Conv3d" if dim == 3 else "torch.nn.modules.conv.Conv2d"
    norm = ("torch.nn.modules.instancenorm.InstanceNorm3d" if dim == 3
            else "torch.nn.modules.instancenorm.InstanceNorm2d")
    k = [3] * dim
    arch_kwargs = {
        "n_stages": n, "features_per_stage": list(features), "conv_op": conv,
        "kernel_sizes": [k] * n, "strides": [[1] * dim] + [[2] * dim] * (n - 1),
        "n_conv_per_stage": [2] * n if arch == "plain" else [1] + [2] * (n - 1),
        "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True, "norm_op": norm,
        "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }
    if arch == "plain":
        pass
    config = "3d_fullres" if dim == 3 else "2d"
    return {
        "dataset_name": "Dataset999_Tiny", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing),
        "original_median_shape_after_transp": [64] * dim,
        "image_reader_writer": "NibabelIOWithReorient", "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {config: {
            "data_identifier": f"nnUNetPlans_{config}", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": list(patch), "median_image_size_in_voxels": [64] * dim,
            "spacing": list(spacing), "normalization_schemes": ["CTNormalization"],
            "use_mask_for_norm": [False], "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
            "architecture": {"network_class_name": ARCH_CLASSES[arch], "arch_kwargs": arch_kwargs,
                             "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
            "batch_dice": True,
        }},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 3000.0, "mean": 100.0, "median": 80.0, "min": -1000.0,
            "percentile_00_5": -900.0, "percentile_99_5": 1500.0, "std": 300.0}},
    }


def make_dataset_json(n_classes: int = 3) -> dict:
    labels = {"background": 0, **{f"structure_{i}": i for i in range(1, n_classes)}}
    return {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz"}


def write_model_folder(folder: Path, features: Sequence[int] = (8, 16, 32, 32),
                       patch: Sequence[int] = (32, 32, 32), n_classes: int = 3, arch: str = "plain",
                       dim: int = 3, seed: int = 0, trainer_name: str = "nnUNetTrainer") -> Path:
    """Write a random-weight nnU-Net model folder and return it."""
    from TuckerSegLib.models.nnunet_folder import build_network

    folder = Path(folder)
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    plans = make_plans(features, patch, arch=arch, dim=dim)
    dataset_json = make_dataset_json(n_classes)
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    torch.manual_seed(seed)
    config = "3d_fullres" if dim == 3 else "2d"
    net = build_network(plans, dataset_json, config, trainer_name)
    with torch.no_grad():  # non-trivial weights everywhere (default init leaves biases at 0)
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save({"network_weights": net.state_dict(), "trainer_name": trainer_name,
                "init_args": {"configuration": config, "fold": 0},
                "inference_allowed_mirroring_axes": (0, 1, 2)[:dim],
                "current_epoch": 1000},
               folder / "fold_0" / "checkpoint_final.pth")
    return folder
