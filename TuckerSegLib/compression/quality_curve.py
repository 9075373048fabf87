"""The quality curve of one model: MAC fraction kept -> validated agreement with the original.

Why: a user asks for quality ("at least 0.95 agreement"), not for a ratio; and the Slicer panel
must say, under its slider, what a ratio keeps. Each point is measured once per model and
validation set (``pipeline.quality_target`` measures them) and kept in ``quality_curve.json`` in
the model's cache folder, with the time per patch measured on this machine where known. Points
come from zero-shot compression and from distilled models (``tuckerseg finetune`` adds its
output's validated agreement).

This module imports neither torch nor nnU-Net: the Slicer panel reads curves on its GUI thread.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from TuckerSegLib.storage import merge_json, model_cache_dir, read_json

CURVE_FILE = "quality_curve.json"
# Agreements are compared at this many decimals, so that float noise between engines and machines
# (argmax ties flip a few voxels) cannot change which ratio a target chooses.
AGREEMENT_DECIMALS = 3
# Above this fraction of the MACs compression saves too little to be worth its risk: the
# original network runs instead (issue: "below about 90 % of the MACs").
MAX_FRACTION = 0.90
# The fractions a target search tries, from the top down (it stops at the first that misses).
SEARCH_FRACTIONS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
# The precisions a quality target may run a chosen network at where the engine runs them faster
# here (measured): bf16 on CPUs with native bf16, INT8 on CPUs with VNNI or AMX (OpenVINO; INT8
# as ``quality_target.TARGET_INT8_MIN_AGREEMENT`` quantises it); GPUs already run fp16 autocast
# as stock TotalSegmentator does.
TARGET_PRECISIONS = ("f32", "bf16", "int8")
WARN_BELOW = 0.90  # the panel warns when the predicted agreement is below this
# Ways to run a target whose times per patch lie within this factor of the fastest are timed
# again in turns: times measured alone, minutes apart, differ by up to 25 % on a busy 2-core CPU
# (the original in bf16: 3.35, 4.28 and 3.54 s in three searches), more than 90 % of the MACs
# saves, so the moment each was measured decided between them.
RACE_MARGIN = 1.3
# Bisections between the last fraction that met a target and the first that missed: a trained
# network's agreement falls steeply (0.96 at 90 % of the MACs, 0.82 at 80 % on the full-width
# 3 mm network), so the grid alone gives every target between those the same answer.
REFINE_STEPS = 2
# A validation source tells nothing about a model where the original labels less than this
# fraction of its voxels as foreground: a network that finds nothing there agrees with any
# compression of itself (Dice 1.0 of two empty maps). A weakly trained ribs network labelled none
# of the phantoms' voxels, and its search then chose 67 % of the MACs in INT8 at "agreement 1.000";
# real ribs models meet the same emptiness on the phantoms, which hold no ribs.
MIN_REFERENCE_FOREGROUND = 0.001


@dataclass
class QualityPoint:
    """One measured configuration of a model."""

    macs_fraction: float  # MACs kept / original MACs, per patch
    agreement: float  # mean Dice of the argmax against the original's, voxels pooled per source, worst source
    source: str = "zero-shot"  # zero-shot | distilled
    policy: str = "budget"
    ratio: float = 1.0  # the CompressionSpec ratio that builds it (zero-shot)
    folder: Optional[str] = None  # a compressed-model folder that holds it (distilled)
    seconds_per_patch: Optional[float] = None  # measured here, with ``engine``
    engine: Optional[str] = None
    # agreement per data source (the phantoms, each of the user's CTs) where there are several:
    # ``agreement`` is then the worst of them
    by_source: Optional[Dict[str, float]] = None
    # the engine precision it ran at: f32 points make the curve and choose the ranks (the same on
    # every machine); a lower precision point (source "original" for the uncompressed network) is
    # this machine's faster way to run a chosen network, measured against the same f32 reference
    # (the original as stock runs it, PyTorch); an f32 point of source "original" is the original
    # on a faster engine than stock's (``QualityCurve.original_f32``)
    precision: str = "f32"
    # the fastest of a few calls on one validation patch, timed in turns with the other ways to run
    # a target that were within ``RACE_MARGIN`` of it (``pipeline.quality_target``): compared only
    # with the same figure of those others; ``seconds_per_patch`` (timed alone) is what is shown
    seconds_in_turns: Optional[float] = None

    def meets(self, min_agreement: float) -> bool:
        return round(self.agreement, AGREEMENT_DECIMALS) >= round(min_agreement, AGREEMENT_DECIMALS)


@dataclass
class QualityCurve:
    """The points measured for one model on one validation set."""

    validation: dict  # what the agreement was measured on (``describe`` of the validation data)
    reference_seconds_per_patch: Optional[float] = None
    points: List[QualityPoint] = field(default_factory=list)
    # fraction of each source's validation voxels the original labels as foreground (None: not
    # known, a curve from before it was kept; its points are trusted as they were)
    reference_foreground: Optional[Dict[str, float]] = None

    def judged_sources(self) -> Optional[List[str]]:
        """The sources whose agreement says something (``MIN_REFERENCE_FOREGROUND``); None: not known."""
        if self.reference_foreground is None:
            return None
        return [k for k, v in self.reference_foreground.items() if v >= MIN_REFERENCE_FOREGROUND]

    @property
    def judged(self) -> bool:
        """False where the original labels (almost) nothing on every source: no point of this
        curve is evidence, so only the original as stock runs it may run."""
        return self.judged_sources() != []

    def f32(self) -> List[QualityPoint]:
        """The points that make the curve (f32)."""
        return [p for p in self.points if p.precision == "f32"]

    def point_at(self, ratio: float) -> Optional[QualityPoint]:
        """The zero-shot point built at ``ratio`` (the spec's ratio), if measured."""
        return next((p for p in self.f32() if p.source == "zero-shot" and round(p.ratio, 4) == round(ratio, 4)),
                    None)

    def envelope(self) -> List[QualityPoint]:
        """The zero-shot points from the most MACs down, each agreement capped by those above it:
        fewer MACs never promise more agreement (a point measured above a miss is not trusted)."""
        out: List[QualityPoint] = []
        if not self.judged:
            return out
        best = 1.0
        for p in sorted((p for p in self.f32() if p.source == "zero-shot"), key=lambda p: -p.macs_fraction):
            best = min(best, p.agreement)
            out.append(replace(p, agreement=best))
        return out

    def best_for(self, min_agreement: float, max_fraction: float = MAX_FRACTION) -> Optional[QualityPoint]:
        """The cheapest point (fewest MACs; the faster measured one on ties) that meets the target,
        zero-shot points judged by their envelope."""
        if not self.judged:
            return None
        candidates = self.envelope() + [p for p in self.f32() if p.source == "distilled"]
        ok = [p for p in candidates if p.meets(min_agreement) and p.macs_fraction <= max_fraction + 1e-9]
        if not ok:
            return None
        return min(ok, key=lambda p: (round(p.macs_fraction, 3), p.seconds_per_patch or float("inf")))

    def variant(self, base: Optional[QualityPoint], precision: str) -> Optional[QualityPoint]:
        """The measured ``precision`` run of ``base`` (None: the original network), if any."""
        for p in self.points:
            if p.precision != precision:
                continue
            if base is None and p.source == "original":
                return p
            if base is not None and (p.source, round(p.ratio, 4), p.folder) == (base.source, round(base.ratio, 4),
                                                                                base.folder):
                return p
        return None

    def original_f32(self) -> Optional[QualityPoint]:
        """The original network measured at f32 on a faster engine than stock's PyTorch (which made
        the reference), if it was: a target that no compressed network meets may run it."""
        return self.variant(None, "f32")

    def update(self, point: QualityPoint, **changes) -> None:
        """Change the stored point that ``point`` is (or is a copy of, e.g. from ``envelope``)."""
        same = (point.source, round(point.ratio, 4), point.folder, point.precision)
        for i, p in enumerate(self.points):
            if (p.source, round(p.ratio, 4), p.folder, p.precision) == same:
                self.points[i] = replace(p, **changes)
                return
        raise KeyError(f"no such point on the curve: {same}")

    def candidates(self, min_agreement: float, precisions: Sequence[str] = ("f32",),
                   max_fraction: float = MAX_FRACTION, fast_original: bool = False
                   ) -> List[Tuple[Optional[float], Optional[QualityPoint]]]:
        """``(seconds per patch here, point)`` of each way to run a target here, preferred first on
        equal times: ``best_for``'s network at f32 (None: the original as stock runs it), then the
        measured ``precisions`` runs of it and of the original whose own agreement meets the
        target. ``fast_original``: where the original runs, also its measured f32 run on a faster
        engine than stock's (the ``original_f32`` point)."""
        best = self.best_for(min_agreement, max_fraction)
        out: List[Tuple[Optional[float], Optional[QualityPoint]]] = [
            (self.reference_seconds_per_patch if best is None else best.seconds_per_patch, best)]
        if not self.judged:
            return out
        fast = self.original_f32() if fast_original and best is None else None
        if fast is not None and fast.meets(min_agreement) and fast.seconds_per_patch:
            out.append((fast.seconds_per_patch, fast))
        for precision in precisions:
            if precision == "f32":
                continue
            for base in ([None] if best is None else [best, None]):
                p = self.variant(base, precision)
                if p is not None and p.meets(min_agreement) and p.seconds_per_patch:
                    out.append((p.seconds_per_patch, p))
        return out

    def close_candidates(self, min_agreement: float, precisions: Sequence[str] = ("f32",),
                         max_fraction: float = MAX_FRACTION, fast_original: bool = False
                         ) -> List[Tuple[Optional[float], Optional[QualityPoint]]]:
        """The ``candidates`` timed within ``RACE_MARGIN`` of the fastest (all of them where
        any was not timed): those whose order the noise of lone timings may have decided."""
        return _close(self.candidates(min_agreement, precisions, max_fraction, fast_original))

    def fastest_for(self, min_agreement: float, precisions: Sequence[str] = ("f32",),
                    max_fraction: float = MAX_FRACTION, fast_original: bool = False) -> Optional[QualityPoint]:
        """What a target runs on this machine: the fastest of ``candidates`` measured here (the
        first on equal times; the f32 choice where that was not timed). Close candidates that were
        all timed in turns are compared by those times. None: the original at f32 as stock runs it."""
        options = self.candidates(min_agreement, precisions, max_fraction, fast_original)
        if options[0][0] is None:  # nothing to compare with: the f32 choice
            return options[0][1]
        close = _close(options)
        if len(close) > 1 and all(p is not None and p.seconds_in_turns for _, p in close):
            return min(enumerate(close), key=lambda o: (o[1][1].seconds_in_turns, o[0]))[1][1]
        return min(enumerate(options), key=lambda o: (o[1][0], o[0]))[1][1]

    def predicted(self, macs_fraction: float) -> Optional[float]:
        """Agreement at ``macs_fraction`` interpolated between the zero-shot points around it
        (1.0 at the original); None where no point lies at or below it."""
        pts = sorted({round(p.macs_fraction, 6): p.agreement for p in self.envelope()}.items())
        pts.append((1.0, 1.0))
        if macs_fraction >= 1.0:
            return 1.0
        for (f0, a0), (f1, a1) in zip(pts, pts[1:]):
            if f0 <= macs_fraction <= f1:
                return a0 if f1 == f0 else a0 + (a1 - a0) * (macs_fraction - f0) / (f1 - f0)
        return None

    def as_dict(self) -> dict:
        return {"validation": self.validation, "reference_seconds_per_patch": self.reference_seconds_per_patch,
                "points": [asdict(p) for p in self.points], "reference_foreground": self.reference_foreground}

    @classmethod
    def from_dict(cls, d: dict) -> "QualityCurve":
        known = {f.name for f in fields(QualityPoint)}  # a curve written by another version may hold more
        return cls(d.get("validation", {}), d.get("reference_seconds_per_patch"),
                   [QualityPoint(**{k: v for k, v in p.items() if k in known}) for p in d.get("points", [])],
                   d.get("reference_foreground"))


def _close(options: List[Tuple[Optional[float], Optional[QualityPoint]]]
           ) -> List[Tuple[Optional[float], Optional[QualityPoint]]]:
    """Those of ``options`` within ``RACE_MARGIN`` of the fastest (all where any was not timed)."""
    if any(t is None for t, _ in options):
        return options
    fastest = min(t for t, _ in options)
    return [(t, p) for t, p in options if t <= RACE_MARGIN * fastest]


def next_fraction(curve: QualityCurve, min_agreement: float, fractions: Sequence[float] = SEARCH_FRACTIONS,
                  refine_steps: int = REFINE_STEPS) -> Optional[float]:
    """The next ratio a search for ``min_agreement`` measures; None once the choice is settled.

    ``fractions`` from the top down until the first that misses, then ``refine_steps`` bisections
    between the last that met and that miss (rounded to 4 decimals, so the same on every
    machine). Nothing is refined when the top fraction misses (the original runs) or none does.
    """
    measured = {round(p.ratio, 4): p for p in curve.f32() if p.source == "zero-shot"}
    hit, miss = None, None
    for f in sorted(fractions, reverse=True):
        point = measured.get(round(f, 4))
        if point is None:
            return f
        if not point.meets(min_agreement):
            miss = f
            break
        hit = f
    if hit is None or miss is None:
        return None
    for _ in range(refine_steps):
        mid = round((hit + miss) / 2, 4)
        point = measured.get(mid)
        if point is None:
            return mid
        if point.meets(min_agreement):
            hit = mid
        else:
            miss = mid
    return None


def validation_id(description: dict) -> str:
    """A short key for a validation set (its description names the data and how it was sampled)."""
    return hashlib.sha1(json.dumps(description, sort_keys=True).encode()).hexdigest()[:12]


def curve_key(weights_stamp: str, description: dict) -> str:
    return f"{weights_stamp}|{validation_id(description)}"


def curve_path(model_folder: Union[str, Path], cache_dir: Optional[Union[str, Path]] = None) -> Path:
    return model_cache_dir(model_folder, cache_dir) / CURVE_FILE


def load_curve(model_folder: Union[str, Path], key: str, description: dict,
               cache_dir: Optional[Union[str, Path]] = None) -> QualityCurve:
    entry = read_json(curve_path(model_folder, cache_dir)).get(key)
    return QualityCurve.from_dict(entry) if entry else QualityCurve(description)


def save_curve(model_folder: Union[str, Path], key: str, curve: QualityCurve,
               cache_dir: Optional[Union[str, Path]] = None) -> None:
    merge_json(curve_path(model_folder, cache_dir), {key: curve.as_dict()})


def curves(model_folder: Union[str, Path], cache_dir: Optional[Union[str, Path]] = None,
           weights_stamp: Optional[str] = None) -> Dict[str, QualityCurve]:
    """The curves stored in the model's cache folder (one per weights and validation set); only
    those of ``weights_stamp`` when given: a shared cache folder (``--cache-dir``,
    ``$TUCKERSEG_CACHE_DIR``) holds the curves of several models."""
    return {k: QualityCurve.from_dict(v) for k, v in read_json(curve_path(model_folder, cache_dir)).items()
            if weights_stamp is None or k.startswith(weights_stamp + "|")}


DISTILLED_FILE = "distilled_models.json"


def register_distilled(model_folder: Union[str, Path], compressed_folder: Union[str, Path],
                       cache_dir: Optional[Union[str, Path]] = None) -> None:
    """Offer a distilled model of ``model_folder`` to quality targets (they validate it themselves,
    on their own validation set, before they choose it)."""
    path = model_cache_dir(model_folder, cache_dir) / DISTILLED_FILE
    merge_json(path, {str(Path(compressed_folder).resolve()): {"source": str(Path(model_folder).resolve())}})


def distilled_models(model_folder: Union[str, Path], cache_dir: Optional[Union[str, Path]] = None) -> List[str]:
    """The distilled models registered for ``model_folder`` that still exist."""
    path = model_cache_dir(model_folder, cache_dir) / DISTILLED_FILE
    source = str(Path(model_folder).resolve())
    return [f for f, v in read_json(path).items() if v.get("source") == source and Path(f).is_dir()]
