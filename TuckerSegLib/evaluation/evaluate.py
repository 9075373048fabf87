"""``tuckerseg eval``: how much do compressed models agree with references and with the original?

For every CT, policy and ratio the model segments the CT; each segmentation is scored per class
(Dice, normalised surface Dice) against the reference segmentation (when given) and against the
uncompressed model's own output on the same CT (ratio 1.0, computed once per CT). Means over
classes count only classes present in at least one of the two maps (absent-in-both classes are
reported per class as 1.0 but would inflate means). Outputs: ``per_class.csv``, ``summary.csv``,
``results.json`` (with mean/std/min/median over CTs), ``agreement_vs_ratio.png`` and heat maps.

Models: an nnU-Net trained-model folder (segmented through nnU-Net's predictor with the network
from ``get_compressed_network``) or a TotalSegmentator task name (``total``, with ``fast`` /
``fastest``), segmented through ``TuckerSegLib.pipeline.segment``.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from TuckerSegLib.errors import InputError
from TuckerSegLib.progress import NullProgress, Progress
from TuckerSegLib.specs import CompressionSpec, RunSpec, check_mode


@dataclass
class EvalModel:
    """What is evaluated: an nnU-Net folder, or a TotalSegmentator task with its speed flags."""

    folder: Optional[Path] = None
    task: Optional[str] = None
    fast: bool = False
    fastest: bool = False
    labels: Dict[int, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        if self.folder is not None:
            return str(self.folder)
        return self.task + (" --fast" if self.fast else "") + (" --fastest" if self.fastest else "")


def resolve_model(model: str, fast: bool = False, fastest: bool = False) -> EvalModel:
    """An nnU-Net folder when ``model`` is a folder with plans.json, else a TotalSegmentator task."""
    path = Path(model)
    if path.is_dir():
        if not (path / "plans.json").is_file() or not (path / "dataset.json").is_file():
            raise InputError(f"{path} is not an nnU-Net trained-model folder (no plans.json/dataset.json)")
        labels = json.loads((path / "dataset.json").read_text())["labels"]
        names = {int(v): k for k, v in labels.items() if isinstance(v, int) and int(v) != 0}
        return EvalModel(folder=path, labels=names)
    if os.sep in model or model.startswith("."):
        raise InputError(f"model folder not found: {model}")
    return EvalModel(task=model, fast=fast, fastest=fastest)


def reference_label_map(model: EvalModel, classmap: str) -> Dict[int, int]:
    """model label id -> reference label id. ``same``: identical ids; ``total``: match the model's
    class names against TotalSegmentator's ``total`` class map (unmatched classes are dropped)."""
    if classmap == "same":
        return {k: k for k in model.labels}
    if classmap == "total":
        from totalsegmentator.map_to_binary import class_map

        by_name = {name: idx for idx, name in class_map["total"].items()}
        return {k: by_name[n] for k, n in model.labels.items() if n in by_name}
    raise InputError(f"unknown reference class map {classmap!r} (use same or total)")


def _load_nifti(path: Path):
    import nibabel as nib

    if not Path(path).is_file():
        raise InputError(f"file not found: {path}")
    try:
        img = nib.load(str(path))
        return img, np.asanyarray(img.dataobj)
    except Exception as exc:
        raise InputError(f"cannot read {path}: {exc}") from None


