"""Shared set-up for the Slicer module's tests: real MRML scenes from ``slicer-core``."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "TuckerSeg"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

pytest.importorskip("slicer_core", reason="slicer-core (Slicer's MRML without Qt) is not installed")
import slicer  # noqa: E402
import vtk  # noqa: E402
from vtk.util.numpy_support import numpy_to_vtk, vtk_to_numpy  # noqa: E402

WORKER_SCRIPT = Path(__file__).resolve().parent / "slicer_protocol_worker.py"


def new_scene():
    return slicer.vtkMRMLScene()


def load_volume(scene, path: Path, name: str = "CT"):
    """A scalar volume node in ``scene`` read with Slicer's own NIfTI reader."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"could not read {path}"
    return node


def volume_from_array(scene, array: np.ndarray, spacing=(3.0, 3.0, 3.0), origin=(-10.0, 20.0, 5.0),
                      name: str = "CT"):
    """A scalar volume node from a (k, j, i) array, with an oblique-free LPS-style geometry."""
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.GetPointData().SetScalars(numpy_to_vtk(array.ravel(), deep=True,
                                                 array_type=vtk.VTK_SHORT))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetAndObserveImageData(image)
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    node.SetIJKToRASDirections(-1, 0, 0, 0, -1, 0, 0, 0, 1)
    return node


def synthetic_ct(scene, name: str = "CT"):
    """A small CT-like volume: air, soft tissue (40 HU) and a bone block (700 HU)."""
    array = np.full((12, 16, 20), -1000, np.int16)
    array[2:10, 3:13, 3:17] = 40
    array[4:8, 6:10, 8:12] = 700
    return volume_from_array(scene, array, name=name)


def scene_with_previous_result(node_name: str = "previous result", segment: str = "kept"):
    """A scene with a CT and a segmentation node that already holds a segment, and its snapshot:
    what a failed run must leave exactly as it was."""
    from TuckerSegUtils.segmentation_import import scene_snapshot

    scene = new_scene()
    ct = synthetic_ct(scene)
    out = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", node_name)
    out.GetSegmentation().AddEmptySegment(segment, segment)
    return scene, ct, out, scene_snapshot(scene)


def segment_array(segmentation_node, segment_id: str, reference_volume) -> np.ndarray:
    """The segment as a (k, j, i) 0/1 array on the reference volume's grid (Slicer's export)."""
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__export__")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        segmentation_node, ids, labelmap, reference_volume)
    assert ok
    dims = labelmap.GetImageData().GetDimensions()
    array = vtk_to_numpy(labelmap.GetImageData().GetPointData().GetScalars()).reshape(dims[::-1])
    array = array.copy()
    scene.RemoveNode(labelmap)
    return array


def worker_env(mode: str, **extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["TUCKERSEG_TEST_WORKER_MODE"] = mode
    env.update({k: str(v) for k, v in extra.items()})
    return env
