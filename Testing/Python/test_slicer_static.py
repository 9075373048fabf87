"""Static checks of the Slicer extension: what a Slicer build would trip over, found without one.

CMake lists name only files that exist (and name all of the module's helpers); the .ui has every
widget the module uses and binds only existing parameters to suitable widgets; the Extensions
Index entry has the fields its schema requires; the module keeps the console API of the README.
"""
from __future__ import annotations

import ast
import json
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "TuckerSeg"
MODULE_PY = MODULE / "TuckerSeg.py"
UI = MODULE / "Resources" / "UI" / "TuckerSeg.ui"
CATALOG = REPO / "TuckerSeg.json"

# Slicer's catalog schema v1.0.1 ("additionalProperties": false)
CATALOG_FIELDS = {"$schema", "build_dependencies", "build_subdirectory", "category", "enabled",
                  "scm_revision", "scm_type", "scm_url", "tier"}


def _strip_comments(text: str) -> str:
    return "\n".join(line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
                     for line in text.splitlines())


def cmake_sets(path: Path) -> dict:
    """``set(NAME values...)`` of a CMake file, ``${VAR}`` expanded from earlier sets."""
    text = _strip_comments(path.read_text())
    values: dict = {}
    for name, body in re.findall(r"\bset\(\s*(\w+)\s+(.*?)\)", text, flags=re.S):
        tokens = re.findall(r'"[^"]*"|\S+', body)
        expanded = []
        for token in tokens:
            token = token.strip('"')
            token = re.sub(r"\$\{(\w+)\}", lambda m: " ".join(values.get(m.group(1), [m.group(0)])), token)
            expanded.append(token)
        values[name] = expanded
    return values


def cmake_calls(path: Path, command: str) -> list:
    text = _strip_comments(path.read_text())
    return re.findall(rf"\b{command}\((.*?)\)", text, flags=re.S | re.I)


