"""Render the TuckerSeg panel to Screenshots/TuckerSeg-panel.png without Slicer.

The Extensions Index wants a screenshot, and Slicer cannot run on the build machines. This loads
the module's own ``TuckerSeg/Resources/UI/TuckerSeg.ui`` with PySide6's ``QUiLoader`` under
``QT_QPA_PLATFORM=offscreen``. The CTK/MRML classes that the .ui uses are drawn by small plain-Qt
stand-ins (named after the classes they replace, so the loader picks them up):

- ``qMRMLWidget``: a QWidget;
- ``ctkCollapsibleButton``: a QWidget that paints a button header with an arrow above its
  contents (and hides them when ``collapsed``, as Structures and Log are when the module opens);
- ``ctkSliderWidget``: a QSlider + QDoubleSpinBox row;
- ``qMRMLNodeComboBox``: a QComboBox showing a node name (or ``noneDisplay``);
- ``ctkSearchBox``: a QLineEdit with a clear button;
- ``qMRMLSegmentationShow3DButton`` (``ctkMenuButton``): a QPushButton with a menu.

The panel is then put in the state ``TuckerSegWidget.setup`` + ``_onParameterNodeModified`` leave
it in when a CT is loaded: combo boxes filled with the real choice lists (``TuckerSegLib.specs``)
and set to the parameter node's defaults (read from ``TuckerSeg/TuckerSeg.py``), the ratio at its
default, the quality target at its default (the ratio slider off until "Expert: fixed ratio"),
the read-out of ``TuckerSegUtils.cost_readout.readout`` as on a fresh install (no quality curve
measured yet), the 117 structures listed, the progress bar hidden.

Installs nothing. Needs PySide6 importable, e.g.::

    python -m pip install --target /tmp/pyside PySide6-Essentials
    PYTHONPATH=/tmp/pyside python Testing/render_panel_screenshot.py [--out PATH] [--width 420]
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

REPO = Path(__file__).resolve().parents[1]
UI_FILE = REPO / "TuckerSeg" / "Resources" / "UI" / "TuckerSeg.ui"
MODULE_FILE = REPO / "TuckerSeg" / "TuckerSeg.py"
DEFAULT_OUT = REPO / "Screenshots" / "TuckerSeg-panel.png"
VOLUME_NAME = "CT chest abdomen"  # a plausible loaded CT, shown by the input volume selector

for _path in (REPO, REPO / "TuckerSeg"):  # TuckerSegLib and the module's TuckerSegUtils
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from PySide6.QtCore import QFile, QIODevice, QRect, QSize, Qt, Property, qInstallMessageHandler  # noqa: E402
from PySide6.QtGui import QColor, QFont, QPainter, QPalette  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402
from PySide6.QtWidgets import (QApplication, QComboBox, QDoubleSpinBox, QHBoxLayout,  # noqa: E402
                               QLabel, QLineEdit, QListWidgetItem, QMenu, QPushButton, QSlider, QStyle,
                               QStyleOptionButton, QWidget)

from TuckerSegLib.specs import DEVICES, ENGINES, MODES, POLICIES  # noqa: E402
from TuckerSegUtils import cost_readout, structures  # noqa: E402
from TuckerSegUtils.run import QUALITY_SPACING_MM  # noqa: E402


def parameter_defaults(path: Path = MODULE_FILE) -> dict:
    """``TuckerSegParameterNode``'s defaults, read from the module source (it needs Slicer)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "TuckerSegParameterNode":
            return {stmt.target.id: ast.literal_eval(stmt.value) for stmt in node.body
                    if isinstance(stmt, ast.AnnAssign) and stmt.value is not None}
    raise RuntimeError(f"TuckerSegParameterNode not found in {path}")


# -- stand-ins for the Slicer/CTK classes in the .ui ---------------------------------------------
class qMRMLWidget(QWidget):
    pass


