"""TotalSegmentator's dataset ids, folder names and trainers per task mode: pure data, no imports.

Why here (not in ``models``): the Slicer panel finds the installed model folders on its GUI thread
(``estimate.quality_readout``), and importing anything under ``TuckerSegLib.models`` loads torch
(``models/__init__`` imports nnU-Net folder loading). ``models.totalseg_archs`` re-exports these, so
there is one definition. ``models.totalseg`` still asks TotalSegmentator itself where it can.
"""
from typing import Dict, List

# Dataset ids per TotalSegmentator mode of task "total".
TASK_DATASETS: Dict[str, List[int]] = {
    "total": [291, 292, 293, 294, 295],
    "total_fast": [297],
    "total_fastest": [298],
}

# Folder names exactly as TotalSegmentator downloads them (map_tasks_config.TASK_ID_WEIGHTS_CONFIGS).
DATASET_FOLDERS: Dict[int, str] = {
    291: "Dataset291_TotalSegmentator_part1_organs_1559subj",
    292: "Dataset292_TotalSegmentator_part2_vertebrae_1532subj",
    293: "Dataset293_TotalSegmentator_part3_cardiac_1559subj",
    294: "Dataset294_TotalSegmentator_part4_muscles_1559subj",
    295: "Dataset295_TotalSegmentator_part5_ribs_1559subj",
    297: "Dataset297_TotalSegmentator_total_3mm_1559subj",
    298: "Dataset298_TotalSegmentator_total_6mm_1559subj",
}

TRAINERS: Dict[int, str] = {
    **{i: "nnUNetTrainerNoMirroring" for i in (291, 292, 293, 294, 295)},
    297: "nnUNetTrainer_4000epochs_NoMirroring",
    298: "nnUNetTrainer_4000epochs_NoMirroring",
}

PLANS = "nnUNetPlans"
CONFIGURATION = "3d_fullres"

# TotalSegmentator's resolution modes of task "total" -> the key of TASK_DATASETS.
MODE_KEYS: Dict[str, str] = {"default": "total", "fast": "total_fast", "fastest": "total_fastest"}


def trained_model_subfolder(dataset_id: int) -> str:
    """``<trainer>__<plans>__<configuration>``, nnU-Net's results layout inside a dataset folder."""
    return f"{TRAINERS[dataset_id]}__{PLANS}__{CONFIGURATION}"
