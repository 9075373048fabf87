"""The extension as Slicer builds and the Extensions Index checks it, without a Slicer build.

- Every file the extension installs byte-compiles with Python 3.9 (Slicer 5.6 and 5.8).
- CMake configure / build / install of ``TuckerSeg/`` with Slicer 5.6.2's real macros and CTK's
  byte-compiling macro (from ``$TUCKERSEG_SLICER_DIR/cmake``), and CTest lists the tests.
- The Extensions Index's own checks (``check_description_files.py``) that need no network, on
  this checkout; the schema is read from the local copy instead of downloaded.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import slicer_app

REPO = slicer_app.REPO
SLICER_DIR = slicer_app.SLICER_DIR
INDEX_DIR = SLICER_DIR / "extensions-index"
CMAKE_DIR = SLICER_DIR / "cmake"


def python39() -> str:
    """A Python 3.9: ``$TUCKERSEG_PYTHON39``, ``python3.9`` on PATH, or pyenv's."""
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = [os.environ.get("TUCKERSEG_PYTHON39", "")]
    candidates += sorted(glob.glob(os.path.join(root, "versions", "3.9*", "bin", "python3.9")))
    candidates.append(shutil.which("python3.9") or "")  # may be a pyenv shim that does not run
    for path in candidates:
        if path and os.path.exists(path) and subprocess.run(
                [path, "-c", "import sys; assert sys.version_info[:2] == (3, 9)"],
                capture_output=True).returncode == 0:
            return path
    pytest.skip("no Python 3.9 found (set TUCKERSEG_PYTHON39 to one)")


def installed_python_files():
    """What the module's CMakeLists installs: its scripts and the whole TuckerSegLib package."""
    cmake = (REPO / "TuckerSeg" / "CMakeLists.txt").read_text()
    block = cmake.split("set(MODULE_PYTHON_SCRIPTS", 1)[1].split(")", 1)[0]
    scripts = [REPO / "TuckerSeg" / line.strip().replace("${MODULE_NAME}", "TuckerSeg")
               for line in block.splitlines() if line.strip()]
    return scripts + sorted((REPO / "TuckerSegLib").rglob("*.py"))


