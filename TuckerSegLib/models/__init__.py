"""Model loading and storage: nnU-Net model folders, checkpoints, TotalSegmentator weights and
architectures, compressed-model files (the compression cache is ``compression.cache``)."""
from __future__ import annotations

from pathlib import Path
from typing import Union

from TuckerSegLib.models.nnunet_folder import DEFAULT_CHECKPOINT, NnUNetModel


def open_model(folder: Union[str, Path], fold: Union[int, str] = 0,
               checkpoint_name: str = DEFAULT_CHECKPOINT) -> NnUNetModel:
    """Load either an nnU-Net trained-model folder or a TuckerSeg compressed-model folder."""
    from TuckerSegLib.models.compressed_file import is_compressed_folder, load_compressed
    from TuckerSegLib.models.nnunet_folder import load_model_folder

    if is_compressed_folder(folder):
        return load_compressed(folder)
    return load_model_folder(folder, fold, checkpoint_name)
