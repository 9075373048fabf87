"""The Slicer module's MRML logic against real MRML (slicer-core), outside Slicer.

A multilabel result becomes one segmentation node with TotalSegmentator's names, the SNOMED
mapping's colours and terminology, and the input's geometry; errors leave the scene unchanged.
"""
from __future__ import annotations

import csv

import numpy as np
import pytest

from slicer_helpers import (load_volume, new_scene, scene_with_previous_result, segment_array, slicer,
                            synthetic_ct, vtk, vtk_to_numpy)

from TuckerSegLib.errors import InputError
from TuckerSegUtils import segmentation_import, structures, terminology, volume_io
from TuckerSegUtils.segmentation_import import scene_snapshot


@pytest.fixture(scope="module")
def term():
    table = terminology.load_terminology()
    if not table:
        pytest.skip("totalsegmentator's SNOMED mapping is not installed")
    return table


def test_structure_list_has_the_117_total_names_and_matches_the_shipped_copy():
    names = structures.structure_names("total")
    assert len(names) == 117 and names[0] == "spleen" and len(set(names)) == 117
    shipped = structures._from_resource("total")
    assert shipped is not None and list(dict(sorted(shipped.items())).values()) == names


def test_every_total_structure_has_terminology_that_slicer_parses(term):
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    for name in structures.structure_names("total"):
        assert name in term, name
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(term[name].entry, entry), name
        assert entry.GetTypeObject().GetCodeValue(), name
    entry = slicer.vtkSlicerTerminologyEntry()
    logic.DeserializeTerminologyEntry(term["kidney_left"].entry, entry)
    assert entry.GetCategoryObject().GetCodeMeaning() == "Anatomical Structure"
    assert entry.GetTypeObject().GetCodeMeaning() == "Kidney"
    assert entry.GetTypeModifierObject().GetCodeMeaning() == "Left"
    assert entry.GetTerminologyContextName() == terminology.CATEGORY_CONTEXT


def _csv_colors():
    path = terminology.find_mapping_file()
    with open(path, newline="") as handle:
        return {row["Structure"]: tuple(int(c) / 255 for c in row["DicomRGBColor"].split(","))
                for row in csv.DictReader(handle)}


def test_real_totalsegmentator_result_becomes_named_coloured_segments(shared_data, term, tmp_path):
    scene = new_scene()
    ct = load_volume(scene, shared_data / "example_ct_sm.nii.gz")
    labelmap = volume_io.read_labelmap(shared_data / "example_seg.nii.gz")
    reference = vtk_to_numpy(labelmap.GetImageData().GetPointData().GetScalars()).reshape(
        labelmap.GetImageData().GetDimensions()[::-1]).copy()
    present = sorted(int(v) for v in np.unique(reference) if v)
    assert len(present) == 41  # what the data README says

    built = segmentation_import.build_segmentation(labelmap, structures.label_map("total"), term)
    before = scene_snapshot(scene)
    assert scene_snapshot(scene) == before  # building touched nothing
    node = segmentation_import.commit_segmentation(built, ct)

    seg = node.GetSegmentation()
    names = structures.label_map("total")
    assert seg.GetNumberOfSegments() == 41
    assert seg.GetNumberOfLayers() == 1  # one shared labelmap, not 41 copies
    colors = _csv_colors()
    for value in present:
        segment = seg.GetSegment(names[value])
        assert segment is not None and segment.GetName() == names[value]
        assert segment.GetLabelValue() == value
        assert np.allclose(segment.GetColor(), colors[names[value]])
        assert segment.GetTerminology() == term[names[value]].entry
    # Geometry: the input volume is the reference, voxels land exactly where the labels were.
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is ct
    assert seg.GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    for value in (5, present[-1]):  # liver and the last label present
        mask = segment_array(node, names[value], ct)
        assert mask.shape == reference.shape
        assert np.array_equal(mask > 0, reference == value), names[value]


def test_new_output_goes_under_the_inputs_study_and_transform():
    scene = new_scene()
    ct = synthetic_ct(scene)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "T")
    ct.SetAndObserveTransformNodeID(transform.GetID())
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient")
    study = sh.CreateStudyItem(patient, "Study")
    # Slicer's application adds items for new nodes; bare MRML does not, so add the volume's here.
    sh.CreateItem(study, ct)

    labelmap = _labelmap_like(ct, {5: (slice(2, 10), slice(3, 13), slice(3, 17))})
    built = segmentation_import.build_segmentation(labelmap, structures.label_map("total"))
    node = segmentation_import.commit_segmentation(built, ct, name="CT segmentation")
    assert node.GetName() == "CT segmentation"
    assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study
    assert node.GetTransformNodeID() == transform.GetID()
    assert [node.GetSegmentation().GetNthSegment(i).GetName()
            for i in range(node.GetSegmentation().GetNumberOfSegments())] == ["liver"]


def test_existing_output_node_has_its_segments_replaced_not_added():
    scene = new_scene()
    ct = synthetic_ct(scene)
    out = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    out.GetSegmentation().AddEmptySegment("old", "old")
    labelmap = _labelmap_like(ct, {1: (slice(1, 3), slice(1, 3), slice(1, 3)),
                                   25: (slice(4, 8), slice(6, 10), slice(8, 12))})
    built = segmentation_import.build_segmentation(labelmap, structures.label_map("total"))
    node = segmentation_import.commit_segmentation(built, ct, out)
    assert node is out
    ids = [out.GetSegmentation().GetNthSegmentID(i)
           for i in range(out.GetSegmentation().GetNumberOfSegments())]
    assert ids == ["spleen", structures.label_map()[25]]
    mask = segment_array(out, ids[1], ct)
    assert mask.sum() == 4 * 4 * 4


