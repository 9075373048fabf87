"""The core's layers: a module imports only from its own layer or the layers below it.

Why a test: the layering is what lets a reader (and the Slicer panel, which must not import torch)
use one part without the rest; an upward import creeps in silently otherwise. Imports inside
functions count too.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "TuckerSegLib"
LAYERS = [
    {"errors", "specs", "progress", "storage", "report", "totalseg_ids"},
    {"devices", "inputs", "decomposition"},
    {"network"},
    {"models"},
    {"compression"},
    {"engines"},
    {"pipeline"},
    {"evaluation", "finetune", "demo", "cohort"},
    {"cli", "serve", "estimate", "__main__", "__init__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
TORCH_FREE = ["specs.py", "errors.py", "progress.py", "storage.py"]


def _top(path: Path) -> str:
    first = path.relative_to(ROOT).parts[0]
    return first[:-3] if first.endswith(".py") else first


def _imported(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "TuckerSegLib":
            parts = node.module.split(".")
            names = [a.name for a in node.names] if len(parts) == 1 else [parts[1]]
            yield node.lineno, [n for n in names if n != "__version__"]
        elif isinstance(node, ast.Import):
            yield node.lineno, [a.name.split(".")[1] for a in node.names if a.name.startswith("TuckerSegLib.")]


def test_every_module_has_a_layer_and_imports_downwards():
    problems = []
    for path in sorted(ROOT.rglob("*.py")):
        top = _top(path)
        assert top in RANK, f"{path} belongs to no layer: add it to LAYERS"
        for line, names in _imported(ast.parse(path.read_text())):
            for name in names:
                assert name in RANK, f"{path}:{line} imports unknown TuckerSegLib.{name}"
                if RANK[name] > RANK[top]:
                    problems.append(f"{path.relative_to(ROOT)}:{line} ({top}) imports {name}")
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_option_modules_import_no_torch():
    """specs, errors, progress and storage are read on the Slicer panel's GUI thread."""
    for name in TORCH_FREE:
        tree = ast.parse((ROOT / name).read_text())
        for node in ast.walk(tree):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(m.split(".")[0] in ("torch", "numpy", "nnunetv2") for m in modules), (name, modules)
