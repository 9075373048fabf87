"""TotalSegmentator's network architectures as data (plans.json + dataset.json per dataset id).

Why: cost estimates (params, MACs) and test models need TotalSegmentator's exact networks without
its weights, which cannot be downloaded everywhere. The plans are written in the old nnU-Net
format that TotalSegmentator ships (``UNet_class_name``, ``UNet_base_num_features``, ...), which
nnunetv2's ``PlansManager`` converts ("Detected old nnU-Net plans format"), so the networks built
from them come out of nnU-Net's own code path.

Verified (see Testing/Python/test_totalseg_models.py): 291-295 give 31.19 M params (25-class head)
and 480.6 G MACs per 128^3 patch; 297 gives 16.55 M params and 369.1 G MACs per patch. These are
the paper's conventions: params of the modules that run (nnU-Net also builds unused
deep-supervision heads: 31.21 / 16.60 M with them), MACs as fvcore counts them (conv MACs
478.8 / 367.8 G plus 5 per InstanceNorm output element).
Dataset 298 (6 mm) is a best guess (same network as 297): NOT verified against its plans.json.
Intensity statistics are typical CT foreground values, not TotalSegmentator's exact numbers
(they only affect the CT normalisation of the test models, never the architecture).
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple

# Dataset ids, folder names and trainers: torch-free data shared with the Slicer panel.
from TuckerSegLib.totalseg_ids import DATASET_FOLDERS, TASK_DATASETS, TRAINERS  # noqa: F401

# Which TotalSegmentator class map each dataset predicts (names from totalsegmentator.map_to_binary).
PART_NAMES: Dict[int, str] = {
    291: "class_map_part_organs",
    292: "class_map_part_vertebrae",
    293: "class_map_part_cardiac",
    294: "class_map_part_muscles",
    295: "class_map_part_ribs",
}


# Architecture per dataset id: spacing (mm), stages, base/max features, patch (nnU-Net z,y,x order).
_ARCH: Dict[int, dict] = {
    **{i: {"spacing": 1.5, "n_stages": 6, "base": 32, "max": 320, "patch": [128, 128, 128],
           "median_shape": [288, 228, 228], "batch_size": 2, "verified": True}
       for i in (291, 292, 293, 294, 295)},
    297: {"spacing": 3.0, "n_stages": 5, "base": 32, "max": 320, "patch": [112, 112, 128],
          "median_shape": [144, 114, 114], "batch_size": 2, "verified": True},
    298: {"spacing": 6.0, "n_stages": 5, "base": 32, "max": 320, "patch": [112, 112, 128],
          "median_shape": [72, 57, 57], "batch_size": 2, "verified": False},
}

# Typical CT foreground intensity statistics (HU); used by nnU-Net's CTNormalization.
CT_INTENSITY_PROPERTIES = {
    "max": 3071.0, "mean": 98.5, "median": 66.0, "min": -1024.0,
    "percentile_00_5": -958.0, "percentile_99_5": 1278.0, "std": 314.0,
}


def class_map(dataset_id: int) -> Dict[int, str]:
    """TotalSegmentator's real label map {id: name} (without background) for a dataset id."""
    from totalsegmentator.map_to_binary import class_map as ts_class_map, class_map_5_parts

    if dataset_id in PART_NAMES:
        return dict(class_map_5_parts[PART_NAMES[dataset_id]])
    if dataset_id in (297, 298):
        return dict(ts_class_map["total"])
    raise KeyError(f"no TotalSegmentator architecture known for dataset {dataset_id}")


def is_verified(dataset_id: int) -> bool:
    """Whether the architecture of ``dataset_id`` was checked against published figures."""
    return bool(_ARCH[dataset_id]["verified"])


def dataset_json(dataset_id: int) -> dict:
    """dataset.json in the form TotalSegmentator's model folders carry (labels name -> id)."""
    labels = {"background": 0}
    for idx, name in sorted(class_map(dataset_id).items()):
        labels[name] = int(idx)
    return {
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": 1559,
        "file_ending": ".nii.gz",
        "name": DATASET_FOLDERS[dataset_id],
    }


def _scaled(n: int, width_scale: float) -> int:
    return max(1, int(round(n * width_scale)))


def totalseg_plans(dataset_id: int, width_scale: float = 1.0,
                   patch_size: Optional[List[int]] = None) -> Tuple[dict, dict]:
    """Old-format nnU-Net plans and dataset.json of a TotalSegmentator dataset id.

    ``width_scale`` multiplies the feature counts (base and max) for small test models;
    ``patch_size`` overrides the patch (nnU-Net z, y, x order; each a multiple of 2**(stages-1)).
    """
    if dataset_id not in _ARCH:
        raise KeyError(f"no TotalSegmentator architecture known for dataset {dataset_id} "
                       f"(known: {sorted(_ARCH)})")
    arch = _ARCH[dataset_id]
    n = arch["n_stages"]
    patch = list(patch_size or arch["patch"])
    spacing = [float(arch["spacing"])] * 3
    # Old nnU-Net plans format: pool kernels per downsampling (n-1 of them), conv kernels per stage.
    pool = [[2, 2, 2] for _ in range(n - 1)]
    kernels = [[3, 3, 3] for _ in range(n)]
    resampling = {
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                               "force_separate_z": None},
    }
    config = {
        "data_identifier": "nnUNetPlans_3d_fullres",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": arch["batch_size"],
        "patch_size": patch,
        "median_image_size_in_voxels": [float(s) for s in arch["median_shape"]],
        "spacing": spacing,
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "UNet_class_name": "PlainConvUNet",
        "UNet_base_num_features": _scaled(arch["base"], width_scale),
        "n_conv_per_stage_encoder": [2] * n,
        "n_conv_per_stage_decoder": [2] * (n - 1),
        "num_pool_per_axis": [n - 1] * 3,
        "pool_op_kernel_sizes": [[1, 1, 1]] + pool,
        "conv_kernel_sizes": kernels,
        "unet_max_num_features": _scaled(arch["max"], width_scale),
        **resampling,
        "batch_dice": False,
    }
    plans = {
        "dataset_name": DATASET_FOLDERS[dataset_id],
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": spacing,
        "original_median_shape_after_transp": list(arch["median_shape"]),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": config},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": copy.deepcopy(CT_INTENSITY_PROPERTIES)},
    }
    return plans, dataset_json(dataset_id)


def build_totalseg_network(dataset_id: int, width_scale: float = 1.0):
    """The (randomly initialised) network of a TotalSegmentator dataset id, built by nnU-Net."""
    from TuckerSegLib.models.nnunet_folder import build_network

    plans, dj = totalseg_plans(dataset_id, width_scale)
    return build_network(plans, dj, "3d_fullres", TRAINERS[dataset_id])


def patch_size(dataset_id: int) -> Tuple[int, ...]:
    """The inference patch (z, y, x) of a dataset id."""
    return tuple(_ARCH[dataset_id]["patch"])