class _Segmenter:
    """Segments CTs with a model at (policy, ratio); returns (labels, seconds, cost dict)."""

    def __init__(self, model: EvalModel, device: str, cache_dir: Optional[Path], workdir: Path):
        self.model, self.device, self.cache_dir, self.workdir = model, device, cache_dir, workdir
        self.predictor = None
        self._cost_cache: Dict[tuple, dict] = {}

    def __call__(self, ct: Path, policy: str, ratio: float):
        if self.model.folder is not None:
            return self._nnunet(ct, policy, ratio)
        return self._task(ct, policy, ratio)

    def _nnunet(self, ct: Path, policy: str, ratio: float):
        from TuckerSegLib.compression.cache import get_compressed_network
        from TuckerSegLib.network.cost import count_cost
        from TuckerSegLib.pipeline.nnunet_predict import load_predictor, predict_volume

        if self.predictor is None:
            self.predictor = load_predictor(self.model.folder, device=self.device)
        network, _ = get_compressed_network(self.model.folder, CompressionSpec(ratio, policy),
                                            cache_dir=self.cache_dir)
        key = (policy, ratio)
        if key not in self._cost_cache:
            patch = self.predictor.configuration_manager.patch_size
            self._cost_cache[key] = count_cost(network, (1, 1, *patch)).as_dict()
        t0 = time.perf_counter()
        seg = predict_volume(self.predictor, ct, network=network)
        return seg, time.perf_counter() - t0, self._cost_cache[key]

    def _task(self, ct: Path, policy: str, ratio: float):
        from TuckerSegLib.pipeline.segment import segment

        out = self.workdir / f"seg_{policy}_{ratio:g}.nii.gz"
        t0 = time.perf_counter()
        result = segment(ct, out, CompressionSpec(ratio, policy), RunSpec(device=self.device),
                         task=self.model.task, mode=check_mode(self.model.fast, self.model.fastest),
                         ml=True, cache_dir=self.cache_dir, quiet=True)
        seconds = float(getattr(result, "seconds", time.perf_counter() - t0))
        if not self.model.labels:
            self.model.labels = {int(k): str(v) for k, v in dict(getattr(result, "labels", {})).items()
                                 if int(k) != 0}
        _, seg = _load_nifti(Path(result.output))
        cost = {"params": getattr(result, "params", None), "macs": getattr(result, "macs", None)}
        return np.asarray(seg), seconds, cost


def _scores(pred: np.ndarray, ref: np.ndarray, pairs: Dict[int, int], spacing, tol: float) -> Dict[int, dict]:
    """Per model class: Dice/NSD of (pred == c) vs (ref == pairs[c])."""
    from TuckerSegLib.evaluation.metrics import dice, surface_dice

    out = {}
    for c, rc in pairs.items():
        a, b = pred == c, ref == rc
        out[c] = {"dice": dice(a, b), "nsd": surface_dice(a, b, spacing, tol),
                  "present": bool(a.any() or b.any())}
    return out


def _mean(scores: Dict[int, dict], key: str) -> Optional[float]:
    vals = [s[key] for s in scores.values() if s["present"]]
    return float(np.mean(vals)) if vals else None


def _stats(values: List[Optional[float]]) -> Optional[dict]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    a = np.array(vals, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()),
            "median": float(np.median(a)), "n": int(a.size)}


