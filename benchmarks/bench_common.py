"""What benchmarks share: the head of every JSON result (the command and the machine), and waiting
for the quality search that a default run leaves to a detached process."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from TuckerSegLib.progress import parse_event


def write_result(path: Path, script: str, payload: dict) -> None:
    """``payload`` as JSON at ``path``, after the command line of ``script`` and the machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "command": f"python benchmarks/{Path(script).name} " + " ".join(sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
        **payload}, indent=1))


def wait_for_background_search(log: Path, timeout: float = 3 * 3600) -> dict:
    """Block until the detached searches that a run started have all finished (``total`` starts
    one per model, run one after the other); what each said at its end."""
    from TuckerSegLib.pipeline.background_search import any_running

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        events = [e for e in map(parse_event, log.read_text().splitlines()) if e] if log.exists() else []
        done = [e for e in events if e["type"] == "error" or (e["type"] == "log" and e["message"].startswith("done in"))]
        if done and not any_running(log.parent):
            return {"waited_seconds": round(time.perf_counter() - t0, 1), "searches": len(done),
                    "said": " | ".join(e.get("message", "") for e in done)}
        time.sleep(2)
    raise SystemExit(f"the background search did not finish within {timeout:.0f} s (log {log})")
