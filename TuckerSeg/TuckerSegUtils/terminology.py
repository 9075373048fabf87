"""Segment colours and Slicer ``TerminologyEntry`` tags from TotalSegmentator's SNOMED mapping.

The mapping (``totalsegmentator/resources/totalsegmentator_snomed_mapping.csv``) gives, per
structure, DICOM codes for category / type / type modifier / anatomic region and a DICOM RGB
colour. The tag string is produced by Slicer's own terminology logic
(``vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry``), so its format is Slicer's.
"""
from __future__ import annotations

import csv
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

# 65 of the 117 ``total`` structures have no type in Slicer's DICOM master list, so the entries
# point at a context of our own, built from the same SNOMED mapping (as the TotalSegmentator
# extension does) and loaded into Slicer's terminology logic before results are imported.
CATEGORY_CONTEXT = "Segmentation category and type - TuckerSeg"
CONTEXT_FILE = Path(__file__).resolve().parent.parent / "Resources" / "TuckerSeg-Terminology.json"
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


# -- the terminology context shipped with the module ------------------------------------------
def _code_dict(code: Tuple[str, str, str]) -> Dict[str, str]:
    scheme, value, meaning = code
    return {"CodingSchemeDesignator": scheme, "CodeValue": value, "CodeMeaning": meaning}


def build_context(path: Optional[Path] = None) -> dict:
    """Slicer's segmentation terminology context (dcmqi segment-context JSON) for every structure
    of TotalSegmentator's SNOMED mapping: category -> type -> laterality modifier, each leaf with
    the structure name as ``3dSlicerLabel`` and its DICOM colour."""
    path = Path(path) if path else find_mapping_file()
    if path is None or not path.exists():
        raise FileNotFoundError("totalsegmentator's SNOMED mapping is not installed")
    categories: Dict[tuple, dict] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            name = (row.get("Structure") or "").strip()
            if not name:
                continue
            category_code = _code(row, "SegmentedPropertyCategoryCodeSequence")
            type_code = _code(row, "SegmentedPropertyTypeCodeSequence")
            modifier_code = _code(row, "SegmentedPropertyTypeModifierCodeSequence")
            try:
                rgb = [int(round(255 * c)) for c in _parse_color(row.get("DicomRGBColor") or "")]
            except ValueError:
                rgb = [128, 128, 128]
            category = categories.setdefault(category_code[:2], dict(
                _code_dict(category_code), showAnatomy="true", Type={}))
            type_ = category["Type"].setdefault(type_code[:2], _code_dict(type_code))
            leaf = {"3dSlicerLabel": name, "recommendedDisplayRGBValue": rgb}
            if modifier_code[1]:
                modifiers = type_.setdefault("Modifier", {})
                modifiers.setdefault(modifier_code[:2], dict(_code_dict(modifier_code), **leaf))
            else:
                type_.setdefault("3dSlicerLabel", name)
                type_.setdefault("recommendedDisplayRGBValue", rgb)
    codes = []
    for category in categories.values():
        types = []
        for type_ in category["Type"].values():
            if "Modifier" in type_:
                type_["Modifier"] = list(type_["Modifier"].values())
            types.append(type_)
        category["Type"] = types
        codes.append(category)
    return {"SegmentationCategoryTypeContextName": CATEGORY_CONTEXT,
            "@schema": "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/segment-context-schema.json#",
            "SegmentationCodes": {"Category": codes}}


def write_context_file(path: Path = CONTEXT_FILE) -> Path:
    """Regenerate the shipped context from the installed ``totalsegmentator`` (developers)."""
    Path(path).write_text(json.dumps(build_context(), indent=1) + "\n", encoding="utf-8")
    return Path(path)


def register_context(logic=None, path: Path = CONTEXT_FILE) -> bool:
    """Load the shipped context into Slicer's terminology logic once; True when it is loaded.

    ``logic`` defaults to the Terminologies module's logic (inside Slicer).
    """
    if logic is None:
        import slicer

        try:
            logic = slicer.modules.terminologies.logic()
        except AttributeError:
            return False
    if CATEGORY_CONTEXT in loaded_contexts(logic):
        return True
    # Returns True in Slicer 5.6/5.8, the context's name from 5.10 on.
    return bool(logic.LoadTerminologyFromFile(str(path)))


def loaded_contexts(logic) -> list:
    """Names of the category/type contexts loaded into a terminology logic (5.6 to current)."""
    import vtk

    names = vtk.vtkStringArray()
    logic.GetLoadedTerminologyNames(names)
    return [names.GetValue(i) for i in range(names.GetNumberOfValues())]


if __name__ == "__main__":
    print(write_context_file())