def evaluate(model: str, images: Sequence[Path], references: Optional[Sequence[Path]] = None,
             ratios: Sequence[float] = (1.0, 0.5, 0.3), policies: Sequence[str] = ("budget",),
             outdir: Path = Path("tuckerseg-eval"), device: str = "auto", tolerance_mm: float = 2.0,
             fast: bool = False, fastest: bool = False, ref_classmap: str = "same",
             cache_dir: Optional[Path] = None, progress: Optional[Progress] = None) -> dict:
    """Run the evaluation (see module docstring); returns the summary written to results.json."""
    from TuckerSegLib.evaluation.plots import plot_heatmap, plot_ratio_curves

    progress = progress or NullProgress()
    images = [Path(p) for p in images]
    if not images:
        raise InputError("give at least one CT with -i")
    references = [Path(p) for p in references] if references else []
    if references and len(references) != len(images):
        raise InputError(f"got {len(references)} reference segmentations for {len(images)} CTs "
                         f"(give one --ref per -i, in the same order)")
    specs = [CompressionSpec(r, p) for p in policies for r in ratios]  # checks every option once
    ratios = [1.0] + [r for r in dict.fromkeys(s.ratio for s in specs) if r != 1.0]
    RunSpec(device=device)
    for p in images + references:
        if not p.is_file():
            raise InputError(f"file not found: {p}")
    em = resolve_model(model, fast, fastest)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=outdir, prefix=".tmp-eval-"))
    try:
        segmenter = _Segmenter(em, device, cache_dir, work)
        runs = [(i, pol, r) for i in range(len(images)) for pol in policies for r in ratios
                if not (r == 1.0 and pol != policies[0])]  # ratio 1.0 is the same for every policy
        per_class_rows: List[dict] = []
        summary_rows: List[dict] = []
        originals: Dict[int, np.ndarray] = {}
        orig_cost: Dict[int, dict] = {}
        for n, (i, policy, ratio) in enumerate(runs):
            ct = images[i]
            progress.stage("segment", f"{ct.name}: {policy} ratio {ratio:g}")
            progress.update(n / len(runs), f"{ct.name} {policy} {ratio:g}")
            img, _ = _load_nifti(ct)
            spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
            seg, seconds, cost = segmenter(ct, policy, ratio)
            if seg.shape != img.shape[:3]:
                raise InputError(f"segmentation of {ct.name} has shape {seg.shape}, CT {img.shape}")
            if ratio == 1.0:
                originals[i], orig_cost[i] = seg, cost
            labels = em.labels or {int(c): str(c) for c in np.unique(seg) if c != 0}
            vs_orig = _scores(seg, originals[i], {c: c for c in labels}, spacing, tolerance_mm)
            vs_ref = None
            if references:
                _, ref = _load_nifti(references[i])
                if ref.shape != seg.shape:
                    raise InputError(f"reference {references[i].name} has shape {ref.shape}, CT {seg.shape}")
                vs_ref = _scores(seg, np.asarray(ref), reference_label_map(em, ref_classmap)
                                 if em.labels else {c: c for c in labels}, spacing, tolerance_mm)
            for c, name in labels.items():
                row = {"ct": ct.name, "policy": policy, "ratio": ratio, "class_id": c, "class": name,
                       "dice_vs_original": vs_orig[c]["dice"], "nsd_vs_original": vs_orig[c]["nsd"]}
                if vs_ref is not None and c in vs_ref:
                    row.update(dice_vs_ref=vs_ref[c]["dice"], nsd_vs_ref=vs_ref[c]["nsd"])
                per_class_rows.append(row)
            macs0 = orig_cost[i].get("macs")
            srow = {"ct": ct.name, "policy": policy, "ratio": ratio, "params": cost.get("params"),
                    "macs": cost.get("macs"),
                    "macs_fraction": (cost["macs"] / macs0) if cost.get("macs") and macs0 else None,
                    "seconds": seconds,
                    "mean_dice_vs_original": _mean(vs_orig, "dice"),
                    "mean_nsd_vs_original": _mean(vs_orig, "nsd"),
                    "mean_dice_vs_ref": _mean(vs_ref, "dice") if vs_ref else None,
                    "mean_nsd_vs_ref": _mean(vs_ref, "nsd") if vs_ref else None}
            summary_rows.append(srow)
            progress.log(f"{ct.name} {policy} {ratio:g}: Dice vs original "
                         f"{srow['mean_dice_vs_original']:.3f}" +
                         (f", vs reference {srow['mean_dice_vs_ref']:.3f}"
                          if srow["mean_dice_vs_ref"] is not None else "") + f" ({seconds:.1f} s)")
        progress.update(1.0, "writing report")
        # Ratio 1.0 belongs to every policy's curve.
        for pol in policies[1:]:
            summary_rows += [dict(r, policy=pol) for r in summary_rows
                             if r["ratio"] == 1.0 and r["policy"] == policies[0]]
        stats = []
        keys = ["mean_dice_vs_original", "mean_nsd_vs_original", "mean_dice_vs_ref", "mean_nsd_vs_ref",
                "seconds", "macs_fraction"]
        for pol in policies:
            for r in ratios:
                rows = [s for s in summary_rows if s["policy"] == pol and s["ratio"] == r]
                entry = {"policy": pol, "ratio": r, "params": rows[0]["params"], "macs": rows[0]["macs"]}
                entry.update({k: _stats([s[k] for s in rows]) for k in keys})
                stats.append(entry)
        result = {"model": em.name, "images": [str(p) for p in images],
                  "references": [str(p) for p in references], "ratios": ratios,
                  "policies": list(policies), "device": device, "nsd_tolerance_mm": tolerance_mm,
                  "ref_classmap": ref_classmap, "labels": {str(k): v for k, v in em.labels.items()},
                  "statistics": stats, "summary": summary_rows, "per_class": per_class_rows}
        _write_csv(work / "per_class.csv", per_class_rows,
                   ["ct", "policy", "ratio", "class_id", "class", "dice_vs_ref", "nsd_vs_ref",
                    "dice_vs_original", "nsd_vs_original"])
        _write_csv(work / "summary.csv", summary_rows,
                   ["ct", "policy", "ratio", "params", "macs", "macs_fraction", "seconds",
                    "mean_dice_vs_ref", "mean_nsd_vs_ref", "mean_dice_vs_original",
                    "mean_nsd_vs_original"])
        (work / "results.json").write_text(json.dumps(result, indent=2))
        curve = [{"policy": s["policy"], "ratio": s["ratio"],
                  "macs_fraction": (s["macs_fraction"] or {}).get("mean", s["ratio"])
                  if s["macs_fraction"] else s["ratio"],
                  "dice_vs_original": (s["mean_dice_vs_original"] or {}).get("mean"),
                  "dice_vs_ref": (s["mean_dice_vs_ref"] or {}).get("mean")} for s in stats]
        x_key = "macs_fraction" if all(s["macs_fraction"] for s in stats) else "ratio"
        plot_ratio_curves(curve, work / "agreement_vs_ratio.png", x_key=x_key,
                          quality_keys=("dice_vs_original", "dice_vs_ref"), time_key=None,
                          group_key="policy", title=f"{em.name}: mean agreement")
        columns = [(pol, r) for pol in policies for r in ratios]
        names = list(em.labels.values()) or sorted({row["class"] for row in per_class_rows})
        for key, fname in (("dice_vs_original", "heatmap_dice_vs_original.png"),
                           ("dice_vs_ref", "heatmap_dice_vs_reference.png")):
            if key == "dice_vs_ref" and not references:
                continue
            matrix = np.full((len(names), len(columns)), np.nan)
            for j, (pol, r) in enumerate(columns):
                for k, nm in enumerate(names):
                    vals = [row[key] for row in per_class_rows if row["class"] == nm and key in row
                            and row["ratio"] == r and (row["policy"] == pol or r == 1.0)]
                    if vals:
                        matrix[k, j] = float(np.mean(vals))
            plot_heatmap(matrix, names, [f"{pol} {r:g}" for pol, r in columns], work / fname,
                         title=f"per-class {key.replace('_', ' ')}")
        for src in sorted(work.glob("*")):
            if src.is_file() and not src.name.startswith("seg_"):
                os.replace(src, outdir / src.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _write_csv(path: Path, rows: List[dict], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


def format_statistics(result: dict) -> str:
    """Short text table of the per-(policy, ratio) means."""
    lines = [f"{'policy':>8} {'ratio':>6} {'MACs kept':>9} {'Dice vs orig':>12} {'NSD vs orig':>11} "
             f"{'Dice vs ref':>11} {'time s':>7}"]
    for s in result["statistics"]:
        g = lambda k: s[k]["mean"] if s.get(k) else None  # noqa: E731
        fmt = lambda v, w: f"{v:{w}.3f}" if v is not None else " " * (w - 1) + "-"  # noqa: E731
        lines.append(f"{s['policy']:>8} {s['ratio']:6.2f} {fmt(g('macs_fraction'), 9)} "
                     f"{fmt(g('mean_dice_vs_original'), 12)} {fmt(g('mean_nsd_vs_original'), 11)} "
                     f"{fmt(g('mean_dice_vs_ref'), 11)} {fmt(g('seconds'), 7)}")
    return "\n".join(lines)
