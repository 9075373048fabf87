"""The built-in demo model: shipped as safetensors + JSON, turned into an nnU-Net folder on demand.

The package holds ``resources/demo_model/{plans.json, dataset.json, trainer.json,
fold_0/model.safetensors}`` (no pickles). nnU-Net's predictor and ``load_model_folder`` need a
trained-model folder with ``fold_0/checkpoint_final.pth``; ``materialize_demo_model`` writes one
(once, atomically) into the user cache, keyed by the weights' hash.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from TuckerSegLib.models.checkpoint import file_sha256
from TuckerSegLib.errors import ModelError
from TuckerSegLib.storage import cache_root

RESOURCE_DIR = Path(__file__).resolve().parents[1] / "resources" / "demo_model"
WEIGHTS = Path("fold_0") / "model.safetensors"


def _write_folder(source: Path, target: Path) -> None:
    """Write the nnU-Net trained-model folder for the shipped files into ``target``."""
    import torch
    from safetensors.torch import load_model

    from TuckerSegLib.models.nnunet_folder import build_network

    meta = json.loads((source / "trainer.json").read_text())
    network = build_network(json.loads((source / "plans.json").read_text()),
                            json.loads((source / "dataset.json").read_text()),
                            meta["configuration"], meta["trainer_name"], initialise=False)
    load_model(network, str(source / WEIGHTS), strict=True)
    weights = {k: v.detach().clone() for k, v in network.state_dict().items()}
    (target / "fold_0").mkdir(parents=True)
    shutil.copyfile(source / "plans.json", target / "plans.json")
    shutil.copyfile(source / "dataset.json", target / "dataset.json")
    axes = meta.get("inference_allowed_mirroring_axes")
    checkpoint = {
        "network_weights": weights,
        "trainer_name": meta["trainer_name"],
        "init_args": {"configuration": meta["configuration"], "fold": int(meta.get("fold", 0))},
        "inference_allowed_mirroring_axes": tuple(axes) if axes is not None else None,
        "current_epoch": int(meta.get("training", {}).get("steps", 0)),
    }
    torch.save(checkpoint, target / "fold_0" / "checkpoint_final.pth")


def materialize_demo_model(dest: Optional[Path] = None, source: Path = RESOURCE_DIR) -> Path:
    """Path of a ready nnU-Net trained-model folder of the demo model, written if needed.

    ``dest`` is the root to write under (default: the user cache). The folder follows nnU-Net's
    layout ``<dest>/Dataset900_TuckerSegPhantom/<trainer>__nnUNetPlans__3d_fullres``.
    """
    source = Path(source)
    for name in ("plans.json", "dataset.json", "trainer.json", str(WEIGHTS)):
        if not (source / name).is_file():
            raise ModelError(f"the demo model is incomplete: {source / name} is missing "
                             f"(reinstall tuckerseg or run python -m TuckerSegLib.demo.train_demo_model)")
    meta = json.loads((source / "trainer.json").read_text())
    dataset = json.loads((source / "dataset.json").read_text()).get("name", "Dataset900_TuckerSegPhantom")
    if dest is None:
        dest = cache_root() / "demo_model" / file_sha256(source / WEIGHTS)[:16]
    target = Path(dest) / dataset / f"{meta['trainer_name']}__nnUNetPlans__{meta['configuration']}"
    if (target / "fold_0" / "checkpoint_final.pth").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-demo-model-"))
    try:
        _write_folder(source, tmp / "model")
        try:
            os.replace(tmp / "model", target)
        except OSError:
            # Another process finished first; keep its folder.
            if not (target / "fold_0" / "checkpoint_final.pth").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
