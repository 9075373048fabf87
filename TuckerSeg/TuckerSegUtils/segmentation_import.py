"""Turn a multilabel result into one segment per structure found, then put it in the scene.

Two steps so that a failure never leaves a half-filled node behind:

1. ``build_segmentation`` reads the labelmap and builds a ``vtkSegmentation`` off-scene: one
   segment per label value present, named as TotalSegmentator names it, with colour and
   ``TerminologyEntry`` from the SNOMED mapping. All segments share one labelmap layer (fast even
   for 117 structures).
2. ``commit_segmentation`` copies it into the output node (created only now if none was given),
   sets the input volume as reference geometry, the input's parent transform, and places the node
   under the input's study in the subject hierarchy.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

from TuckerSegLib.errors import InputError

from .terminology import StructureTerminology

DEFAULT_COLOR = (0.5, 0.5, 0.5)


def ensure_converter_rules() -> None:
    """Register Slicer's standard representation converters when nothing has (slicer-core alone).

    Inside Slicer the Segmentations module registers them at start-up; the ``slicer-core`` wheel
    has no application, so a bare ``vtkSegmentation`` could not hold a binary labelmap otherwise.
    """
    import slicer

    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if len(factory.GetConverterRules()) > 0:
        return
    for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                 slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
                 slicer.vtkClosedSurfaceToFractionalLabelmapConversionRule,
                 slicer.vtkFractionalLabelmapToClosedSurfaceConversionRule):
        factory.RegisterConverterRule(rule())


def set_segment_terminology(segment, entry: str) -> None:
    """Set a segment's ``TerminologyEntry``: ``SetTerminology`` from Slicer 5.10 on, the tag
    (``SetTag(GetTerminologyEntryTagName(), entry)``) in 5.6 and 5.8, which have no setter."""
    if hasattr(segment, "SetTerminology"):
        segment.SetTerminology(entry)
    else:
        segment.SetTag(segment.GetTerminologyEntryTagName(), entry)


def segment_terminology(segment) -> str:
    """A segment's ``TerminologyEntry`` string on any Slicer from 5.6 on ('' when unset)."""
    if hasattr(segment, "GetTerminology"):
        return segment.GetTerminology() or ""
    import vtk

    value = vtk.reference("")
    segment.GetTag(segment.GetTerminologyEntryTagName(), value)
    return str(value)


def label_values_present(labelmap_node) -> list:
    """Sorted non-zero label values that occur in the labelmap."""
    import numpy as np
    from vtk.util.numpy_support import vtk_to_numpy

    scalars = labelmap_node.GetImageData().GetPointData().GetScalars()
    values = np.unique(vtk_to_numpy(scalars))
    return [int(v) for v in values if v != 0]


def build_segmentation(labelmap_node, labels: Mapping[int, str],
                       terminology: Optional[Mapping[str, StructureTerminology]] = None):
    """A new off-scene ``vtkSegmentation`` with one segment per structure present.

    ``labels`` maps label value -> TotalSegmentator structure name; a value found in the image
    but missing from ``labels`` is an error (the result does not match the task).
    """
    import slicer

    ensure_converter_rules()
    terminology = terminology or {}
    image = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(labelmap_node)
    if image is None:
        raise InputError("could not convert the segmentation result to a labelmap")
    # The caller owns the returned image (one reference more than Python's): hand it back to
    # Python now, else every run leaks one labelmap-sized image (Slicer's own callers do this).
    image.UnRegister(None)
    binary = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    segmentation = slicer.vtkSegmentation()
    segmentation.SetSourceRepresentationName(binary)
    labels = {int(k): str(v) for k, v in labels.items()}
    for value in label_values_present(labelmap_node):
        if value not in labels:
            raise InputError(f"the result contains label {value}, which the task does not name")
        name = labels[value]
        segment = slicer.vtkSegment()
        segment.SetName(name)
        segment.SetLabelValue(value)
        term = terminology.get(name)
        segment.SetColor(*(term.color if term else DEFAULT_COLOR))
        if term:
            set_segment_terminology(segment, term.entry)
        segment.AddRepresentation(binary, image)  # shared layer: every segment, one image
        segmentation.AddSegment(segment, name)
    return segmentation


def scene_snapshot(scene) -> Dict[str, tuple]:
    """A comparable picture of the scene: node id -> (class, name, number of segments).

    Tests and the run logic use it to check that failed or cancelled runs change nothing.
    """
    snapshot = {}
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        segments = -1
        if node.IsA("vtkMRMLSegmentationNode") and node.GetSegmentation() is not None:
            segments = node.GetSegmentation().GetNumberOfSegments()
        snapshot[node.GetID()] = (node.GetClassName(), node.GetName(), segments)
    return snapshot


def commit_segmentation(segmentation, input_volume, output_node=None, name: Optional[str] = None):
    """Put the built segmentation into ``output_node`` (replacing its segments) or a new node.

    Returns the output node. Only this function changes the scene.
    """
    import slicer

    scene = input_volume.GetScene()
    if scene is None:
        raise InputError("the input volume is not in a scene")
    if output_node is None:
        output_node = scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", name or f"{input_volume.GetName()} segmentation")
    if output_node.GetDisplayNode() is None:
        output_node.CreateDefaultDisplayNodes()
    was_modifying = output_node.StartModify()
    try:
        output_node.GetSegmentation().DeepCopy(segmentation)
        output_node.SetReferenceImageGeometryParameterFromVolumeNode(input_volume)
        output_node.SetNodeReferenceID(output_node.GetReferenceImageGeometryReferenceRole(),
                                       input_volume.GetID())
        output_node.SetAndObserveTransformNodeID(input_volume.GetTransformNodeID())
    finally:
        output_node.EndModify(was_modifying)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is not None:
        volume_item = sh.GetItemByDataNode(input_volume)
        if volume_item:
            study = sh.GetItemParent(volume_item)
            seg_item = sh.GetItemByDataNode(output_node) or sh.CreateItem(study, output_node)
            sh.SetItemParent(seg_item, study)
    return output_node