def test_every_installed_python_file_byte_compiles_with_python_3_9(tmp_path):
    files = installed_python_files()
    assert len(files) > 20 and all(f.exists() for f in files)
    code = ("import py_compile, sys\nbad = []\nfor f in sys.argv[1:]:\n    try:\n"
            "        py_compile.compile(f, cfile=f + '.pyc39', doraise=True)\n"
            "    except py_compile.PyCompileError as e:\n        bad.append(str(e).strip().splitlines()[-1] + ' in ' + f)\n"
            "print('\\n'.join(bad)); sys.exit(1 if bad else 0)")
    copies = []
    for f in files:  # compile copies: never write .pyc files into the checkout
        copy = tmp_path / f.relative_to(REPO)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, copy)
        copies.append(str(copy))
    proc = subprocess.run([python39(), "-c", code, *copies], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, "not valid Python 3.9:\n" + proc.stdout + proc.stderr


CMAKE_PROJECT = """
cmake_minimum_required(VERSION 3.16.3)
project(TuckerSegBuildCheck NONE)
# What a Slicer build defines for an extension (Slicer 5.6.2's names).
set(Slicer_USE_PYTHONQT ON)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.6/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR ${{Slicer_QTSCRIPTEDMODULES_LIB_DIR}})
set(Slicer_CLIMODULES_LIB_DIR lib/Slicer-5.6/cli-modules)
set(Slicer_QTLOADABLEMODULES_LIB_DIR lib/Slicer-5.6/qt-loadable-modules)
set(Slicer_LAUNCHER_EXECUTABLE "${{CMAKE_BINARY_DIR}}/no-launcher/Slicer")
set(Slicer_PYTHON_MODULE_TEST_TEMPLATES_DIR "{slicer_cmake}")
set(Slicer_ExternalData_DATA_MANAGEMENT_TARGET TuckerSegData)
set(ExternalData_OBJECT_STORES "${{CMAKE_BINARY_DIR}}/ExternalData")
set(CTK_CMAKE_DIR "{ctk_cmake}")
set(PYTHON_EXECUTABLE "{python39}" CACHE FILEPATH "Python 3.9, as Slicer 5.6 defines it")
set(PYTHON_LIBRARY "{python_library}" CACHE FILEPATH "")
set(PYTHON_INCLUDE_DIR "{python_include}" CACHE PATH "")
set(BUILD_TESTING ON)
enable_testing()
include(ExternalData)
include("{ctk_cmake}/ctkFunctionExtractOptimizedLibrary.cmake")
include("{ctk_cmake}/ctkMacroCompilePythonScript.cmake")
include("{slicer_cmake}/SlicerMacroPythonTesting.cmake")
include("{slicer_cmake}/SlicerMacroConfigureGenericPythonModuleTests.cmake")
include("{slicer_cmake}/SlicerMacroBuildScriptedModule.cmake")
add_subdirectory("{module}" TuckerSeg)
ExternalData_add_target(TuckerSegData)
"""


def test_cmake_configure_build_install_with_slicers_macros_and_ctest_lists_the_tests(tmp_path):
    slicer_cmake = CMAKE_DIR / "slicer-v5.6.2"
    ctk_cmake = CMAKE_DIR / "ctk-f53820a"
    if not (slicer_cmake / "SlicerMacroBuildScriptedModule.cmake").exists():
        pytest.skip(f"Slicer's CMake macros not found in {CMAKE_DIR} (set TUCKERSEG_SLICER_DIR)")
    cmake = shutil.which("cmake")
    if not cmake:
        pytest.skip("cmake is not installed")
    src, build, prefix = tmp_path / "src", tmp_path / "build", tmp_path / "install"
    src.mkdir()
    paths = subprocess.run([python39(), "-c", "import sysconfig as s, os; print(os.path.join("
                            "s.get_config_var('LIBDIR'), s.get_config_var('LDLIBRARY'))); "
                            "print(s.get_config_var('INCLUDEPY'))"],
                           capture_output=True, text=True, check=True).stdout.split("\n")
    (src / "CMakeLists.txt").write_text(CMAKE_PROJECT.format(
        python_library=paths[0], python_include=paths[1],
        slicer_cmake=slicer_cmake.as_posix(), ctk_cmake=ctk_cmake.as_posix(),
        python39=Path(python39()).as_posix(), module=(REPO / "TuckerSeg").as_posix()))

    def run(*args):
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{' '.join(map(str, args))}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        return proc.stdout

    run(cmake, "-S", str(src), "-B", str(build), f"-DCMAKE_INSTALL_PREFIX={prefix}")
    run(cmake, "--build", str(build))
    run(cmake, "--install", str(build))
    installed = prefix / "lib" / "Slicer-5.6" / "qt-scripted-modules"
    for name in ("TuckerSeg.py", "TuckerSegUtils/run.py", "TuckerSegUtils/worker.py",
                 "Resources/TuckerSeg-Terminology.json", "Resources/UI/TuckerSeg.ui",
                 "Resources/Icons/TuckerSeg.png", "TuckerSegLib/specs.py", "TuckerSegLib/estimate.py",
                 "TuckerSegLib/resources/readout_costs.json"):
        assert (installed / name).exists(), name
    # every installed script was byte-compiled by CTK's macro with the Python 3.9
    scripts = list(installed.rglob("*.py"))

    def compiled(script):
        return (script.parent / "__pycache__" / f"{script.stem}.cpython-39.pyc").exists()

    assert len(scripts) > 20 and all(compiled(s) for s in scripts), \
        [str(s) for s in scripts if not compiled(s)][:5]
    tests = run(shutil.which("ctest") or "ctest", "--test-dir", str(build), "-N")
    assert "py_TuckerSeg" in tests, tests  # the module's self-test (TuckerSegTest)
    assert "py_nomainwindow_qSlicerTuckerSegModuleGenericTest" in tests, tests


# -- Extensions Index ---------------------------------------------------------------------------
def _checker():
    path = INDEX_DIR / "check_description_files.py"
    if not path.exists():
        pytest.skip(f"the Extensions Index checks were not found in {INDEX_DIR} (set TUCKERSEG_SLICER_DIR)")
    pytest.importorskip("jsonschema", reason="jsonschema is needed by the Extensions Index checks")
    pytest.importorskip("requests", reason="requests is needed by the Extensions Index checks")
    import types

    source = path.read_text(encoding="utf-8")
    if sys.version_info < (3, 12):
        # print_categories (a listing helper we do not call) nests quotes in an f-string, which
        # needs Python 3.12: neutralise that one line so the checks load on 3.9-3.11.
        source = "\n".join("    pass  # print_categories line needs Python 3.12" if "print(f\"[\\n{" in line
                           else line for line in source.splitlines())
    module = types.ModuleType("check_description_files")
    module.__file__ = str(path)
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module


class _OfflineRequests:
    """``requests`` for the checks without network: the catalog schema from the local copy, our
    repository's raw files from this checkout; anything else fails like an unreachable host."""

    def __init__(self, real, raw_prefix: str):
        self.RequestException = real.RequestException
        self.raw_prefix = raw_prefix
        self.real = real

    def get(self, url, timeout=None):
        import requests

        response = requests.models.Response()
        response.url = url
        name = url.rsplit("/", 1)[-1]
        if url.startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"):
            path = INDEX_DIR / name
        elif url.startswith(self.raw_prefix):
            path = REPO / url[len(self.raw_prefix):]
        else:
            raise self.real.ConnectionError(f"offline: {url}")
        if not path.exists():
            response.status_code = 404
            return response
        response.status_code = 200
        response._content = path.read_bytes()
        response.headers["Content-Type"] = "image/png" if path.suffix == ".png" else "application/json"
        return response


def test_extensions_index_checks_pass_offline(monkeypatch):
    checks = _checker()
    metadata = json.loads((REPO / "TuckerSeg.json").read_text())
    repo_url = metadata["scm_url"][:-4] if metadata["scm_url"].endswith(".git") else metadata["scm_url"]
    owner_repo = repo_url.split("github.com/", 1)[1]
    raw_prefix = f"https://raw.githubusercontent.com/{owner_repo}/{metadata['scm_revision']}/"
    monkeypatch.setattr(checks, "requests", _OfflineRequests(checks.requests, raw_prefix))
    name = "TuckerSeg"
    assert metadata["$schema"].split("#")[0].rsplit("/", 1)[-1] in os.listdir(INDEX_DIR)
    checks.check_json_schema(name, metadata)
    checks.check_json_file_format(name, metadata, str(REPO / "TuckerSeg.json"))
    checks.check_extension_name(name, metadata)
    checks.check_category(name, metadata)
    checks.check_git_repository_name(name, metadata)
    checks.check_scm_url_syntax(name, metadata)
    checks.check_license_file(name, metadata, str(REPO))
    assert owner_repo.endswith("/SlicerTuckerSeg")
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert f'set(EXTENSION_HOMEPAGE "{repo_url}")' in cmake
    # The screenshot (Screenshots/TuckerSeg-panel.png) is rendered from the module's .ui by
    # Testing/render_panel_screenshot.py; the check fetches it (offline: from the working tree).
    checks.check_cmakelists_content(name, metadata, str(REPO))
