"""The plotting libraries a ``tuckerseg`` process defers: not loaded by inference, real on use."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _python(code: str) -> str:
    """Run ``code`` in a fresh interpreter (this one has imported seaborn long ago); its stdout."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_deferred_seaborn_survives_imports_and_inspect_and_is_real_on_use():
    out = _python("""
        import inspect, sys
        from TuckerSegLib.pipeline.deferred_imports import defer_plotting_imports, is_loaded
        print(defer_plotting_imports())
        import seaborn                         # a plain import binds the placeholder
        import seaborn as sns
        inspect.getmodule(inspect.getmodule)   # reads every module's __file__, as torch does
        print(is_loaded("seaborn"), type(sys.modules["seaborn"]).__name__)
        palette = sns.color_palette("tab10")   # first real use: the real seaborn loads
        print(is_loaded("seaborn"), type(sys.modules["seaborn"]).__name__, len(palette))
        from seaborn import lineplot           # from-imports and submodules work after loading
        import seaborn.palettes
        print(callable(lineplot), seaborn.palettes.color_palette is sns.color_palette)
    """).split("\n")
    assert out[:4] == ["['seaborn']", "False DeferredModule", "True module 10", "True True"]

