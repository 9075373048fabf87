"""Segment colours and Slicer ``TerminologyEntry`` tags from TotalSegmentator's SNOMED mapping.

The mapping (``totalsegmentator/resources/totalsegmentator_snomed_mapping.csv``) gives, per
structure, DICOM codes for category / type / type modifier / anatomic region and a DICOM RGB
colour. The tag string is produced by Slicer's own terminology logic
(``vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry``), so its format is Slicer's.
"""
from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

CATEGORY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
MAPPING_NAME = "totalsegmentator_snomed_mapping.csv"


@dataclass(frozen=True)
class StructureTerminology:
    """What Slicer needs to show one structure: the tag string and an RGB colour in [0, 1]."""

    name: str
    entry: str
    color: Tuple[float, float, float]
    type_meaning: str


def find_mapping_file() -> Optional[Path]:
    """The CSV inside the installed ``totalsegmentator`` package (found without importing it)."""
    spec = importlib.util.find_spec("totalsegmentator")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "resources" / MAPPING_NAME
        if path.exists():
            return path
    return None


def _code(row: Dict[str, str], sequence: str) -> Tuple[str, str, str]:
    return tuple((row.get(f"{sequence}.{field}") or "").strip()
                 for field in ("CodingSchemeDesignator", "CodeValue", "CodeMeaning"))  # type: ignore[return-value]


def _set_code(obj, code: Tuple[str, str, str]) -> None:
    scheme, value, meaning = code
    obj.SetCodingSchemeDesignator(scheme)
    obj.SetCodeValue(value)
    obj.SetCodeMeaning(meaning)


def _parse_color(text: str) -> Tuple[float, float, float]:
    parts = [int(p) for p in text.replace(" ", "").split(",") if p]
    if len(parts) != 3:
        raise ValueError(f"bad DicomRGBColor {text!r}")
    return tuple(p / 255.0 for p in parts)  # type: ignore[return-value]


def entry_string(category, type_, type_modifier, region, region_modifier) -> str:
    """Serialise DICOM codes into Slicer's ``TerminologyEntry`` tag with Slicer's logic."""
    import slicer

    entry = slicer.vtkSlicerTerminologyEntry()
    entry.SetTerminologyContextName(CATEGORY_CONTEXT)
    # Slicer >= 5.8 says "region", older releases "anatomic region".
    modern = hasattr(entry, "GetRegionObject")
    if modern:
        entry.SetRegionContextName(ANATOMIC_CONTEXT)
    else:
        entry.SetAnatomicContextName(ANATOMIC_CONTEXT)
    _set_code(entry.GetCategoryObject(), category)
    _set_code(entry.GetTypeObject(), type_)
    _set_code(entry.GetTypeModifierObject(), type_modifier)
    _set_code(entry.GetRegionObject() if modern else entry.GetAnatomicRegionObject(), region)
    _set_code(entry.GetRegionModifierObject() if modern else entry.GetAnatomicRegionModifierObject(),
              region_modifier)
    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(entry)


def load_terminology(path: Optional[Path] = None) -> Dict[str, StructureTerminology]:
    """Structure name -> terminology; empty when the mapping cannot be found."""
    path = Path(path) if path else find_mapping_file()
    if path is None or not path.exists():
        return {}
    result: Dict[str, StructureTerminology] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            name = (row.get("Structure") or "").strip()
            if not name:
                continue
            try:
                color = _parse_color(row.get("DicomRGBColor") or "")
            except ValueError:
                color = (0.5, 0.5, 0.5)
            type_code = _code(row, "SegmentedPropertyTypeCodeSequence")
            result[name] = StructureTerminology(
                name=name,
                entry=entry_string(_code(row, "SegmentedPropertyCategoryCodeSequence"), type_code,
                                   _code(row, "SegmentedPropertyTypeModifierCodeSequence"),
                                   _code(row, "AnatomicRegionSequence"),
                                   _code(row, "AnatomicRegionModifierSequence")),
                color=color,
                type_meaning=type_code[2],
            )
    return result