# -- CMake ------------------------------------------------------------------------------------
def test_top_level_cmake_is_an_extension_that_depends_on_pytorch():
    path = REPO / "CMakeLists.txt"
    text = _strip_comments(path.read_text())
    sets = cmake_sets(path)
    assert re.search(r"\bproject\(\s*TuckerSeg\s*\)", text)
    for field in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS",
                  "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_DEPENDS", "EXTENSION_STATUS"):
        assert sets.get(field) and any(v for v in sets[field]), field
    assert "PyTorch" in sets["EXTENSION_DEPENDS"]
    order = [text.index(s) for s in ("find_package(Slicer", "include(${Slicer_USE_FILE})",
                                     "add_subdirectory(TuckerSeg)",
                                     "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                                     "include(${Slicer_EXTENSION_CPACK})")]
    assert order == sorted(order)


def test_module_cmake_lists_only_existing_files_and_all_module_scripts():
    path = MODULE / "CMakeLists.txt"
    sets = cmake_sets(path)
    scripts, resources = sets["MODULE_PYTHON_SCRIPTS"], sets["MODULE_PYTHON_RESOURCES"]
    assert "TuckerSeg.py" in scripts
    for name in scripts + resources:
        assert (MODULE / name).is_file(), f"CMake names {name}, which does not exist"
    on_disk = {p.relative_to(MODULE).as_posix() for p in (MODULE / "TuckerSegUtils").glob("*.py")}
    assert on_disk <= set(scripts), f"not installed by CMake: {sorted(on_disk - set(scripts))}"
    used_resources = set(re.findall(r'resourcePath\("([^"]+)"\)', MODULE_PY.read_text()))
    assert {f"Resources/{r}" for r in used_resources} <= set(resources)
    assert {"Resources/Icons/TuckerSeg.png", "Resources/UI/TuckerSeg.ui",
            "Resources/total_structures.json"} <= set(resources)

    build = cmake_calls(path, "slicerMacroBuildScriptedModule")
    assert len(build) == 1 and "WITH_GENERIC_TESTS" in build[0]
    assert "SCRIPTS ${MODULE_PYTHON_SCRIPTS}" in build[0] and "RESOURCES ${MODULE_PYTHON_RESOURCES}" in build[0]
    tests = cmake_calls(path, "slicer_add_python_unittest")
    assert tests and "SCRIPT ${MODULE_NAME}.py" in tests[0]


def test_core_package_is_installed_with_the_module():
    """TuckerSegLib (../TuckerSegLib) is globbed and installed beside the module."""
    path = MODULE / "CMakeLists.txt"
    sets = cmake_sets(path)
    source_dir = sets["TUCKERSEGLIB_SOURCE_DIR"][0].replace("${CMAKE_CURRENT_SOURCE_DIR}", str(MODULE))
    source_dir = Path(source_dir).resolve()
    assert source_dir == REPO
    globs = cmake_calls(path, "file")
    patterns = [re.search(r"\$\{TUCKERSEGLIB_SOURCE_DIR\}/(\S+)", g).group(1)
                for g in globs if "GLOB_RECURSE" in g]
    assert "TuckerSegLib/*.py" in patterns
    files = {p.relative_to(source_dir).as_posix() for p in source_dir.glob("TuckerSegLib/**/*.py")}
    assert {"TuckerSegLib/__init__.py", "TuckerSegLib/__main__.py", "TuckerSegLib/progress.py",
            "TuckerSegLib/errors.py", "TuckerSegLib/cli/main.py"} <= files
    compile_call = cmake_calls(path, "ctkMacroCompilePythonScript")
    assert len(compile_call) == 1
    assert "SOURCE_DIR ${TUCKERSEGLIB_SOURCE_DIR}" in compile_call[0]
    assert "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}" in compile_call[0]
    assert "INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}" in compile_call[0]


def test_icon_is_a_128px_png():
    data = (MODULE / "Resources" / "Icons" / "TuckerSeg.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (128, 128)


# -- .ui and parameter node --------------------------------------------------------------------
def ui_widgets() -> dict:
    root = ET.parse(UI).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def ui_names_used_by_module() -> set:
    tree = ast.parse(MODULE_PY.read_text())
    used = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ui" and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"):
            used.add(node.attr)
    return used


def parameter_fields() -> dict:
    """Field name -> annotation source of the @parameterNodeWrapper class."""
    tree = ast.parse(MODULE_PY.read_text())
    classes = [c for c in tree.body if isinstance(c, ast.ClassDef)
               and any(getattr(d, "id", None) == "parameterNodeWrapper" for d in c.decorator_list)]
    assert len(classes) == 1, "exactly one @parameterNodeWrapper class"
    return {n.target.id: ast.unparse(n.annotation) for n in classes[0].body
            if isinstance(n, ast.AnnAssign)}


def test_every_widget_the_module_uses_exists_in_the_ui():
    used = ui_names_used_by_module()
    widgets = ui_widgets()
    assert len(used) > 10
    missing = sorted(used - set(widgets))
    assert not missing, f"TuckerSeg.py uses self.ui.{missing} which the .ui does not define"


def test_custom_widget_classes_are_declared():
    root = ET.parse(UI).getroot()
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    custom = {c for c in used if not c.startswith("Q")}
    assert custom <= declared, sorted(custom - declared)


def _compatible(widget_class: str, annotation: str) -> bool:
    if "vtkMRML" in annotation:
        return widget_class == "qMRMLNodeComboBox"
    if annotation.startswith("Annotated[float") or annotation == "float":
        return widget_class in ("ctkSliderWidget", "QDoubleSpinBox")
    if annotation.startswith("Annotated[str") and "Choice(" in annotation:
        return widget_class == "QComboBox"
    if annotation == "str":
        return widget_class in ("QLineEdit", "QTextEdit", "ctkSearchBox")
    if annotation == "bool":
        return widget_class in ("QCheckBox", "QPushButton")
    return False


def test_every_slicer_parameter_name_maps_to_a_parameter_with_a_suitable_widget():
    fields = parameter_fields()
    bound = {}
    for name, widget in ui_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = widget.get("class")
    assert bound, "no widget is bound to the parameter node"
    for parameter, widget_class in bound.items():
        assert parameter in fields, f"SlicerParameterName {parameter!r} is not a parameter"
        assert _compatible(widget_class, fields[parameter]), (parameter, widget_class, fields[parameter])
    # every parameter but the checklist's (kept by code) has a widget
    assert set(fields) - set(bound) == {"subset"}


@pytest.mark.parametrize("parameter, widget", [("ratio", "ratioSliderWidget"),
                                               ("minAgreement", "minAgreementSpinBox")])
def test_slider_and_spin_box_ranges_match_the_parameters(parameter, widget):
    fields = parameter_fields()
    low, high = map(float, re.search(r"WithinRange\(([\d.]+), ([\d.]+)\)", fields[parameter]).groups())
    props = {p.get("name"): p for p in ui_widgets()[widget].findall("property")}
    assert float(props["minimum"].findtext("double")) == low and float(props["maximum"].findtext("double")) == high


def test_quality_target_is_the_default_control_and_the_ratio_is_for_experts():
    from TuckerSegLib.specs import DEFAULT_MIN_AGREEMENT

    widgets = ui_widgets()
    spin = {p.get("name"): p for p in widgets["minAgreementSpinBox"].findall("property")}
    assert float(spin["value"].findtext("double")) == DEFAULT_MIN_AGREEMENT
    assert 0.0 < float(spin["minimum"].findtext("double")) and float(spin["maximum"].findtext("double")) == 1.0
    slider = {p.get("name"): p for p in widgets["ratioSliderWidget"].findall("property")}
    assert slider["enabled"].findtext("bool") == "false"  # until "Expert: fixed ratio" is ticked
    assert widgets["expertRatioCheckBox"].find("property/string").text == "Expert: fixed ratio"
    fields = parameter_fields()
    assert fields["expertRatio"] == "bool" and fields["minAgreement"].startswith("Annotated[float")
    assert "speed-up" not in UI.read_text() and "speed-up" not in MODULE_PY.read_text()


# -- module structure and console API ----------------------------------------------------------
def test_module_has_module_widget_logic_and_self_test_classes():
    source = MODULE_PY.read_text()
    compile(source, str(MODULE_PY), "exec")
    tree = ast.parse(source)
    classes = {c.name: c for c in tree.body if isinstance(c, ast.ClassDef)}
    for name, base in (("TuckerSeg", "ScriptedLoadableModule"), ("TuckerSegWidget", "ScriptedLoadableModuleWidget"),
                       ("TuckerSegLogic", "ScriptedLoadableModuleLogic"), ("TuckerSegTest", "ScriptedLoadableModuleTest")):
        assert name in classes and base in [ast.unparse(b) for b in classes[name].bases], name
    methods = {f.name for f in classes["TuckerSegTest"].body if isinstance(f, ast.FunctionDef)}
    assert "runTest" in methods and sum(m.startswith("test_") for m in methods) >= 3


def test_console_api_signature():
    tree = ast.parse(MODULE_PY.read_text())
    logic = next(c for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "TuckerSegLogic")
    funcs = {f.name: f for f in logic.body if isinstance(f, ast.FunctionDef)}
    for name in ("process", "processAsync"):
        args = funcs[name].args
        names = [a.arg for a in args.args]
        assert names[:3] == ["self", "inputVolume", "outputSegmentation"], name
        defaults = dict(zip(names[-len(args.defaults):], [ast.literal_eval(d) for d in args.defaults]))
        # neither ratio nor minAgreement given: the core's default quality target (0.95)
        assert defaults["ratio"] is None and defaults["minAgreement"] is None
        assert defaults["task"] == "total" and defaults["quality"] == "fast"
        assert defaults["device"] == "auto" and defaults["subset"] is None
    assert {"onProgress", "onLog", "onFinished", "onError", "onCancelled"} <= \
        {a.arg for a in funcs["processAsync"].args.args}


# -- Extensions Index entry --------------------------------------------------------------------
def test_catalog_entry_has_the_required_fields():
    entry = json.loads(CATALOG.read_text())
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/")
    assert "slicer-extension-catalog-entry-schema" in entry["$schema"]
    for field in ("category", "scm_url", "scm_revision", "build_dependencies", "tier"):
        assert field in entry, field
    assert set(entry) <= CATALOG_FIELDS, sorted(set(entry) - CATALOG_FIELDS)
    assert entry["scm_url"].startswith("https://") and entry["scm_revision"]
    assert entry["tier"] in (1, 3, 5)
    sets = cmake_sets(REPO / "CMakeLists.txt")
    assert entry["category"] == " ".join(sets["EXTENSION_CATEGORY"])
    assert entry["build_dependencies"] == sets["EXTENSION_DEPENDS"]


def test_module_annotations_stay_real_types():
    """parameterNodeWrapper inspects the class annotations: postponed (string) ones would break it."""
    tree = ast.parse(MODULE_PY.read_text())
    assert not any(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in tree.body)


def test_names_the_module_imports_from_its_helpers_exist():
    import importlib
    import sys

    sys.path.insert(0, str(MODULE))
    try:
        tree = ast.parse(MODULE_PY.read_text())
        imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                   and (n.module or "").startswith("TuckerSegUtils")]
        assert imports
        for node in imports:
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    importlib.import_module(f"{node.module}.{alias.name}")  # a submodule
    finally:
        sys.path.remove(str(MODULE))