class ctkCollapsibleButton(QWidget):
    """A button-like header with an arrow, its contents below (hidden when collapsed)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._text = ""
        self._collapsed = False
        self._header = self.fontMetrics().height() + 12
        self.setContentsMargins(4, self._header + 4, 4, 4)

    def _get_text(self):
        return self._text

    def _set_text(self, text):
        self._text = text
        self.update()

    def _get_collapsed(self):
        return self._collapsed

    def _set_collapsed(self, collapsed):
        self._collapsed = bool(collapsed)
        self.setContentsMargins(4, self._header + (0 if collapsed else 4), 4, 0 if collapsed else 4)
        for child in self.findChildren(QWidget, options=Qt.FindDirectChildrenOnly):
            child.setVisible(not collapsed)
        self.updateGeometry()

    text = Property(str, _get_text, _set_text)
    collapsed = Property(bool, _get_collapsed, _set_collapsed)

    def sizeHint(self):
        if self._collapsed:
            return QSize(super().sizeHint().width(), self._header)
        return super().sizeHint()

    def minimumSizeHint(self):
        return self.sizeHint() if self._collapsed else super().minimumSizeHint()

    def paintEvent(self, event):
        painter = QPainter(self)
        style = self.style()
        option = QStyleOptionButton()
        option.initFrom(self)
        option.rect = QRect(0, 0, self.width(), self._header)
        style.drawControl(QStyle.CE_PushButtonBevel, option, painter, self)
        arrow = QStyleOptionButton()
        arrow.initFrom(self)
        size = self._header - 10
        arrow.rect = QRect(6, (self._header - size) // 2, size, size)
        style.drawPrimitive(QStyle.PE_IndicatorArrowRight if self._collapsed
                            else QStyle.PE_IndicatorArrowDown, arrow, painter, self)
        painter.setPen(self.palette().color(QPalette.ButtonText if self.isEnabled()
                                            else QPalette.PlaceholderText))
        painter.drawText(QRect(size + 12, 0, self.width() - size - 16, self._header),
                         Qt.AlignVCenter | Qt.AlignLeft, self._text)
        if not self._collapsed:  # ctkCollapsibleButton's default contents frame
            painter.setPen(self.palette().color(QPalette.Mid))
            painter.drawRect(0, self._header, self.width() - 1, self.height() - self._header - 1)


class ctkSliderWidget(QWidget):
    """QSlider + QDoubleSpinBox, kept in step like ctkSliderWidget."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._slider = QSlider(Qt.Horizontal, self)
        self._spin = QDoubleSpinBox(self)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self._slider, 1)
        layout.addWidget(self._spin)
        self._spin.valueChanged.connect(self._sync_slider)
        self._slider.valueChanged.connect(lambda v: self._spin.setValue(v / 1000.0))
        self._slider.setRange(0, 1000)

    def _sync_slider(self, value):
        self._slider.blockSignals(True)
        self._slider.setRange(round(self._spin.minimum() * 1000), round(self._spin.maximum() * 1000))
        self._slider.setValue(round(value * 1000))
        self._slider.blockSignals(False)

    def _spin_property(getter_name, setter_name, kind=float):
        def getter(self):
            return getattr(self._spin, getter_name)()

        def setter(self, value):
            getattr(self._spin, setter_name)(value)
            self._sync_slider(self._spin.value())
        return Property(kind, getter, setter)

    decimals = _spin_property("decimals", "setDecimals", int)
    singleStep = _spin_property("singleStep", "setSingleStep")
    minimum = _spin_property("minimum", "setMinimum")
    maximum = _spin_property("maximum", "setMaximum")
    value = _spin_property("value", "setValue")
    del _spin_property

    def _get_page_step(self):
        return self._slider.pageStep() / 1000.0

    def _set_page_step(self, step):
        self._slider.setPageStep(round(step * 1000))

    pageStep = Property(float, _get_page_step, _set_page_step)


class qMRMLNodeComboBox(QComboBox):
    """Shows one node name, or ``noneDisplay`` when no node is selected."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._none_display = "None"
        self.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)

    def _get_none_display(self):
        return self._none_display

    def _set_none_display(self, text):
        self._none_display = text

    noneDisplay = Property(str, _get_none_display, _set_none_display)

    def showNode(self, name=None):
        self.clear()
        self.addItem(name if name else self._none_display)


class ctkSearchBox(QLineEdit):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.setClearButtonEnabled(True)


class ctkMenuButton(QPushButton):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.setMenu(QMenu(self))


class qMRMLSegmentationShow3DButton(ctkMenuButton):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.setCheckable(True)


STAND_INS = (qMRMLWidget, ctkCollapsibleButton, ctkSliderWidget, qMRMLNodeComboBox, ctkSearchBox,
             ctkMenuButton, qMRMLSegmentationShow3DButton)


def _quiet(mode, context, message):
    # The .ui's two connections pass a vtkMRMLScene*, which plain Qt cannot connect: expected.
    if "vtkMRMLScene" in message or "mrmlSceneChanged" in message:
        return
    sys.stderr.write(message + "\n")


def light_palette() -> QPalette:
    """Slicer's light theme, roughly."""
    palette = QPalette()
    palette.setColor(QPalette.Window, QColor("#f0f0f0"))
    palette.setColor(QPalette.Base, QColor("#ffffff"))
    palette.setColor(QPalette.AlternateBase, QColor("#f6f6f6"))
    palette.setColor(QPalette.Button, QColor("#e8e8e8"))
    palette.setColor(QPalette.Text, QColor("#1b1b1b"))
    palette.setColor(QPalette.WindowText, QColor("#1b1b1b"))
    palette.setColor(QPalette.ButtonText, QColor("#1b1b1b"))
    palette.setColor(QPalette.Highlight, QColor("#1f6fd0"))
    palette.setColor(QPalette.HighlightedText, QColor("#ffffff"))
    palette.setColor(QPalette.PlaceholderText, QColor("#8a8a8a"))
    for role in (QPalette.Text, QPalette.WindowText, QPalette.ButtonText):
        palette.setColor(QPalette.Disabled, role, QColor("#9a9a9a"))
    return palette


