"""Architecture-only cost estimates: params, MACs and the MAC-bound speed-up of a ratio.

The Slicer panel shows these live while the user drags the ratio slider, before any weights are
loaded (or even downloaded). Networks are built on the meta device from TotalSegmentator's
architectures (``models.totalseg_archs``) and traced once per dataset id; each estimate is then a
pure rank choice. ``budget`` and ``energy`` depend on the trained weights' spectra, which are not
known here: the estimate assumes flat spectra (exact MAC target for ``budget``, ranks
``ceil(ratio * C)`` for ``energy``), so their parameter counts are indicative.

The panel must not import torch or trace networks on Slicer's GUI thread, so it reads
``readout_cost``: the same numbers, looked up in ``resources/readout_costs.json`` (written by
``write_readout_table`` from ``estimate_cost``; the architectures are data). The table holds every
ratio on the slider's 0.01 grid; ratios between grid points are interpolated. This module imports
torch only inside the functions that trace.

``quality_readout`` adds what the architecture cannot say: the predicted agreement with the
original network at the slider's MAC fraction and the measured time per patch, read from the
quality curves (``compression.quality_curve``) that quality-target runs leave in each installed
model's cache folder. It finds TotalSegmentator's model folders without importing it, torch or
nnU-Net (``totalseg_ids`` holds the folder names).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from TuckerSegLib.errors import InputError
from TuckerSegLib.specs import MODES, POLICIES, check_ratio
from TuckerSegLib.totalseg_ids import MODE_KEYS

READOUT_TABLE = Path(__file__).resolve().parent / "resources" / "readout_costs.json"
READOUT_STEPS = 100  # ratios 0.01, 0.02, ..., 1.00

QUALITIES = MODE_KEYS  # mode -> TASK_DATASETS key


@lru_cache(maxsize=None)
def _traced(dataset_id: int) -> Tuple[tuple, int, int]:
    """Layer shapes, params and MACs of one TotalSegmentator network (cached per process)."""
    import torch

    from TuckerSegLib.models.nnunet_folder import build_network
    from TuckerSegLib.models.totalseg_archs import TRAINERS, totalseg_plans
    from TuckerSegLib.network.cost import layer_shapes, trace

    plans, dataset_json = totalseg_plans(dataset_id)
    with torch.device("meta"):
        net = build_network(plans, dataset_json, "3d_fullres", TRAINERS[dataset_id])
    from TuckerSegLib.models.totalseg_archs import patch_size

    tr = trace(net, (1, 1, *patch_size(dataset_id)))
    return tuple(layer_shapes(net, tr).values()), tr.cost.params, tr.cost.macs


def _flat_spectra(layers) -> dict:
    import numpy as np

    from TuckerSegLib.decomposition.tucker import ModeSpectra

    empty = np.zeros((0, 0))
    return {l.name: ModeSpectra(np.full(l.c_out, 1.0 / l.c_out), empty,
                                np.full(l.c_in, 1.0 / l.c_in), empty, 1.0) for l in layers}


def estimate_network(dataset_id: int, ratio: float, policy: str = "budget") -> Dict[str, float]:
    """Params and MACs of one network, original and compressed."""
    from TuckerSegLib.compression.ranks import choose_ranks

    shapes, params, macs = _traced(dataset_id)
    candidates: list = [s for s in shapes if policy == "paper" or s.worth_factorising()]
    dense = sum(s.dense_macs() for s in candidates)
    ranks = choose_ranks(candidates, ratio, policy, spectra=_flat_spectra(candidates),
                         fixed_macs=macs - dense, total_macs=macs)
    by_name = {s.name: s for s in candidates}
    d_params = sum(by_name[n].params(r) - by_name[n].dense_params() for n, r in ranks.items())
    d_macs = sum(by_name[n].macs(r) - by_name[n].dense_macs() for n, r in ranks.items())
    return {"params_original": params, "macs_original": macs,
            "params": params + d_params, "macs": macs + d_macs}


def estimate_cost(task: str = "total", quality: str = "default", ratio: float = 0.5,
                  policy: str = "budget") -> Dict[str, float]:
    """Summed cost of the networks a TotalSegmentator task runs, at ``ratio`` under ``policy``.

    Returns ``params``, ``macs`` (per patch, summed over the task's networks),
    ``params_original``, ``macs_original`` and ``expected_speedup`` (MAC ratio: the upper bound
    that fast engines approach).
    """
    from TuckerSegLib.models.totalseg_archs import TASK_DATASETS

    ratio = check_ratio(ratio)
    if quality not in QUALITIES:
        raise InputError(f"unknown quality {quality!r}; choose one of {', '.join(QUALITIES)}")
    key = task if task != "total" else QUALITIES[quality]
    if key not in TASK_DATASETS:
        raise InputError(f"no architecture known for task {task!r} ({quality})")
    total = {"params": 0, "macs": 0, "params_original": 0, "macs_original": 0}
    for dataset_id in TASK_DATASETS[key]:
        for k, v in estimate_network(dataset_id, ratio, policy).items():
            total[k] += v
    total["expected_speedup"] = total["macs_original"] / max(1, total["macs"])
    total.update(task=task, quality=quality, ratio=ratio, policy=policy)
    return total


# -- the panel's read-out: a table, no torch ------------------------------------------------------
def _grid() -> List[float]:
    return [round((k + 1) / READOUT_STEPS, 2) for k in range(READOUT_STEPS)]


def write_readout_table(path: Path = READOUT_TABLE, task: str = "total") -> Path:
    """Regenerate the read-out table from the architectures (developers; imports torch)."""
    table: Dict[str, dict] = {}
    for quality in MODES:
        entry: Dict[str, object] = {}
        for policy in POLICIES:
            rows = [estimate_cost(task, quality, ratio, policy) for ratio in _grid()]
            entry["params_original"] = int(rows[0]["params_original"])
            entry["macs_original"] = int(rows[0]["macs_original"])
            entry[policy] = {"params": [int(r["params"]) for r in rows],
                             "macs": [int(r["macs"]) for r in rows]}
        table[quality] = entry
    data = {"about": "TuckerSegLib.estimate.readout_cost: estimate_cost at ratios 0.01..1.00 "
                     "(step 0.01); regenerate with python -m TuckerSegLib.estimate",
            "ratios": _grid(), "tasks": {task: table}}
    Path(path).write_text(json.dumps(data, separators=(",", ":")) + "\n", encoding="utf-8")
    return Path(path)


@lru_cache(maxsize=4)
def _readout_table(path: str) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def readout_cost(task: str = "total", quality: str = "default", ratio: float = 0.5,
                 policy: str = "budget", path: Path = READOUT_TABLE) -> Dict[str, float]:
    """``estimate_cost``'s numbers without torch, from the shipped table (microseconds).

    Exact on the 0.01 grid (the slider's), linearly interpolated between grid points.
    """
    ratio = check_ratio(ratio)
    if policy not in POLICIES:
        raise InputError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    data = _readout_table(str(path))
    if data is None:
        raise InputError(f"the cost table {path} is missing or unreadable")
    try:
        entry = data["tasks"][task][quality]
    except KeyError:
        raise InputError(f"no cost table for task {task!r} ({quality})") from None
    ratios = data["ratios"]  # 0.01, 0.02, ..., 1.00
    pos = ratio / ratios[0] - 1.0  # where ``ratio`` falls on the grid
    lo = max(0, min(len(ratios) - 1, int(pos + 1e-9)))
    hi = min(lo + 1, len(ratios) - 1)
    w = min(max(pos - lo, 0.0), 1.0) if hi != lo else 0.0
    if w < 1e-9:
        w = 0.0
    column = entry[policy]
    params = (1 - w) * column["params"][lo] + w * column["params"][hi]
    macs = (1 - w) * column["macs"][lo] + w * column["macs"][hi]
    result = {"params": params, "macs": macs, "params_original": entry["params_original"],
              "macs_original": entry["macs_original"]}
    result["expected_speedup"] = result["macs_original"] / max(1.0, macs)
    result.update(task=task, quality=quality, ratio=ratio, policy=policy)
    return result



# -- the panel's quality read-out: quality curves, no torch ----------------------------------------
SPEED_TOLERANCE = 0.025  # a point's measured time counts for MAC fractions this close to it
COMBINE = "minimum over the task's networks (not weighted by their class counts)"


def totalseg_weights_root() -> Path:
    """TotalSegmentator's weights folder, resolved as its ``config.get_weights_dir`` does (without
    importing it): ``$TOTALSEG_WEIGHTS_PATH``, else ``$TOTALSEG_HOME_DIR/nnunet/results``, else
    ``~/.totalsegmentator/nnunet/results`` (``/tmp/.totalsegmentator`` when home is ``/``)."""
    import os

    if "TOTALSEG_WEIGHTS_PATH" in os.environ:
        return Path(os.environ["TOTALSEG_WEIGHTS_PATH"])
    if "TOTALSEG_HOME_DIR" in os.environ:
        home = Path(os.environ["TOTALSEG_HOME_DIR"])
    else:
        home = (Path("/tmp") if str(Path.home()) == "/" else Path.home()) / ".totalsegmentator"
    return home / "nnunet" / "results"


def installed_model_folder(dataset_id: int, root: Path) -> Path:
    """``<root>/DatasetXXX_.../<trainer>__nnUNetPlans__3d_fullres`` as ``models.totalseg.model_folder``
    finds it (another ``DatasetXXX_*`` folder when the downloaded name is absent)."""
    from TuckerSegLib.totalseg_ids import DATASET_FOLDERS, trained_model_subfolder

    name = DATASET_FOLDERS[dataset_id]
    if not (root / name).exists() and root.is_dir():
        found = sorted(root.glob(f"Dataset{dataset_id:03d}_*"))
        if found:
            name = found[0].name
    return root / name / trained_model_subfolder(dataset_id)


def _cache_dirs(folder: Path, cache_dir) -> List[Path]:
    """Where ``storage.model_cache_dir`` may have put the model's cache, without its side effects
    (it creates folders and probes them for writing; the read-out only reads)."""
    import os

    from TuckerSegLib.storage import CACHE_DIR_NAME, cache_root, folder_digest

    if cache_dir:
        return [Path(cache_dir)]
    if os.environ.get("TUCKERSEG_CACHE_DIR"):
        return [cache_root()]
    return [folder / CACHE_DIR_NAME, cache_root() / f"{folder.name}-{folder_digest(folder)}"]


@lru_cache(maxsize=64)
def _curves_in(path: str, stamp: Tuple[int, int]) -> dict:
    """The curves stored in one ``quality_curve.json`` (re-read when the file changes)."""
    from TuckerSegLib.compression.quality_curve import QualityCurve
    from TuckerSegLib.storage import read_json

    out = {}
    for key, entry in read_json(path).items():
        try:
            out[key] = QualityCurve.from_dict(entry)
        except (TypeError, ValueError, AttributeError):
            continue  # a curve written by another version: ignored
    return out


def model_curve(folder: Path, policy: str = "budget", cache_dir=None):
    """The quality curve of an installed model for ``policy`` (the one with most points when there
    are several validation sets), or None. Curves of other weights (the key starts with the
    checkpoint's size and modification time, ``NnUNetModel.source_fingerprint``) are ignored."""
    from TuckerSegLib.compression.quality_curve import CURVE_FILE

    ckpt = folder / "fold_0" / "checkpoint_final.pth"
    try:
        st = ckpt.stat()
        prefix = f"{st.st_size}-{st.st_mtime_ns}|{policy}|"
    except OSError:
        prefix = None  # no weights here: any curve of this folder and policy
    found = []
    for d in _cache_dirs(folder, cache_dir):
        path = d / CURVE_FILE
        try:
            st = path.stat()
        except OSError:
            continue
        for key, curve in _curves_in(str(path), (st.st_mtime_ns, st.st_size)).items():
            parts = key.split("|")
            ok = key.startswith(prefix) if prefix else (len(parts) > 1 and parts[1] == policy)
            if ok and (curve.points or not curve.judged):  # a curve that judges nothing has no points
                found.append(curve)
    return max(found, key=lambda c: len(c.points)) if found else None


def _seconds_near(curve, fraction: float):
    """(seconds per patch, engine) measured at a point within SPEED_TOLERANCE of ``fraction``
    (the original's time at 1.0), else (None, None)."""
    if fraction >= 1.0 - 1e-9 and curve.reference_seconds_per_patch:
        return float(curve.reference_seconds_per_patch), None
    near = [p for p in curve.f32() if p.seconds_per_patch and p.source != "original"
            and abs(p.macs_fraction - fraction) <= SPEED_TOLERANCE]
    if not near:
        return None, None
    p = min(near, key=lambda p: abs(p.macs_fraction - fraction))
    return float(p.seconds_per_patch), p.engine


def quality_readout(task: str = "total", quality: str = "default", ratio: float = 0.5,
                    weights_root=None, cache_dir=None, policy: str = "budget",
                    min_agreement: Optional[float] = None, macs_fraction: Optional[float] = None) -> dict:
    """What the quality curves of the installed models predict for the panel (no torch).

    Ratio mode (``min_agreement`` None): the agreement at ``macs_fraction`` (default: the
    ``readout_cost`` MAC fraction of ``ratio``), interpolated on each model's curve. Target mode:
    what ``best_for(min_agreement)`` picks per model (the original where nothing below 90 % of
    the MACs meets it). Several networks (``total`` default: five) are combined by taking the
    minimum agreement (not weighted by class counts, unlike a run's own figure) and summing the
    seconds per patch. Keys: ``predicted_agreement`` (None: not measured), ``agreement_at_most``
    (below the lowest measured point: the envelope's bound), ``measured`` (every model has a
    curve), ``measuring`` (a detached search is measuring a model's curve now), ``seconds_per_patch`` / ``reference_seconds_per_patch`` (None: not measured),
    ``engine``, ``macs_fraction``, ``warn`` (below ``WARN_BELOW``), ``combine``, ``models``,
    ``unjudged`` (the dataset ids whose original labels too little on the validation data to judge
    any compression: the original runs there; each model's ``judged`` says the same).
    """
    from TuckerSegLib.compression.quality_curve import TARGET_PRECISIONS, WARN_BELOW
    from TuckerSegLib.pipeline.background_search import running
    from TuckerSegLib.totalseg_ids import TASK_DATASETS

    key = task if task != "total" else QUALITIES.get(quality, "")
    if key not in TASK_DATASETS:
        raise InputError(f"no models known for task {task!r} ({quality})")
    root = Path(weights_root) if weights_root is not None else totalseg_weights_root()
    explicit_fraction = macs_fraction is not None
    if min_agreement is None and macs_fraction is None:
        try:
            cost = readout_cost(task, quality, ratio, policy)
            macs_fraction = cost["macs"] / max(1.0, cost["macs_original"])
        except InputError:
            macs_fraction = check_ratio(ratio)
    models = []
    for dataset_id in TASK_DATASETS[key]:
        folder = installed_model_folder(dataset_id, root)
        curve = model_curve(folder, policy, cache_dir)
        m = {"dataset_id": dataset_id, "folder": str(folder), "measured": curve is not None,
             "measuring": running(folder, _cache_dirs(folder, cache_dir)),
             "predicted_agreement": None, "agreement_at_most": None, "macs_fraction": macs_fraction,
             "seconds_per_patch": None, "reference_seconds_per_patch": None, "engine": None,
             "judged": curve is None or curve.judged}
        if curve is not None:
            m["reference_seconds_per_patch"] = curve.reference_seconds_per_patch
            if min_agreement is not None:
                best = curve.fastest_for(float(min_agreement), TARGET_PRECISIONS, fast_original=True)
                fraction = 1.0 if best is None else best.macs_fraction
                m.update(macs_fraction=fraction, predicted_agreement=1.0 if best is None else best.agreement,
                         fallback=best is None or best.source == "original",
                         precision="f32" if best is None else best.precision)
                if best is not None and best.seconds_per_patch:
                    m["seconds_per_patch"], m["engine"] = best.seconds_per_patch, best.engine
                else:
                    m["seconds_per_patch"], m["engine"] = _seconds_near(curve, fraction)
            else:
                # A point built at this very ratio knows its real MAC fraction (the table's assumes
                # flat spectra); elsewhere the table's fraction is interpolated on the curve.
                point = None if explicit_fraction else curve.point_at(float(ratio))
                fraction = point.macs_fraction if point is not None else macs_fraction
                m["macs_fraction"] = fraction
                m["predicted_agreement"] = curve.predicted(fraction)
                if m["predicted_agreement"] is None:  # below every measured point
                    envelope = curve.envelope()
                    m["agreement_at_most"] = envelope[-1].agreement if envelope else None
                m["seconds_per_patch"], m["engine"] = _seconds_near(curve, fraction)
        models.append(m)

    def combined(name, how):
        values = [m[name] for m in models]
        return None if any(v is None for v in values) else how(values)

    agreement = combined("predicted_agreement", min)
    bound = None
    if agreement is None and all(m["measured"] for m in models):
        bounds = [m["predicted_agreement"] if m["predicted_agreement"] is not None else m["agreement_at_most"]
                  for m in models]
        bound = None if any(b is None for b in bounds) else min(bounds)
    fractions = [m["macs_fraction"] for m in models]
    engines = [m["engine"] for m in models if m["engine"]]
    lowest = agreement if agreement is not None else bound
    return {"task": task, "quality": quality, "policy": policy, "min_agreement": min_agreement,
            "ratio": ratio, "weights_root": str(root),
            # target mode: the mean of the models' fractions (total's networks are equal in size)
            "macs_fraction": None if any(f is None for f in fractions) else sum(fractions) / len(fractions),
            "measured": all(m["measured"] for m in models),
            "measuring": any(m["measuring"] for m in models),
            "predicted_agreement": agreement, "agreement_at_most": bound,
            "seconds_per_patch": combined("seconds_per_patch", sum),
            "reference_seconds_per_patch": combined("reference_seconds_per_patch", sum),
            "engine": engines[0] if engines and len(set(engines)) == 1 else (", ".join(sorted(set(engines))) or None),
            "unjudged": [m["dataset_id"] for m in models if not m["judged"]],
            "warn": lowest is not None and round(lowest, 3) < WARN_BELOW,
            "warn_below": WARN_BELOW, "combine": COMBINE, "models": models}


if __name__ == "__main__":
    print(write_readout_table())
