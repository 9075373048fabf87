"""NIfTI in and out of MRML volume nodes, without adding anything to the scene.

The worker process reads and writes files; these helpers move data between those files and
nodes with Slicer's own storage nodes (so the RAS/LPS handling is Slicer's). Storage nodes are
created standalone: writing the input or reading the result leaves the scene untouched.
"""
from __future__ import annotations

from pathlib import Path

from TuckerSegLib.errors import InputError


def export_volume(volume_node, path: Path) -> Path:
    """Write ``volume_node``'s voxels and geometry to ``path`` (.nii.gz)."""
    import slicer

    if volume_node is None or volume_node.GetImageData() is None:
        raise InputError("the input volume has no image data")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(str(path).endswith(".gz"))
    if not storage.WriteData(volume_node) or not Path(path).exists():
        raise InputError(f"could not write the input volume to {path}")
    return Path(path)


def read_labelmap(path: Path):
    """Read a multilabel NIfTI into a new labelmap volume node that is not in any scene."""
    import slicer

    if not Path(path).exists():
        raise InputError(f"segmentation result {path} was not written")
    node = slicer.vtkMRMLLabelMapVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node) or node.GetImageData() is None:
        raise InputError(f"could not read the segmentation result {path}")
    return node