def load_panel() -> QWidget:
    loader = QUiLoader()
    for cls in STAND_INS:
        loader.registerCustomWidget(cls)
    ui = QFile(str(UI_FILE))
    if not ui.open(QIODevice.ReadOnly):
        raise RuntimeError(f"cannot open {UI_FILE}")
    panel = loader.load(ui)
    ui.close()
    if panel is None:
        raise RuntimeError(f"QUiLoader could not load {UI_FILE}: {loader.errorString()}")
    return panel


def fill_panel(panel: QWidget) -> None:
    """The state TuckerSegWidget leaves the panel in once a CT is in the scene."""
    defaults = parameter_defaults()
    child = lambda name: panel.findChild(QWidget, name)  # noqa: E731
    for button in panel.findChildren(ctkCollapsibleButton):  # children exist now: hide them
        button.collapsed = button.collapsed

    child("inputVolumeSelector").showNode(VOLUME_NAME)
    child("outputSegmentationSelector").showNode(None)  # created on Apply
    for name, choices, key in (("taskComboBox", ["total"], "task"),
                               ("qualityComboBox", MODES, "quality"),
                               ("policyComboBox", POLICIES, "policy"),
                               ("deviceComboBox", DEVICES, "device"),
                               ("engineComboBox", ENGINES, "engine")):
        combo = child(name)
        combo.clear()
        combo.addItems(list(choices))
        combo.setCurrentText(defaults[key])
    child("ratioSliderWidget").value = float(defaults["ratio"])
    child("minAgreementSpinBox").setValue(float(defaults["minAgreement"]))
    child("expertRatioCheckBox").setChecked(bool(defaults["expertRatio"]))
    child("ratioSliderWidget").setEnabled(bool(defaults["expertRatio"]))
    child("qualityInfoLabel").setText(f"{QUALITY_SPACING_MM[defaults['quality']]:g} mm resampling")
    if cost_readout.estimate(defaults["task"], defaults["quality"], defaults["ratio"], defaults["policy"]) is None:
        raise RuntimeError("TuckerSegLib.estimate.readout_cost gave no read-out")
    # A fresh install: no quality curve measured yet (an empty weights root, not this machine's).
    child("costLabel").setText(cost_readout.readout(
        defaults["task"], defaults["quality"], defaults["ratio"], defaults["policy"],
        None if defaults["expertRatio"] else defaults["minAgreement"],
        weights_root=REPO / "no-such-weights-root"))

    names = structures.structure_names(defaults["task"])
    listing = child("structureList")
    for structure in names:
        item = QListWidgetItem(structure)
        item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
        item.setCheckState(Qt.Unchecked)
        listing.addItem(item)
    child("structureCountLabel").setText(f"All {len(names)} structures")

    apply_button = child("applyButton")
    apply_button.setEnabled(True)  # an input volume is selected
    child("progressBar").setVisible(False)
    child("segmentationShow3DButton").setEnabled(False)  # no segmentation yet


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--width", type=int, default=440)
    args = parser.parse_args(argv)

    qInstallMessageHandler(_quiet)
    app = QApplication.instance() or QApplication([sys.argv[0]])
    app.setStyle("Fusion")
    app.setPalette(light_palette())
    app.setFont(QFont("DejaVu Sans", 9))

    panel = load_panel()
    fill_panel(panel)
    panel.setAttribute(Qt.WA_DontShowOnScreen, True)
    panel.show()
    panel.layout().activate()
    panel.resize(args.width, panel.minimumSizeHint().height())
    panel.layout().activate()
    app.processEvents()
    # Word-wrapped labels (the cost read-out) get one line's height from minimumSizeHint; give
    # them the lines they need at this width, then fit the panel to its contents again.
    for label in panel.findChildren(QLabel):
        if label.wordWrap() and label.text() and label.isVisible():
            label.setMinimumHeight(label.heightForWidth(label.width()))
    panel.resize(args.width, panel.minimumSizeHint().height())
    panel.layout().activate()
    app.processEvents()

    image = panel.grab()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not image.save(str(args.out), "PNG"):
        raise RuntimeError(f"could not write {args.out}")
    print(f"{args.out} ({image.width()}x{image.height()}, {args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
