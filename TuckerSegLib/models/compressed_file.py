"""Compressed-model folders: safetensors weights + a JSON manifest, never pickles.

Layout of a folder written by ``save_compressed``::

    manifest.json      format, library version, source identity and hash, policy, ratio,
                       per-layer ranks, weights hash, the compression report
    model.safetensors  the factorised network's weights
    plans.json, dataset.json   copies of the source model's, so the folder stands alone

Loading rebuilds the architecture from the plans, turns the layers named in the manifest into
``TuckerConv`` shells of the recorded ranks and loads the weights strictly: nothing is decomposed
again, and a damaged or mismatched folder is refused with a ``ModelError``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

from torch import nn

from TuckerSegLib import __version__
from TuckerSegLib.errors import ModelError
from TuckerSegLib.models.checkpoint import file_sha256
from TuckerSegLib.models.nnunet_folder import (NnUNetModel, build_network,
                                               label_names_from_dataset_json, plans_manager)
from TuckerSegLib.network.surgery import factorise_structure
from TuckerSegLib.storage import writing_dir

FORMAT = "tuckerseg-compressed/1"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"


@dataclass
class CompressionResult:
    """The compressed network, the ranks per layer (None = dense) and the report (a JSON dict)."""

    network: nn.Module
    layer_ranks: Dict[str, Optional[List[int]]]
    report: dict


def is_compressed_folder(folder: Union[str, Path]) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def save_compressed(dest: Union[str, Path], model: NnUNetModel, result: CompressionResult,
                    source_sha256: Optional[str] = None) -> Path:
    """Write ``result`` (compressed from ``model``) as a compressed-model folder, atomically."""
    from safetensors.torch import save_model

    dest = Path(dest)
    with writing_dir(dest) as tmp:
        save_model(result.network, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        (tmp / "plans.json").write_text(json.dumps(model.plans, indent=1))
        (tmp / "dataset.json").write_text(json.dumps(model.dataset_json, indent=1))
        report = dict(result.report)
        manifest = {
            "format": FORMAT,
            "library_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source": {
                "folder": str(model.folder.resolve()),
                "fold": model.fold,
                "checkpoint": model.checkpoint_path.name,
                "sha256": source_sha256 or model.source_sha256(),
                "fingerprint": model.source_fingerprint,
                "trainer_name": model.trainer_name,
                "configuration": model.configuration,
            },
            "model": {
                "patch_size": list(model.patch_size),
                "num_input_channels": model.num_input_channels,
                "num_classes": model.num_classes,
            },
            "compression": {k: report.get(k) for k in ("policy", "ratio", "method", "rank_min",
                                                        "rank_multiple", "calibration")
                            if k in report},
            "layers": result.layer_ranks,
            "weights": {"file": WEIGHTS, "sha256": file_sha256(tmp / WEIGHTS)},
            "report": report,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return dest


def read_manifest(folder: Union[str, Path]) -> dict:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"not a compressed-model folder (no {MANIFEST}): {folder}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is corrupt: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelError(f"{path} is not a TuckerSeg manifest of format {FORMAT}")
    return manifest


def load_compressed(folder: Union[str, Path], verify_hash: bool = True) -> NnUNetModel:
    """Load a compressed-model folder written by ``save_compressed``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"compressed-model folder not found: {folder}")
    manifest = read_manifest(folder)
    weights = folder / manifest.get("weights", {}).get("file", WEIGHTS)
    if not weights.is_file():
        raise ModelError(f"compressed model is incomplete: {weights.name} missing in {folder}")
    if verify_hash and file_sha256(weights) != manifest["weights"].get("sha256"):
        raise ModelError(f"{weights} is corrupt: its SHA-256 does not match the manifest")
    try:
        plans = json.loads((folder / "plans.json").read_text())
        dataset_json = json.loads((folder / "dataset.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"compressed model {folder} is incomplete or corrupt: {exc}") from None
    src = manifest["source"]
    try:
        network: nn.Module = build_network(plans, dataset_json, src["configuration"],
                                           src["trainer_name"], initialise=False)
        factorise_structure(network, manifest["layers"])
        load_model(network, str(weights), strict=True)
    except (KeyError, RuntimeError, SafetensorError, ValueError) as exc:
        raise ModelError(f"compressed model {folder} does not match its manifest: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    network.eval()
    pm = plans_manager(plans)
    cm = pm.get_configuration(src["configuration"])
    return NnUNetModel(
        network=network, plans=plans, dataset_json=dataset_json, configuration=src["configuration"],
        patch_size=tuple(int(p) for p in cm.patch_size),
        num_input_channels=int(manifest["model"]["num_input_channels"]),
        num_classes=int(manifest["model"]["num_classes"]),
        label_names=label_names_from_dataset_json(dataset_json), trainer_name=src["trainer_name"],
        folder=folder, fold=src["fold"], checkpoint_path=weights, manifest=manifest)
