"""TuckerSeg: TotalSegmentator with Tucker-2 compressed networks, as a 3D Slicer module.

The widget is thin: it binds the panel to a parameter node, shows the architecture-only cost of
the chosen ratio, and drives a ``SegmentationRun`` (``TuckerSegUtils.run``) whose worker is a
separate ``PythonSlicer -m TuckerSegLib segment`` process, so Slicer never blocks and Cancel ends
the process group. Everything that touches only MRML and processes lives in ``TuckerSegUtils``
and is tested outside Slicer with ``slicer-core``.

Console use (synchronous)::

    logic = slicer.util.getModuleLogic("TuckerSeg")  # or TuckerSeg.TuckerSegLogic()
    summary = logic.process(volumeNode, None, task="total", quality="fast")  # quality target 0.95
    summary = logic.process(volumeNode, None, minAgreement=0.97)  # a stricter target
    summary = logic.process(volumeNode, None, ratio=0.3)  # experts: a fixed ratio instead
"""

# No "from __future__ import annotations": parameterNodeWrapper reads the annotations as types.
import logging
import os
from typing import Annotated, Callable, List, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from TuckerSegUtils import cost_readout, dependencies, structures, terminology
from TuckerSegUtils.run import (DEFAULT_MIN_AGREEMENT, DEVICES, ENGINES, POLICIES, QUALITIES,
                                QUALITY_SPACING_MM, RunCallbacks, SegmentationRequest, SegmentationRun,
                                compression_choice)
from TuckerSegUtils.warm_worker import WarmWorker, shared_worker

POLL_INTERVAL_MS = 100


