"""What every benchmark's JSON result starts with: the command that made it and the machine."""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch


def write_result(path: Path, script: str, payload: dict) -> None:
    """``payload`` as JSON at ``path``, after the command line of ``script`` and the machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "command": f"python benchmarks/{Path(script).name} " + " ".join(sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
        **payload}, indent=1))
