"""Python packages the worker needs in Slicer's Python, and installing them as Slicer users expect.

Asked once (``DependencyGate``), then installed the way the TotalSegmentator extension does it:

- torch through the PyTorch extension (``PyTorchUtils``), which picks the build that matches the
  GPU driver;
- TotalSegmentator and nnU-Net without their dependencies (``--no-deps``), then their declared
  requirements except ``SKIPPED``: Slicer's own SimpleITK (it carries Slicer's IO and must never be
  replaced), torch (above) and requests (replacing it needs a restart);
- the rest as plain requirements. pip picks versions whose ``Requires-Python`` admits the running
  Python (3.9 in Slicer 5.6 and 5.8); requirement markers are evaluated for it here too;
- with ``slicer.packaging.pip_install`` (Slicer's constraint-checked installer) where it exists,
  else ``slicer.util.pip_install``.

What an engine needs (OpenVINO) is installed when the engine is chosen, not only on the first run.
"""
from __future__ import annotations

import importlib.util
import re
import sys
from typing import Callable, Dict, Iterable, List, Optional, Sequence

# import name -> pip requirement (mirrors pyproject.toml's dependencies; torch is separate)
REQUIREMENTS: Dict[str, str] = {
    "numpy": "numpy>=1.24",
    "nnunetv2": "nnunetv2>=2.5",
    "totalsegmentator": "TotalSegmentator>=2.4",
    "tensorly": "tensorly>=0.8",
    "safetensors": "safetensors>=0.4",
    "nibabel": "nibabel>=5.0",
    "tqdm": "tqdm>=4.60",
    "filelock": "filelock>=3.12",
}
TORCH_REQUIREMENT = ">=2.1"
# engine -> {import name: requirement}
ENGINE_REQUIREMENTS: Dict[str, Dict[str, str]] = {"openvino": {"openvino": "openvino>=2024.0"}}
# Installed with --no-deps, then their requirements less SKIPPED (as the TotalSegmentator extension).
SELECTIVE = ("TotalSegmentator", "nnunetv2")
SKIPPED = ("SimpleITK", "torch", "requests")


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), 1)[0]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _missing(modules: Dict[str, str]) -> List[str]:
    return [req for name, req in modules.items() if importlib.util.find_spec(name) is None]


def missing_requirements(engine: str = "auto") -> List[str]:
    """Pip requirements not importable now ("torch" first when torch itself is missing)."""
    missing = [] if importlib.util.find_spec("torch") is not None else ["torch"]
    missing += _missing(REQUIREMENTS)
    missing += _missing(ENGINE_REQUIREMENTS.get(engine, {}))
    return missing


def filter_requirements(requires: Iterable[str], skipped: Sequence[str] = SKIPPED,
                        python_version: Optional[str] = None) -> List[str]:
    """A package's ``Requires-Dist`` lines less extras, ``skipped`` names and markers that do not
    hold for ``python_version`` (default: the running Python), as pip arguments."""
    from packaging.requirements import Requirement  # ships with Slicer

    env = {"python_version": python_version or "%d.%d" % sys.version_info[:2], "extra": ""}
    skip = {_canonical(s) for s in skipped}
    kept = []
    for line in requires or []:
        req = Requirement(line)
        if _canonical(req.name) in skip:
            continue
        if req.marker is not None and not req.marker.evaluate(env):
            continue  # extras ("extra == 'dev'") and other Pythons
        req.marker = None
        kept.append(str(req))
    return kept


def slicer_pip() -> Callable[[List[str]], None]:
    """Slicer's installer: ``slicer.packaging.pip_install`` where it exists (we asked already: not
    interactive), else ``slicer.util.pip_install`` (Slicer 5.6 to 5.10)."""
    try:
        from slicer.packaging import pip_install as packaging_install
    except ImportError:
        packaging_install = None
    if packaging_install is not None:
        return lambda args: packaging_install(list(args), interactive=False)
    import slicer

    return lambda args: slicer.util.pip_install(list(args))


def install(missing: List[str], log: Callable[[str], None] = print,
            pip: Optional[Callable[[List[str]], None]] = None,
            requires: Optional[Callable[[str], List[str]]] = None) -> None:
    """Install ``missing`` into Slicer's Python (call inside Slicer, after asking).

    ``pip`` runs one ``pip install`` (default ``slicer_pip()``); ``requires`` reads an installed
    distribution's requirements (default ``importlib.metadata.requires``).
    """
    if "torch" in missing:
        log("Installing PyTorch with the PyTorch extension...")
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError("the PyTorch extension is required: install 'PyTorch' from the "
                               "Extensions Manager and restart Slicer") from None
        torch_logic = PyTorchUtils.PyTorchUtilsLogic()
        if not torch_logic.torchInstalled():
            if torch_logic.installTorch(askConfirmation=False,
                                        torchVersionRequirement=TORCH_REQUIREMENT) is None:
                raise RuntimeError("PyTorch could not be installed")
    if pip is None:
        pip = slicer_pip()
    if requires is None:
        import importlib.metadata

        requires = importlib.metadata.requires
    others = [r for r in missing if r != "torch" and _canonical(_name(r)) not in
              {_canonical(s) for s in SKIPPED}]
    selective = {_canonical(s) for s in SELECTIVE}
    queue = [r for r in others if _canonical(_name(r)) in selective]
    plain = [r for r in others if _canonical(_name(r)) not in selective]
    done = set()
    while queue:  # TotalSegmentator, then the nnunetv2 it requires, each without its deps
        req = queue.pop(0)
        name = _canonical(_name(req))
        if name in done:
            continue
        done.add(name)
        log(f"Installing {req} without its dependencies...")
        pip([req, "--no-deps"])
        for dep in filter_requirements(requires(_name(req))):
            dep_name = _canonical(_name(dep))
            if dep_name in selective:
                queue.append(dep)
            elif dep not in plain and dep_name not in done:
                plain.append(dep)
    if plain:
        log("Installing " + ", ".join(plain) + "...")
        pip(plain)


class DependencyGate:
    """Ask once per missing requirement: what to offer now for ``engine`` (nothing already
    declined or installed); the widget calls it on Apply and whenever the engine changes."""

    def __init__(self, find: Callable[[str], List[str]] = missing_requirements):
        self.find = find
        self.asked: set = set()

    def to_offer(self, engine: str) -> List[str]:
        return [r for r in self.find(engine) if r not in self.asked]

    def answered(self, requirements: Iterable[str]) -> None:
        self.asked.update(requirements)

    def missing(self, engine: str) -> List[str]:
        return self.find(engine)
