"""Python packages the worker needs in Slicer's Python, and installing them (asked once).

torch comes first and through the PyTorch extension (``PyTorchUtils``), which picks the build
that matches the GPU driver; the rest through Slicer's packaging helpers
(``slicer.pydeps.pip_ensure`` on Slicer >= 5.11, ``slicer.util.pip_install`` before).
"""
from __future__ import annotations

import importlib.util
from typing import Callable, Dict, List

# import name -> pip requirement (mirrors pyproject.toml's dependencies; torch is separate)
REQUIREMENTS: Dict[str, str] = {
    "numpy": "numpy>=1.24",
    "nnunetv2": "nnunetv2>=2.5",
    "totalsegmentator": "TotalSegmentator>=2.4",
    "tensorly": "tensorly>=0.8",
    "safetensors": "safetensors>=0.4",
    "nibabel": "nibabel>=5.0",
    "SimpleITK": "SimpleITK>=2.2",
    "tqdm": "tqdm>=4.60",
    "filelock": "filelock>=3.12",
}
TORCH_REQUIREMENT = ">=2.1"
OPTIONAL: Dict[str, str] = {"openvino": "openvino>=2024.0"}


def _missing(modules: Dict[str, str]) -> List[str]:
    return [req for name, req in modules.items() if importlib.util.find_spec(name) is None]


def missing_requirements(engine: str = "auto") -> List[str]:
    """Pip requirements not importable now ("torch" first when torch itself is missing)."""
    missing = [] if importlib.util.find_spec("torch") is not None else ["torch"]
    missing += _missing(REQUIREMENTS)
    if engine == "openvino":
        missing += _missing(OPTIONAL)
    return missing


def install(missing: List[str], log: Callable[[str], None] = print) -> None:
    """Install ``missing`` into Slicer's Python (call only inside Slicer, after asking)."""
    import slicer

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
    others = [req for req in missing if req != "torch"]
    if not others:
        return
    log("Installing " + ", ".join(others) + "...")
    try:
        import slicer.pydeps as pydeps  # Slicer >= 5.11
        from packaging.requirements import Requirement
    except ImportError:
        pydeps = None
    if pydeps is not None and hasattr(pydeps, "pip_ensure"):
        pydeps.pip_ensure([Requirement(r) for r in others], requester="TuckerSeg")
    else:
        slicer.util.pip_install(others)
