"""The structure names of a TotalSegmentator task, for the checklist and for naming segments.

TotalSegmentator's ``class_map`` is the source of truth. Slicer may not have ``totalsegmentator``
installed before the first run, so a copy of the ``total`` map ships with the module
(``Resources/total_structures.json``, written by ``write_structure_file``) and is used then.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

RESOURCE_FILE = Path(__file__).resolve().parent.parent / "Resources" / "total_structures.json"


def _from_totalsegmentator(task: str) -> Optional[Dict[int, str]]:
    try:
        from totalsegmentator.map_to_binary import class_map
    except ImportError:
        return None
    mapping = class_map.get(task)
    return {int(k): str(v) for k, v in mapping.items()} if mapping else None


def _from_resource(task: str, path: Path = RESOURCE_FILE) -> Optional[Dict[int, str]]:
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    mapping = data.get(task)
    return {int(k): str(v) for k, v in mapping.items()} if mapping else None


def label_map(task: str = "total") -> Dict[int, str]:
    """Label value -> structure name of ``task`` (TotalSegmentator's map, else the shipped copy)."""
    mapping = _from_totalsegmentator(task) or _from_resource(task)
    if not mapping:
        raise KeyError(f"unknown TotalSegmentator task {task!r}")
    return dict(sorted(mapping.items()))


def structure_names(task: str = "total") -> List[str]:
    """The structure names of ``task`` in label order (117 for ``total``)."""
    return list(label_map(task).values())


def write_structure_file(path: Path = RESOURCE_FILE, tasks=("total",)) -> Path:
    """Regenerate the shipped copy from the installed ``totalsegmentator`` (run by developers)."""
    data = {}
    for task in tasks:
        mapping = _from_totalsegmentator(task)
        if not mapping:
            raise RuntimeError("totalsegmentator is not installed: cannot regenerate " + str(path))
        data[task] = {str(k): v for k, v in sorted(mapping.items())}
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write_structure_file())
