"""The module under one Slicer release's own Python (run by ``test_slicer_module.py``, one tag per
process: ``TUCKERSEG_SLICER_TAG=v5.6.2 python -m pytest Testing/Python/slicer_tag_checks.py``).

Slicer's real ``@parameterNodeWrapper`` and ``ScriptedLoadableModule`` from that tag, slicer-core's
real MRML, a real worker process; only ``qt``/``ctk`` are inert stand-ins (``slicer_app``).
"""
from __future__ import annotations

import logging
import os
import unittest

import numpy as np
import pytest

import slicer_app

TAG = os.environ.get("TUCKERSEG_SLICER_TAG", "")
if not TAG:
    pytest.skip("run through test_slicer_module.py (TUCKERSEG_SLICER_TAG names the Slicer tag)",
                allow_module_level=True)
if slicer_app.missing_reason(TAG):
    pytest.skip(slicer_app.missing_reason(TAG), allow_module_level=True)


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


_warnings = _Warnings()
logging.getLogger().addHandler(_warnings)
slicer = slicer_app.activate(TAG)
import TuckerSeg  # noqa: E402  (runs Slicer's @parameterNodeWrapper on the parameter class)

logging.getLogger().removeHandler(_warnings)

from TuckerSegLib import specs  # noqa: E402


@pytest.fixture(autouse=True)
def _clear_scene():
    slicer.mrmlScene.Clear(0)
    yield


def test_this_process_runs_the_tags_own_code():
    import slicer.parameterNodeWrapper as wrapper
    assert str(slicer_app.tag_dir(TAG)) in wrapper.__file__
    old = TAG in slicer_app.OLD_SEGMENT_API_TAGS
    assert hasattr(slicer.vtkSegment(), "SetTerminology") is not old


def test_importing_the_module_logs_no_unused_annotations():
    assert not [m for m in _warnings.messages if "Unused annotations" in m], _warnings.messages


def test_parameter_node_defaults_and_choices_come_from_the_core():
    node = TuckerSeg.TuckerSegLogic().getParameterNode()
    assert (node.task, node.quality, node.ratio, node.policy, node.device, node.engine, node.subset) == (
        "total", "fast", 0.3, "budget", "auto", "auto", "")
    assert (node.minAgreement, node.expertRatio) == (specs.DEFAULT_MIN_AGREEMENT, False)
    assert node.inputVolume is None and node.outputSegmentation is None
    for name, choices in (("quality", specs.MODES), ("policy", specs.POLICIES),
                          ("device", specs.DEVICES), ("engine", specs.ENGINES)):
        for value in choices:
            setattr(node, name, value)
            assert getattr(node, name) == value
    assert TuckerSeg.TuckerSegLogic().getParameterNode().engine == specs.ENGINES[-1]


@pytest.mark.parametrize("name, bad", [("ratio", 0.0), ("ratio", 1.5), ("ratio", 0.01),
                                       ("minAgreement", 0.0), ("minAgreement", 1.01),
                                       ("quality", "slow"), ("policy", "magic"),
                                       ("engine", "tensorrt"), ("device", "tpu")])
def test_validators_reject_bad_values_and_keep_the_old_one(name, bad):
    node = TuckerSeg.TuckerSegLogic().getParameterNode()
    before = getattr(node, name)
    with pytest.raises(ValueError):
        setattr(node, name, bad)
    assert getattr(node, name) == before


def test_parameters_are_saved_with_the_scene_and_read_back(tmp_path):
    scene = slicer.mrmlScene
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CT segmentation")
    node = TuckerSeg.TuckerSegLogic().getParameterNode()
    node.inputVolume, node.outputSegmentation = volume, output
    node.ratio, node.quality, node.policy, node.engine = 0.55, "fastest", "uniform", "openvino"
    node.subset = "spleen,liver"
    node.minAgreement, node.expertRatio = 0.975, True
    path = tmp_path / "scene.mrml"
    scene.SetURL(str(path))
    assert scene.Commit()

    back = slicer.vtkMRMLScene()
    back.SetURL(str(path))
    assert back.Connect()
    raw = back.GetSingletonNode("TuckerSeg", "vtkMRMLScriptedModuleNode")
    assert raw is not None
    read = TuckerSeg.TuckerSegParameterNode(raw)
    assert (read.ratio, read.quality, read.policy, read.engine, read.subset) == (
        0.55, "fastest", "uniform", "openvino", "spleen,liver")
    assert (read.minAgreement, read.expertRatio) == (0.975, True)
    assert read.inputVolume.GetName() == "CT" and read.inputVolume.GetScene() is back
    assert read.outputSegmentation.GetName() == "CT segmentation"


def test_module_self_test_runs_with_a_real_worker():
    """The module's own TuckerSegTest (what CTest runs inside Slicer): parameter node, a real
    worker process driven by the (stand-in) QTimer, import, error and cancel."""
    result = unittest.TextTestRunner(verbosity=2).run(unittest.TestSuite([TuckerSeg.TuckerSegTest("runTest")]))
    problems = [text for _test, text in result.errors + result.failures]
    assert result.wasSuccessful(), "\n".join(problems)


def test_result_import_sets_terminology_with_this_tags_segment_api():
    """5.6/5.8: no vtkSegment.SetTerminology; the TerminologyEntry tag carries the entry."""
    from slicer_helpers import synthetic_ct  # noqa: E402  (real MRML helpers)
    from TuckerSegUtils import segmentation_import, structures, terminology

    table = terminology.load_terminology()
    if not table:
        pytest.skip("totalsegmentator's SNOMED mapping is not installed")
    ct = synthetic_ct(slicer.mrmlScene)
    from vtk.util.numpy_support import numpy_to_vtk
    import vtk

    dims = ct.GetImageData().GetDimensions()
    array = np.zeros(dims[::-1], np.uint8)
    array[1:4, 2:5, 2:5] = 3   # kidney_left
    array[5:9, 6:10, 8:12] = 5  # liver
    image = vtk.vtkImageData()
    image.SetDimensions(*dims)
    image.GetPointData().SetScalars(numpy_to_vtk(array.ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    labelmap.SetAndObserveImageData(image)
    matrix = vtk.vtkMatrix4x4()
    ct.GetIJKToRASMatrix(matrix)
    labelmap.SetIJKToRASMatrix(matrix)

    built = segmentation_import.build_segmentation(labelmap, structures.label_map("total"), table)
    node = segmentation_import.commit_segmentation(built, ct)
    seg = node.GetSegmentation()
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    for name, meaning in (("kidney_left", "Kidney"), ("liver", "Liver")):
        segment = seg.GetSegment(name)
        tag_value = vtk.reference("")
        assert segment.GetTag(segment.GetTerminologyEntryTagName(), tag_value)
        tag_value = str(tag_value)
        assert tag_value == table[name].entry
        assert segmentation_import.segment_terminology(segment) == table[name].entry
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(tag_value, entry)
        assert entry.GetTypeObject().GetCodeMeaning() == meaning