#
# TuckerSeg
#
class TuckerSeg(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("TuckerSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["TuckerSeg developers"]
        self.parent.helpText = _(
            "Whole-body CT segmentation (TotalSegmentator's 117 structures) with Tucker-2 "
            "compressed networks: choose the minimum agreement with TotalSegmentator's own "
            "networks (default 0.95) and each network is the cheapest that keeps it; experts can "
            "fix a compression ratio instead. Runs in a separate process: Slicer stays responsive and the run "
            "can be cancelled.")
        self.parent.acknowledgementText = _(
            "Uses TotalSegmentator (Wasserthal et al., Radiology: AI 2023) and nnU-Net "
            "(Isensee et al., Nature Methods 2021). Segment terminology from TotalSegmentator's "
            "SNOMED mapping.")


#
# Parameter node
#
@parameterNodeWrapper
class TuckerSegParameterNode:
    """The panel's state, saved with the scene.

    inputVolume: the CT. outputSegmentation: None = create one on success.
    minAgreement: the quality target (the default control): each network is the cheapest whose
    validated agreement (mean Dice of its argmax vs the original's) is at least this.
    expertRatio: run at the fixed ``ratio`` instead of the quality target.
    ratio: fraction of MACs kept (``budget`` policy) or of ranks (others); 1.0 = original network.
    subset: comma-separated structure names, empty = all 117.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    task: Annotated[str, Choice(["total"])] = "total"
    quality: Annotated[str, Choice(list(QUALITIES))] = "fast"
    # The slider's decimals (2) and step (0.05) are set in the .ui: the wrapper does not consume
    # Decimals/SingleStep on a parameter (it logs "Unused annotations").
    # (0, 1] as the core's check_agreement; the spin box's range and 3 decimals are in the .ui.
    # A literal (the screenshot script reads the defaults from this source): the core's
    # DEFAULT_MIN_AGREEMENT, which the tests check it equals.
    minAgreement: Annotated[float, WithinRange(0.001, 1.0)] = 0.95
    expertRatio: bool = False
    ratio: Annotated[float, WithinRange(0.05, 1.0)] = 0.3
    policy: Annotated[str, Choice(list(POLICIES))] = "budget"
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    engine: Annotated[str, Choice(list(ENGINES))] = "auto"
    subset: str = ""


def subsetFromText(text: str) -> Optional[List[str]]:
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    return names or None


#
# TuckerSegWidget
#
class TuckerSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Keeps no logic of its own beyond GUI state."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[TuckerSegLogic] = None
        self._parameterNode: Optional[TuckerSegParameterNode] = None
        self._parameterNodeGuiTag = None
        self._run: Optional[SegmentationRun] = None
        self._dependencyGate = dependencies.DependencyGate()
        self._lastEngine = None
        self._readoutRefreshPending = False
        self._updatingStructures = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TuckerSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = TuckerSegLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self._fillStructureList()
        self.ui.structureFilterLineEdit.textChanged.connect(self.onStructureFilterChanged)
        self.ui.structureList.itemChanged.connect(self.onStructureItemChanged)
        self.ui.selectAllStructuresButton.clicked.connect(lambda: self._checkAllStructures(True))
        self.ui.clearStructuresButton.clicked.connect(lambda: self._checkAllStructures(False))
        self.ui.outputSegmentationSelector.connect(
            "currentNodeChanged(vtkMRMLNode*)", self.ui.segmentationShow3DButton.setSegmentationNode)
        self.ui.applyButton.clicked.connect(self.onApplyButton)
        self.ui.progressBar.setVisible(False)
        self.ui.summaryLabel.setText("")
        self.ui.statusLabel.setText("")

        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._run is not None and not self._run.done:
            self._run.cancel()
        if self.logic is not None:
            self.logic.shutdown()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        if self._run is not None and not self._run.done:
            self._run.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node ---------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, inputParameterNode: Optional[TuckerSegParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        node = self._parameterNode
        if node is None:
            return
        running = self._run is not None and not self._run.done
        if running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the segmentation; the scene is left as it was")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.text = _("Apply")
            self.ui.applyButton.enabled = node.inputVolume is not None
            self.ui.applyButton.toolTip = (_("Segment the input volume") if node.inputVolume
                                           else _("Select an input volume"))
        if node.inputVolume:
            self.ui.outputSegmentationSelector.baseName = node.inputVolume.GetName() + " segmentation"
        self.ui.parametersCollapsibleButton.enabled = not running
        self.ui.structuresCollapsibleButton.enabled = not running
        if self._lastEngine is not None and node.engine != self._lastEngine and not running:
            # What the chosen engine needs is offered now, not at the next run (after this update).
            engine = node.engine
            qt.QTimer.singleShot(0, lambda: self._ensureDependencies(engine))
        self._lastEngine = node.engine
        self.ui.qualityInfoLabel.text = _("{mm:g} mm resampling").format(mm=QUALITY_SPACING_MM[node.quality])
        self.ui.minAgreementSpinBox.enabled = not node.expertRatio
        self.ui.ratioSliderWidget.enabled = node.expertRatio
        self.ui.costLabel.text = cost_readout.readout(
            node.task, node.quality, node.ratio, node.policy,
            None if node.expertRatio else node.minAgreement)
        if cost_readout.MEASURING in self.ui.costLabel.text and not self._readoutRefreshPending:
            # a detached search is measuring the curve: read it again until it is done
            self._readoutRefreshPending = True
            qt.QTimer.singleShot(int(1000 * cost_readout.REFRESH_SECONDS), self._refreshReadout)
        self._syncStructureChecks(subsetFromText(node.subset))

    def _refreshReadout(self) -> None:
        self._readoutRefreshPending = False
        self._onParameterNodeModified()

    # -- structures checklist -----------------------------------------------------------------
    def _fillStructureList(self) -> None:
        self._updatingStructures = True
        self.ui.structureList.clear()
        for name in structures.structure_names("total"):
            item = qt.QListWidgetItem(name)
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Unchecked)
            self.ui.structureList.addItem(item)
        self._updatingStructures = False
        self._updateStructureCount()

    def _items(self):
        return [self.ui.structureList.item(i) for i in range(self.ui.structureList.count)]

    def _syncStructureChecks(self, subset: Optional[List[str]]) -> None:
        chosen = set(subset or [])
        self._updatingStructures = True
        for item in self._items():
            item.setCheckState(qt.Qt.Checked if item.text() in chosen else qt.Qt.Unchecked)
        self._updatingStructures = False
        self._updateStructureCount()

    def _checkAllStructures(self, checked: bool) -> None:
        if self._parameterNode is None:
            return
        visible = [item.text() for item in self._items() if not item.isHidden()]
        chosen = set(subsetFromText(self._parameterNode.subset) or [])
        chosen = chosen | set(visible) if checked else chosen - set(visible)
        order = structures.structure_names("total")
        self._parameterNode.subset = ",".join(n for n in order if n in chosen)

    def onStructureItemChanged(self, item) -> None:
        if self._updatingStructures or self._parameterNode is None:
            return
        chosen = [i.text() for i in self._items() if i.checkState() == qt.Qt.Checked]
        self._parameterNode.subset = ",".join(chosen)

    def onStructureFilterChanged(self, text: str) -> None:
        needle = text.strip().lower().replace(" ", "_")
        for item in self._items():
            item.setHidden(bool(needle) and needle not in item.text().lower())

    def _updateStructureCount(self) -> None:
        total = self.ui.structureList.count
        chosen = sum(1 for i in self._items() if i.checkState() == qt.Qt.Checked)
        self.ui.structureCountLabel.text = (
            _("All {n} structures").format(n=total) if chosen == 0
            else _("{k} of {n} structures").format(k=chosen, n=total))

    # -- run ------------------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        if self._run is not None and not self._run.done:
            self._run.cancel()
            return
        node = self._parameterNode
        self.ui.logText.clear()
        self.ui.summaryLabel.setText("")
        self._setStatus("")
        if not self._ensureDependencies(node.engine):
            return
        try:
            choice = compression_choice(node.expertRatio, node.ratio, node.minAgreement)
            self._run = self.logic.processAsync(
                node.inputVolume, node.outputSegmentation, ratio=choice["ratio"],
                minAgreement=choice["min_agreement"], task=node.task,
                quality=node.quality, policy=node.policy, device=node.device, engine=node.engine,
                subset=subsetFromText(node.subset),
                onProgress=self._onProgress, onLog=self._onLog, onFinished=self._onFinished,
                onError=self._onError, onCancelled=self._onCancelled)
        except Exception as exc:  # bad input: one line in the panel
            self._onError(str(exc))
            return
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.setRange(0, 0)  # busy until the first progress event
        self._onParameterNodeModified()

    def _ensureDependencies(self, engine: str) -> bool:
        """Offer once what ``engine`` needs and install it as the TotalSegmentator extension does;
        False while something is still missing (declined or failed)."""
        offer = self._dependencyGate.to_offer(engine)
        if offer:
            self._dependencyGate.answered(offer)
            if slicer.util.confirmOkCancelDisplay(
                    _("TuckerSeg needs these Python packages in Slicer's Python:\n{pkgs}\n\n"
                      "Install them now? This downloads up to a few GB and may take several "
                      "minutes. Slicer's own SimpleITK is kept.").format(pkgs="\n".join(offer)),
                    windowTitle=_("Install dependencies")):
                try:
                    with slicer.util.WaitCursor():
                        dependencies.install(offer, log=self._onLog)
                except Exception as exc:
                    self._onError(_("Installing dependencies failed: {err}").format(err=exc))
                    return False
        missing = self._dependencyGate.missing(engine)
        if missing:
            self._setStatus(_("Missing Python packages ({pkgs}): nothing was run.").format(
                pkgs=", ".join(missing)), error=True)
            return False
        return True

    def _onProgress(self, fraction: float, message: str) -> None:
        if fraction >= 0:
            self.ui.progressBar.setRange(0, 1000)
            self.ui.progressBar.setValue(int(round(1000 * fraction)))
        if message:
            self.ui.progressBar.setFormat(f"{message} %p%" if fraction >= 0 else message)

    def _onLog(self, message: str) -> None:
        self.ui.logText.appendPlainText(message)

    def _onFinished(self, summary: dict) -> None:
        self.ui.progressBar.setVisible(False)
        self.ui.summaryLabel.setText(cost_readout.format_summary(summary))
        output = slicer.mrmlScene.GetNodeByID(summary["output_node_id"])
        if self._parameterNode is not None and output is not None:
            self._parameterNode.outputSegmentation = output
        if output is not None:
            self.ui.segmentationShow3DButton.setSegmentationNode(output)
        self._setStatus(_("Done."))
        self._onParameterNodeModified()

    def _onError(self, message: str) -> None:
        self.ui.progressBar.setVisible(False)
        self._setStatus(_("Error: {msg}").format(msg=message), error=True)
        self._onLog("ERROR: " + message)
        self._onParameterNodeModified()

    def _onCancelled(self) -> None:
        self.ui.progressBar.setVisible(False)
        self._setStatus(_("Cancelled: the scene was left unchanged."))
        self._onParameterNodeModified()

    def _setStatus(self, text: str, error: bool = False) -> None:
        self.ui.statusLabel.setText(text)
        self.ui.statusLabel.setStyleSheet("color: #c0392b" if error else "")


#
# TuckerSegLogic
#
class TuckerSegLogic(ScriptedLoadableModuleLogic):
    """Console API. ``process`` runs to the end; ``processAsync`` returns at once and reports
    through callbacks on Slicer's main thread (a QTimer polls the worker)."""

    def __init__(self, warmWorker: bool = True) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._timers = {}
        # One worker process for the session (shared by every logic): the second run on another
        # volume pays neither imports nor model loading. ``warmWorker=False``: a new process per run.
        self.warmWorker: Optional[WarmWorker] = shared_worker() if warmWorker else None
        # Segment entries point at our terminology context (65 of the 117 structures are not in
        # Slicer's DICOM master list): load it into the Terminologies module once.
        try:
            terminology.register_context()
        except Exception:  # never block the module on it: segments then show codes only
            logging.exception("TuckerSeg: could not load the terminology context")

    def getParameterNode(self):
        return TuckerSegParameterNode(super().getParameterNode())

    def process(self, inputVolume, outputSegmentation=None, ratio: Optional[float] = None,
                task: str = "total", quality: str = "fast", device: str = "auto",
                subset: Optional[List[str]] = None, policy: str = "budget", engine: str = "auto",
                logCallback: Optional[Callable[[str], None]] = None,
                minAgreement: Optional[float] = None) -> dict:
        """Segment ``inputVolume`` and return the summary (raises on error or cancel).

        ``minAgreement``: the quality target (neither it nor ``ratio`` given: 0.95, the core's
        default); ``ratio``: experts, a fixed compression ratio instead (not both).
        ``outputSegmentation`` None creates a new segmentation node. Slicer keeps repainting
        while this waits, the work itself runs in a separate process.
        """
        import time

        callbacks = RunCallbacks(on_log=logCallback or logging.info)
        run = self._newRun(inputVolume, outputSegmentation, ratio, task, quality, device, subset,
                           policy, engine, callbacks, minAgreement=minAgreement).start()
        try:
            while run.poll():
                slicer.app.processEvents()
                time.sleep(0.05)
        except BaseException:
            run.cancel()
            raise
        return run.run_to_end()  # returns the summary or raises the run's error

    def processAsync(self, inputVolume, outputSegmentation=None, ratio: Optional[float] = None,
                     task: str = "total", quality: str = "fast", device: str = "auto",
                     subset: Optional[List[str]] = None, policy: str = "budget",
                     engine: str = "auto", onProgress=None, onLog=None, onFinished=None,
                     onError=None, onCancelled=None,
                     minAgreement: Optional[float] = None) -> SegmentationRun:
        """Start a run and return it (``run.cancel()`` stops it); ``ratio`` and ``minAgreement``
        as in ``process``. Callbacks: ``onProgress(fraction,
        message)``, ``onLog(text)``, ``onFinished(summary)``, ``onError(message)``, ``onCancelled()``."""
        callbacks = RunCallbacks()
        if onProgress:
            callbacks.on_progress = onProgress
        if onLog:
            callbacks.on_log = onLog
        if onFinished:
            callbacks.on_finished = onFinished
        if onError:
            callbacks.on_error = onError
        if onCancelled:
            callbacks.on_cancelled = onCancelled
        run = self._newRun(inputVolume, outputSegmentation, ratio, task, quality, device, subset,
                           policy, engine, callbacks, minAgreement=minAgreement).start()
        timer = qt.QTimer()
        timer.setInterval(POLL_INTERVAL_MS)

        def poll():
            try:
                going = run.poll()
            except Exception as exc:  # never leave a timer firing on a broken run
                logging.exception("TuckerSeg run failed")
                run.cancel()
                callbacks.on_error(str(exc))
                going = False
            if not going:
                timer.stop()
                self._timers.pop(id(run), None)

        timer.timeout.connect(poll)
        self._timers[id(run)] = timer
        timer.start()
        return run

    def _newRun(self, inputVolume, outputSegmentation, ratio, task, quality, device, subset, policy,
                engine, callbacks, commandPrefix=None, env=None, minAgreement=None) -> SegmentationRun:
        request = SegmentationRequest(ratio=ratio, task=task, quality=quality, policy=policy,
                                      device=device, engine=engine,
                                      subset=list(subset) if subset else None,
                                      min_agreement=minAgreement)
        return SegmentationRun(inputVolume, outputSegmentation, request, callbacks,
                               command_prefix=commandPrefix, env=env,
                               warm=self.warmWorker if commandPrefix is None and env is None else None)

    def shutdown(self) -> None:
        """Stop the warm worker (the module's cleanup; a later run starts a new one)."""
        if self.warmWorker is not None:
            self.warmWorker.stop()


#
# TuckerSegTest
#
WORKER_SCRIPT = r"""
import os, sys, time
from TuckerSegLib.progress import JsonProgress
p = JsonProgress()
mode = os.environ["TUCKERSEG_SELFTEST_MODE"]
p.stage("segment", "Segmenting")
if mode == "error":
    p.error("weights for task total are not installed")
    sys.exit(2)
if mode == "hang":
    p.update(0.1, "patch 1")
    time.sleep(600)
for k in range(4):
    p.update((k + 1) / 4, "patch %d" % (k + 1))
p.result({"output": os.environ["TUCKERSEG_SELFTEST_LABELS"], "labels": {"1": "spleen", "5": "liver"},
          "seconds": 0.1, "params": 10, "macs": 20, "params_original": 30, "macs_original": 60,
          "ratio": 0.3})
"""


class TuckerSegTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (CTest): parameter node, a real worker process driven by the QTimer,
    import into the scene, error and cancel leaving the scene unchanged."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ParameterNode()
        self.setUp()
        self.test_StructureList()
        self.setUp()
        self.test_AsyncRunImportsSegments()
        self.setUp()
        self.test_ErrorAndCancelLeaveSceneUnchanged()

    # helpers
    def _volumes(self):
        import numpy as np

        ct = np.full((10, 12, 14), -1000, np.int16)
        ct[2:8, 3:9, 3:11] = 40
        volume = slicer.util.addVolumeFromArray(ct, name="CT")
        volume.SetSpacing(3, 3, 3)
        labels = np.zeros_like(ct, dtype=np.uint8)
        labels[2:4, 3:5, 3:5] = 1
        labels[5:8, 3:9, 3:11] = 5
        labelmap = slicer.util.addVolumeFromArray(labels, name="labels",
                                                  nodeClassName="vtkMRMLLabelMapVolumeNode")
        labelmap.SetSpacing(3, 3, 3)
        from TuckerSegUtils.volume_io import export_volume

        path = os.path.join(slicer.app.temporaryPath, "TuckerSegSelfTestLabels.nii.gz")
        export_volume(labelmap, path)
        slicer.mrmlScene.RemoveNode(labelmap)
        return volume, path

    def _wait(self, run, seconds=60):
        import time

        deadline = time.time() + seconds
        while not run.done and time.time() < deadline:
            slicer.app.processEvents()
            time.sleep(0.02)
        self.assertTrue(run.done, "the run did not end")

    def _run(self, volume, output, mode, labelsPath="", **callbacks):
        from TuckerSegUtils.worker import python_executable

        env = dict(os.environ, TUCKERSEG_SELFTEST_MODE=mode, TUCKERSEG_SELFTEST_LABELS=labelsPath)
        logic = TuckerSegLogic()
        run = logic._newRun(volume, output, 0.3, "total", "fast", "cpu", None, "budget", "auto",
                            RunCallbacks(**callbacks),
                            commandPrefix=[python_executable(), "-c", WORKER_SCRIPT], env=env)
        run.start()
        timer = qt.QTimer()
        timer.timeout.connect(run.poll)
        timer.start(50)
        return run, timer

    @staticmethod
    def _snapshot():
        from TuckerSegUtils.segmentation_import import scene_snapshot
        return scene_snapshot(slicer.mrmlScene)

    # tests
    def test_ParameterNode(self):
        node = TuckerSegLogic().getParameterNode()
        self.assertEqual(node.ratio, 0.3)
        self.assertEqual(node.minAgreement, 0.95)
        self.assertFalse(node.expertRatio)
        self.assertEqual(node.quality, "fast")
        node.ratio = 0.5
        self.assertEqual(TuckerSegLogic().getParameterNode().ratio, 0.5)
        self.delayDisplay("Parameter node OK")

    def test_StructureList(self):
        names = structures.structure_names("total")
        self.assertEqual(len(names), 117)
        self.assertEqual(names[0], "spleen")

    def test_AsyncRunImportsSegments(self):
        volume, labelsPath = self._volumes()
        finished = []
        progress = []
        run, timer = self._run(volume, None, "ok", labelsPath, on_finished=finished.append,
                               on_progress=lambda f, m: progress.append(f))
        self._wait(run)
        timer.stop()
        self.assertEqual(run.state, "finished", run.error)
        node = slicer.mrmlScene.GetNodeByID(finished[0]["output_node_id"])
        seg = node.GetSegmentation()
        self.assertEqual(sorted(seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())),
                         ["liver", "spleen"])
        self.assertEqual(node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()), volume)
        self.assertEqual(progress[-1], 1.0)
        self.delayDisplay("Async run OK")

    def test_ErrorAndCancelLeaveSceneUnchanged(self):
        volume, _labels = self._volumes()
        before = self._snapshot()
        errors = []
        run, timer = self._run(volume, None, "error", on_error=errors.append)
        self._wait(run)
        timer.stop()
        self.assertEqual(errors, ["weights for task total are not installed"])
        self.assertEqual(self._snapshot(), before)

        cancelled = []
        progress = []
        run, timer = self._run(volume, None, "hang", on_cancelled=lambda: cancelled.append(1),
                               on_progress=lambda f, m: progress.append(f))
        import time
        deadline = time.time() + 60
        while not any(0 < f < 1 for f in progress) and time.time() < deadline:
            slicer.app.processEvents()
            time.sleep(0.02)
        run.cancel()
        timer.stop()
        self.assertEqual(cancelled, [1])
        self.assertIsNotNone(run.worker.process.poll())
        self.assertEqual(self._snapshot(), before)
        self.delayDisplay("Error and cancel OK")
