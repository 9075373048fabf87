"""Turn the command line's inputs into a list of cases, each with a stable id.

Why: a cohort arrives as NIfTI files, DICOM series folders, folders of either, shell globs or a
CSV from the study database. The case id names the case's output folder and its manifest record,
so it must be the same on every rerun (sorted discovery, deterministic de-duplication).
Whether a file is a readable 3D CT is not checked here: ``segment`` checks each case, and a bad
one is recorded as failed while the batch goes on.
"""
from __future__ import annotations

import csv
import glob
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

from TuckerSegLib.errors import InputError

NIFTI = (".nii.gz", ".nii")
PATH_COLUMNS = ("path", "input", "image", "file", "filename", "ct", "nifti", "dicom")
ID_COLUMNS = ("case_id", "case", "id", "subject", "subject_id", "patient_id")


@dataclass(frozen=True)
class Case:
    """One CT to segment: its id (a safe folder name) and its path (NIfTI file or DICOM folder)."""

    case_id: str
    path: Path

    def as_dict(self) -> dict:
        return {"case_id": self.case_id, "path": str(self.path)}


def _is_nifti(p: Path) -> bool:
    return p.name.lower().endswith(NIFTI)


def _stem(p: Path) -> str:
    name = p.name
    for suffix in NIFTI:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def safe_id(text: str) -> str:
    """A case id usable as a folder name on every OS."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "case"
    return cleaned[:120]


def _walk_folder(folder: Path, skip: Sequence[Path]) -> List[Path]:
    """NIfTI files and DICOM series folders under ``folder`` (a folder of plain files is a series)."""
    if any(folder == s or s in folder.parents for s in skip):
        return []
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    files = [p for p in entries if p.is_file()]
    niftis = [p for p in files if _is_nifti(p)]
    found: List[Path] = list(niftis)
    others = [p for p in files if not _is_nifti(p) and p.suffix.lower() not in (".csv", ".txt", ".json", ".md")]
    if others and not niftis:
        return [folder]  # a DICOM series folder (its files need no .dcm suffix)
    for sub in (p for p in entries if p.is_dir()):
        found.extend(_walk_folder(sub, skip))
    return found


def _read_csv(path: Path, path_column: Optional[str], id_column: Optional[str]) -> List[tuple]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read the case list {path} ({type(exc).__name__}: {exc})") from None
    lower = {h.lower(): h for h in header}
    if path_column:
        if path_column not in header:
            raise InputError(f"{path} has no column {path_column!r} (columns: {', '.join(header)})")
        pcol = path_column
    else:
        pcol = next((lower[c] for c in PATH_COLUMNS if c in lower), None)
        if pcol is None:
            raise InputError(f"{path} has no path column: name it one of {', '.join(PATH_COLUMNS)} "
                             f"or pass --path-column (columns: {', '.join(header) or 'none'})")
    if id_column and id_column not in header:
        raise InputError(f"{path} has no column {id_column!r} (columns: {', '.join(header)})")
    icol = id_column or next((lower[c] for c in ID_COLUMNS if c in lower), None)
    out = []
    for n, row in enumerate(rows, start=2):
        value = row.get(pcol, "")
        if not value:
            raise InputError(f"{path} line {n}: empty {pcol!r}")
        p = Path(value).expanduser()
        if not p.is_absolute():
            p = path.parent / p  # relative to the CSV, so a study folder can move as a whole
        out.append((p, row.get(icol) if icol else None))
    return out


def collect_cases(inputs: Iterable[Union[str, Path]], skip: Sequence[Union[str, Path]] = (),
                  path_column: Optional[str] = None, id_column: Optional[str] = None) -> List[Case]:
    """Cases from files, DICOM folders, folders of them, globs and CSV lists, in a stable order.

    ``skip``: folders never searched (the batch's own output folder). Raises ``InputError`` when
    an input does not exist, a CSV is unusable, two CSV rows share an id, or nothing is found.
    """
    skip_paths = [Path(s).expanduser().absolute() for s in skip]
    found: List[tuple] = []  # (path, explicit id or None)
    for raw in inputs:
        text = str(raw)
        if any(ch in text for ch in "*?[") and not Path(text).exists():
            matches = sorted(glob.glob(str(Path(text).expanduser()), recursive=True))
            if not matches:
                raise InputError(f"no file matches {text}")
            paths = [Path(m) for m in matches]
        else:
            paths = [Path(text).expanduser()]
        for p in paths:
            if not p.exists():
                raise InputError(f"input not found: {p}")
            if p.is_file() and p.suffix.lower() == ".csv":
                found.extend(_read_csv(p.absolute(), path_column, id_column))
            elif p.is_dir():
                items = _walk_folder(p.absolute(), skip_paths)
                found.extend((q, None) for q in items)
            else:
                found.append((p.absolute(), None))
    if not found:
        raise InputError("no cases found in the inputs (NIfTI files, DICOM folders, folders of "
                         "them, globs or a CSV with a path column)")
    return _assign_ids(found)


def _assign_ids(found: List[tuple]) -> List[Case]:
    """Unique ids: the CSV's id, else the file stem (or folder name), disambiguated by its parent."""
    cases: List[Case] = []
    seen_paths: Dict[str, str] = {}
    used: Dict[str, Path] = {}
    for path, given in found:
        path = Path(path).absolute()
        key = str(path)
        if key in seen_paths and not given:
            continue  # the same file named twice (e.g. by a glob and by name)
        if given:
            cid = safe_id(given)
            if cid in used:
                raise InputError(f"case id {given!r} appears twice in the case list")
        else:
            cid = safe_id(_stem(path))
            if cid in used:
                cid = safe_id(f"{path.parent.name}_{_stem(path)}")
            base, n = cid, 2
            while cid in used:
                cid, n = f"{base}-{n}", n + 1
        used[cid] = path
        seen_paths[key] = cid
        cases.append(Case(cid, path))
    return cases