def test_label_not_named_by_the_task_fails_and_leaves_the_scene_unchanged():
    scene, ct, out, before = scene_with_previous_result("mine", "old")
    labelmap = _labelmap_like(ct, {200: (slice(1, 3), slice(1, 3), slice(1, 3))})
    with pytest.raises(InputError, match="label 200"):
        segmentation_import.build_segmentation(labelmap, structures.label_map("total"))
    assert scene_snapshot(scene) == before


def test_export_and_read_back_keeps_voxels_and_geometry(tmp_path):
    scene = new_scene()
    ct = synthetic_ct(scene)
    before = scene_snapshot(scene)
    path = volume_io.export_volume(ct, tmp_path / "in.nii.gz")
    assert scene_snapshot(scene) == before
    back = volume_io.read_labelmap(path)
    a = vtk_to_numpy(ct.GetImageData().GetPointData().GetScalars())
    b = vtk_to_numpy(back.GetImageData().GetPointData().GetScalars())
    assert np.array_equal(a, b)
    m1, m2 = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    ct.GetIJKToRASMatrix(m1)
    back.GetIJKToRASMatrix(m2)
    assert all(abs(m1.GetElement(r, c) - m2.GetElement(r, c)) < 1e-4
               for r in range(4) for c in range(4))
    with pytest.raises(InputError):
        volume_io.read_labelmap(tmp_path / "missing.nii.gz")


def _labelmap_like(volume, blocks):
    """A labelmap node (off-scene) on ``volume``'s grid with label blocks {value: (k, j, i)}."""
    from vtk.util.numpy_support import numpy_to_vtk

    dims = volume.GetImageData().GetDimensions()
    array = np.zeros(dims[::-1], np.uint8)
    for value, index in blocks.items():
        array[index] = value
    image = vtk.vtkImageData()
    image.SetDimensions(*dims)
    image.GetPointData().SetScalars(numpy_to_vtk(array.ravel(), deep=True,
                                                 array_type=vtk.VTK_UNSIGNED_CHAR))
    node = slicer.vtkMRMLLabelMapVolumeNode()
    node.SetAndObserveImageData(image)
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    node.SetIJKToRASMatrix(matrix)
    return node


def test_building_a_segmentation_leaks_no_image():
    """CreateOrientedImageDataFromVolumeNode's image belongs to the caller: once the built
    segmentation is gone, the image must be freed (it leaked one labelmap per run)."""
    import gc

    scene = new_scene()
    ct = synthetic_ct(scene)
    labelmap = _labelmap_like(ct, {5: (slice(2, 10), slice(3, 13), slice(3, 17))})
    built = segmentation_import.build_segmentation(labelmap, structures.label_map("total"))
    binary = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    image = built.GetSegment("liver").GetRepresentation(binary)
    freed = []
    image.AddObserver(vtk.vtkCommand.DeleteEvent, lambda caller, event: freed.append(1))
    del image, built
    gc.collect()
    assert freed == [1]


def _type_codes(context_json):
    """(category value, type value, modifier value or '') -> 3dSlicerLabel, from a context file."""
    import json

    data = json.loads(context_json.read_text(encoding="utf-8"))
    found = {}
    for category in data["SegmentationCodes"]["Category"]:
        for type_ in category.get("Type", []):
            found[(category["CodeValue"], type_["CodeValue"], "")] = type_.get("3dSlicerLabel")
            for modifier in type_.get("Modifier", []):
                found[(category["CodeValue"], type_["CodeValue"], modifier["CodeValue"])] = \
                    modifier.get("3dSlicerLabel")
    return found


def test_shipped_terminology_context_covers_all_117_structures(term, tmp_path):
    """65 structures have no type in Slicer's DICOM master list: the module ships a context built
    from the SNOMED mapping, and Slicer's own terminology logic finds every entry in it."""
    import json
    import os
    from pathlib import Path

    shipped = terminology.CONTEXT_FILE
    assert shipped.exists(), "regenerate with python TuckerSeg/TuckerSegUtils/terminology.py"
    assert json.loads(shipped.read_text(encoding="utf-8")) == terminology.build_context()

    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    assert terminology.register_context(logic)
    assert terminology.CATEGORY_CONTEXT in terminology.loaded_contexts(logic)
    assert terminology.register_context(logic)  # a second call loads nothing again

    ours = _type_codes(shipped)
    slicer_dir = Path(os.environ.get("TUCKERSEG_SLICER_DIR", Path(__file__).resolve().parents[3] / "shared" / "slicer"))
    master = slicer_dir / "terminology" / "SegmentationCategoryTypeModifier-DICOM-Master.json"
    master_codes = _type_codes(master) if master.exists() else None
    missing_from_master = 0
    for name in structures.structure_names("total"):
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(term[name].entry, entry), name
        assert entry.GetTerminologyContextName() == terminology.CATEGORY_CONTEXT
        key = (entry.GetCategoryObject().GetCodeValue(), entry.GetTypeObject().GetCodeValue(),
               entry.GetTypeModifierObject().GetCodeValue() or "")
        assert key in ours, name  # category, type and modifier are in our context
        if ours[key] != name:  # same type codes (e.g. kidney cysts): the region tells them apart
            assert entry.GetRegionObject().GetCodeValue() or entry.GetRegionModifierObject().GetCodeValue(), name
        if master_codes is not None and key not in master_codes:
            missing_from_master += 1
    if master_codes is not None:
        assert missing_from_master == 65
