"""The batch manifest: the one record of which cases are finished, and with which settings.

Why: a batch over thousands of CTs is interrupted, killed and rerun. A case counts as done only
when its output folder is complete (workers rename it into place) *and* a ``done`` record for it
is in ``manifest.jsonl``; anything else is redone. The manifest is append-only, one JSON object
per line, flushed and fsynced per record by the driver alone, so a crash can at most leave a torn
last line, which is ignored. ``batch.json`` holds the settings; a rerun with other settings is
refused rather than mixing two kinds of output in one folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from TuckerSegLib.cohort.cases import Case
from TuckerSegLib.errors import InputError

MANIFEST = "manifest.jsonl"
SETTINGS = "batch.json"
CASES_DIR = "cases"
LOGS_DIR = "logs"
FORMAT = 1


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_settings(outdir: Path, settings: Dict[str, Any]) -> None:
    """Record the batch's settings, or refuse when the folder holds a batch made with others."""
    path = outdir / SETTINGS
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8")).get("settings", {})
        except (OSError, ValueError):
            old = None
        if old is not None and old != settings:
            diff = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v)
            raise InputError(f"{outdir} holds a batch made with other settings ({diff}); use a new "
                             f"output folder, or the same settings to continue it")
    write_json_atomic(path, {"format": FORMAT, "settings": settings})


class Manifest:
    """Append-only case records in ``OUTDIR/manifest.jsonl``; the last record of a case wins."""

    def __init__(self, outdir: Path):
        self.path = Path(outdir) / MANIFEST
        self.records: Dict[str, Dict[str, Any]] = {}
        self.done_count: Dict[str, int] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a torn last line after a crash
                if isinstance(rec, dict) and "case_id" in rec:
                    self.records[rec["case_id"]] = rec
                    if rec.get("status") == "done":
                        self.done_count[rec["case_id"]] = self.done_count.get(rec["case_id"], 0) + 1

    def is_done(self, case: Case) -> bool:
        """Done: a ``done`` record for the same input, and its output still there."""
        rec = self.records.get(case.case_id)
        return bool(rec and rec.get("status") == "done" and rec.get("input") == str(case.path)
                    and rec.get("output") and Path(rec["output"]).exists())

    def record(self, row: Dict[str, Any]) -> None:
        """Append one record durably (flush + fsync) before the case is reported finished."""
        line = json.dumps(row, default=str, separators=(",", ":"))
        needs_newline = False
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(("\n" if needs_newline else "") + line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[row["case_id"]] = row
        if row.get("status") == "done":
            self.done_count[row["case_id"]] = self.done_count.get(row["case_id"], 0) + 1

    def rows(self, cases: Iterable[Case]) -> List[Dict[str, Any]]:
        """The latest record of each case, in the cases' order; ``pending`` for cases never finished."""
        out = []
        for c in cases:
            rec = self.records.get(c.case_id)
            if rec is None or rec.get("input") != str(c.path):
                rec = {"case_id": c.case_id, "input": str(c.path), "status": "pending"}
            out.append(rec)
        return out

    def get(self, case_id: str) -> Optional[Dict[str, Any]]:
        return self.records.get(case_id)
