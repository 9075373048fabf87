"""Choose a model's network by the quality it keeps: the cheapest one whose validated agreement
with the original meets a target.

Why: zero-shot compression of a trained network keeps its quality only near the top of the ratio
range, and where that range ends differs per model. So each model's quality curve (MAC fraction
-> mean Dice of the argmax against the original, ``compression.quality_curve``) is measured on
validation patches, once per model and validation set, and the target picks from it.

Cost: the original's labels on the validation patches are computed once and cached; each point
compresses the network (cached too; the ``budget`` policy without its own refinement rounds, which
would validate each candidate a second time at many times the cost) and runs it on the patches with the fastest engine that
matches f32 (OpenVINO on a CPU, PyTorch on a GPU). The reference is the original as stock runs it
(PyTorch, f32), so each point's agreement holds its engine's difference from stock too; where no
compressed network meets a target, the original on OpenVINO f32 (``fast_original``) is measured
as one more way to run it (on five weakly trained 1.5 mm networks, 2 cores: 1.5-1.7x faster per
patch than PyTorch, agreeing 0.980-0.999 with it) and chosen where its own agreement meets the
target and it is faster. The search walks the fractions from the top
down and stops at the first that misses (a target that only the original meets costs one point),
then bisects twice between the last that met and that miss (``quality_curve.next_fraction``).
Validation data: the built-in phantom CTs (the same on every machine, so the same inputs give the
same choice everywhere; torso phantoms, with ribs, heart and back muscles beside the abdomen, so
that every part of ``total`` has its structures there) plus the user's CTs given with
``validate_on``; the result says which.
With the user's CTs a point's agreement is the worst of its sources (the phantoms pooled, each CT
pooled), not all patches pooled: on the trained full-width 3 mm network the phantoms agree more
than a real CT does (0.934 against 0.880 at 87.5 % of the MACs,
``benchmarks/results/bench_quality_target_w32_validate_on_ct_worst_source.txt``), so pooling them
promised a user more than their CT got. A source counts only where the original labels at least
``MIN_REFERENCE_FOREGROUND`` of its voxels as foreground (two empty maps agree perfectly); where
none does, nothing is compressed and the original runs as stock runs it (``TargetChoice.unjudged``).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from TuckerSegLib.compression.quality_curve import (MAX_FRACTION, MIN_REFERENCE_FOREGROUND, SEARCH_FRACTIONS,
                                                   QualityCurve, QualityPoint, curve_key, load_curve, next_fraction,
                                                   save_curve)
from TuckerSegLib.engines.base import predict_tiles
from TuckerSegLib.engines.int8 import PLAIN_AT_OR_BELOW
from TuckerSegLib.models.checkpoint import file_sha256
from TuckerSegLib.models.nnunet_folder import NnUNetModel
from TuckerSegLib.network.labels import argmax_labels
from TuckerSegLib.progress import NullProgress, Progress
from TuckerSegLib.specs import CompressionSpec, RunSpec
from TuckerSegLib.storage import model_cache_dir

PATCHES_PER_PHANTOM = 1
PATCHES_PER_CT = 2
PATCH_SEED = 4242
RACE_ROUNDS = 3  # timed calls of each close candidate (``QualityCurve.close_candidates``)
# A target's INT8 candidates are quantised with this ``--int8-min-agreement``: plain INT8, no
# layer in f32 beyond the first convolution and the head, no accuracy control (about 2.3 minutes
# for the full-width 3 mm network on 2 cores; putting layers back into f32 took 32 minutes and
# still missed 0.99 there). The target's own validation, on data the calibration never saw
# (phantoms 300-303 and the CTs of ``--validate-on``; calibration: phantoms 400-403), decides
# whether it may run.
TARGET_INT8_MIN_AGREEMENT = PLAIN_AT_OR_BELOW
# What a run that waits for its target's search (``segment``'s search "now", or a run whose curve
# lacks only these) leaves to the background search: quantising the original and the chosen
# network to INT8 took 2.5 of the 7 minutes of the full-width 3 mm network's search on 2 cores.
DEFERRED_PRECISIONS = ("int8",)
# The engine of the reference labels every agreement is measured against: stock's.
REFERENCE_ENGINE = "torch"


@dataclass
class TargetChoice:
    """What a quality target chose for one model, and on what evidence."""

    spec: CompressionSpec  # concrete: a ratio (or 1.0, the original)
    agreement: float  # predicted agreement with the original (1.0 for the original)
    validation: dict  # what it was measured on
    compressed_folder: Optional[Path] = None  # a distilled model chosen instead of zero-shot
    fallback: bool = False  # nothing below MAX_FRACTION met the target: the original runs
    point: Optional[QualityPoint] = None  # what runs (None: the original at f32)
    precision: str = "f32"  # the engine precision the chosen network runs at on this machine
    curve: Optional[QualityCurve] = field(default=None, repr=False)
    pending: Tuple[str, ...] = ()  # precisions left unmeasured (``defer``): a later search may choose them
    # the original labels (almost) no foreground on the validation data: agreement could not be
    # judged (``QualityCurve.judged``), so the original runs as stock runs it
    unjudged: bool = False

    @property
    def source(self) -> str:
        """Where ``agreement`` comes from, in words."""
        v = self.validation
        data = _data_said(v)
        if self.unjudged:
            return f"original network (nothing to judge agreement by on {data})"
        if self.point is None:
            return f"original network (no compressed network met the target on {data})"
        if self.point.source == "original":
            said = (f"original network on {self.point.engine} {self.precision}, validated against stock's PyTorch "
                    f"on {data}, {v.get('patches')} patches")
        else:
            said = (f"{self.point.source} compression{'' if self.precision == 'f32' else ' in ' + self.precision}, "
                    f"validated on {data}, {v.get('patches')} patches")
        if self.point.by_source:
            said += ", worst of " + ", ".join(f"{k} {a:.3f}" for k, a in self.point.by_source.items())
        return said

    def summary(self, min_agreement: float) -> str:
        faster = self._faster()
        if self.unjudged:
            return f"running the original network: {_unjudged_said(self.curve, self.validation)}"
        if self.fallback:
            if self.point is not None:
                return (f"no compressed network keeps agreement >= {min_agreement:g} below "
                        f"{100 * MAX_FRACTION:.0f} % of the MACs: running the original network on "
                        f"{self.point.engine} {self.precision} (agreement {self.agreement:.3f}{faster}, {self.source})")
            return (f"no compressed network keeps agreement >= {min_agreement:g} below "
                    f"{100 * MAX_FRACTION:.0f} % of the MACs: running the original network")
        return (f"{100 * self.point.macs_fraction:.0f} % of the MACs"
                f"{'' if self.precision == 'f32' else ' in ' + self.precision}, predicted agreement "
                f"{self.agreement:.3f} >= {min_agreement:g}{faster} ({self.source})")

    def _faster(self) -> str:
        """', 1.6x faster per patch here than f32' for a lower precision (or the original on a
        faster engine: 'than stock's PyTorch'), where both were timed."""
        if self.point is None or self.curve is None or not self.point.seconds_per_patch:
            return ""
        original = self.point.source == "original"
        if self.precision == "f32" and not original:
            return ""
        twin = None if original else self.curve.variant(self.point, "f32")
        f32 = self.curve.reference_seconds_per_patch if twin is None else twin.seconds_per_patch
        than = "stock's PyTorch f32" if original else "f32"
        return f", {f32 / self.point.seconds_per_patch:.1f}x faster per patch here than {than}" if f32 else ""


class ValidationPatches:
    """The patches a quality curve is measured on, nnU-Net-preprocessed for one model."""

    def __init__(self, model: NnUNetModel, cts: Tuple[str, ...] = (), torso: bool = True):
        from TuckerSegLib.compression.probe_data import VALIDATION_SEEDS

        self.model = model
        self.cts = tuple(cts)
        self.seeds = tuple(VALIDATION_SEEDS)
        self.torso = torso  # False: the abdominal phantoms alone (``benchmarks/bench_validation_evidence.py``)
        self.description = {
            "phantoms": list(self.seeds), "phantom_anatomy": "torso" if torso else "abdomen", "patches_per_phantom": PATCHES_PER_PHANTOM,
            "cts": [Path(p).name for p in self.cts], "ct_sha256": [file_sha256(Path(p))[:16] for p in self.cts],
            "patches_per_ct": PATCHES_PER_CT if self.cts else 0, "patch_size": list(model.patch_size),
            "patches": len(self.seeds) * PATCHES_PER_PHANTOM + len(self.cts) * PATCHES_PER_CT,
        }
        if self.cts:
            self.description["agreement"] = "worst source"
        self._patches: Optional[torch.Tensor] = None

    @property
    def sources(self) -> List[Tuple[str, slice]]:
        """``(name, patch rows)`` of each data source: the phantoms, then each CT."""
        n = len(self.seeds) * PATCHES_PER_PHANTOM
        out = [("phantoms", slice(0, n))]
        for i, path in enumerate(self.cts):
            out.append((Path(path).name, slice(n + i * PATCHES_PER_CT, n + (i + 1) * PATCHES_PER_CT)))
        return out

    def foreground(self, labels: torch.Tensor) -> Dict[str, float]:
        """The fraction of each source's voxels that ``labels`` (on ``patches``) call foreground."""
        return {name: round(float((labels[rows] > 0).float().mean()), 6) for name, rows in self.sources}

    @property
    def patches(self) -> torch.Tensor:
        """``(N, C, *patch)``: a centred patch of each phantom, seeded patches of each CT."""
        if self._patches is None:
            from TuckerSegLib.compression.ct_patches import Case, PatchSampler, preprocess
            from TuckerSegLib.compression.probe_data import default_validation

            volumes = default_validation(self.model, self.seeds, torso=self.torso).build()
            cases = [Case(f"phantom{s}", v.numpy()) for s, v in zip(self.seeds, volumes)]
            sampler = PatchSampler(cases, self.model.patch_size)
            out = [torch.from_numpy(sampler.crop(i, _centre(c.shape, self.model.patch_size))[0])
                   for i, c in enumerate(cases)]
            if self.cts:
                user = PatchSampler(preprocess(self.model, list(self.cts)), self.model.patch_size)
                for i, case in enumerate(user.cases):
                    out.append(torch.from_numpy(user.crop(i, _centre(case.shape, self.model.patch_size))[0]))
                    out.extend(PatchSampler([case], self.model.patch_size).fixed_patches(
                        PATCHES_PER_CT - 1, seed=PATCH_SEED + i))
            self._patches = torch.stack([p.float() for p in out])
        return self._patches


def _data_said(v: dict) -> str:
    """The validation data of description ``v``, in words."""
    data = f"{len(v.get('phantoms', []))} phantom CT(s)"
    if v.get("cts"):
        data += f" and {len(v['cts'])} CT(s) of yours ({', '.join(v['cts'])})"
    return data


def _unjudged_said(curve: Optional[QualityCurve], validation: dict) -> str:
    """Why a curve that judges nothing cannot choose, and what helps."""
    found = ", ".join(f"{k} {100 * v:.2g} %" for k, v in ((curve and curve.reference_foreground) or {}).items())
    return (f"the original network labels too few voxels as foreground on {_data_said(validation)} ({found}; "
            f"at least {100 * MIN_REFERENCE_FOREGROUND:g} % needed) to judge any compression's agreement; "
            f"name a CT that shows this model's structures with --validate-on")


def _centre(shape, patch) -> Tuple[int, ...]:
    return tuple((s - p) // 2 for s, p in zip(shape, patch))


def pooled_mean_dice(reference: torch.Tensor, test: torch.Tensor, num_classes: int) -> float:
    """Mean Dice over the foreground classes present in either label map, voxels pooled over all
    patches (as if they were one volume); 1.0 when neither has foreground."""
    ref, tst = reference.reshape(-1).long(), test.reshape(-1).long()
    both = torch.bincount(ref[ref == tst], minlength=num_classes)[:num_classes].double()
    n_ref = torch.bincount(ref, minlength=num_classes)[:num_classes].double()
    n_tst = torch.bincount(tst, minlength=num_classes)[:num_classes].double()
    present = (n_ref + n_tst)[1:] > 0
    if not bool(present.any()):
        return 1.0
    dice = (2 * both[1:] / (n_ref + n_tst)[1:].clamp(min=1))[present]
    return float(dice.mean())


def _run(network: nn.Module, model: NnUNetModel, patches: torch.Tensor, device: torch.device,
         precision: str = "f32", cache: Optional[Path] = None, engine: str = "auto") -> Tuple[torch.Tensor, float, str]:
    """Argmax labels of ``network`` on ``patches``, mean seconds per patch, engine name (f32:
    ``engine``, by default the fastest that matches f32 here; a lower precision: OpenVINO), weights
    as they are. ``cache``: where the engine keeps its converted network (the original's, which a
    run reuses); None: a temporary folder."""
    module, engine = _module(network, model, device, precision, cache, engine)
    labels = []
    with torch.inference_mode():
        # as the sliding window runs tiles (an engine may run several at once, so the time per
        # patch is the whole time over the patches)
        t0 = time.perf_counter()
        for logits in predict_tiles(module, (x[None].to(device) for x in patches), len(patches)):
            labels.append(argmax_labels(logits, 1, torch.uint8 if logits.shape[1] <= 256 else torch.int16).cpu())
        seconds = (time.perf_counter() - t0) / max(1, len(patches))
    return torch.cat(labels), seconds, engine


def target_int8_run(run: RunSpec) -> RunSpec:
    """``run`` at INT8 as a quality target measures and then runs it: calibrated on the built-in
    phantoms only and quantised with ``TARGET_INT8_MIN_AGREEMENT`` (the same cached INT8 model in
    the search and in the runs that follow)."""
    return replace(run, engine="openvino", precision="int8", int8_min_agreement=TARGET_INT8_MIN_AGREEMENT,
                   int8_calibration=())


def _module(network: nn.Module, model: NnUNetModel, device: torch.device, precision: str,
            cache: Optional[Path], engine: str = "auto") -> Tuple[nn.Module, str]:
    """``network`` prepared as a target's measurements run it (see ``_run``), and the engine's name."""
    from TuckerSegLib.engines import prepare_network

    engine = engine if precision == "f32" else "openvino"
    run = RunSpec(engine=engine, precision=precision, layer_forms="as-is")
    int8_data = None
    if precision == "int8":
        from TuckerSegLib.engines.int8_data import model_int8_data

        run = target_int8_run(run)
        int8_data = model_int8_data(model.plans, model.configuration, model.dataset_json,
                                    model.num_input_channels, model.patch_size)
    module, info = prepare_network(network, model.patch_size, model.num_input_channels, device, run,
                                   cache_dir=cache, check_agreement=False, measure_auto=False, int8_data=int8_data)
    return module, info.name


def timed_in_turns(modules: Sequence[nn.Module], x: torch.Tensor, rounds: int = RACE_ROUNDS) -> List[float]:
    """The fastest of ``rounds`` calls of each module on ``x``, the modules called in turns after
    one warm-up call each: a slow spell of the machine then falls on all of them alike."""
    best = [float("inf")] * len(modules)
    with torch.inference_mode():
        for m in modules:
            m(x)
        for _ in range(rounds):
            for i, m in enumerate(modules):
                t0 = time.perf_counter()
                m(x)
                best[i] = min(best[i], time.perf_counter() - t0)
    return best


def _reference(model: NnUNetModel, data: ValidationPatches, key: str, cache: Path, device: torch.device,
               progress: Progress) -> Tuple[torch.Tensor, Optional[float]]:
    """The original network's labels on the validation patches as stock runs it (computed once, cached)."""
    path = cache / f"quality_reference-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        try:
            with np.load(path) as f:
                return torch.from_numpy(f["labels"]), float(f["seconds"])
        except (OSError, ValueError, KeyError):
            pass  # damaged: computed again
    from TuckerSegLib.models.nnunet_folder import with_weights

    progress.log(f"quality target: the original network on {len(data.patches)} validation patches (once)")
    labels, seconds, _ = _run(with_weights(model).network, model, data.patches, device, engine=REFERENCE_ENGINE)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(tmp, labels=labels.numpy(), seconds=seconds)
    tmp.replace(path)
    return labels, seconds


def choose_for_target(model_folder: Union[str, Path], spec: CompressionSpec, fold: Union[int, str] = 0,
                      checkpoint_name: str = "checkpoint_final.pth", device: Union[str, torch.device] = "cpu",
                      cache_dir: Optional[Union[str, Path]] = None, progress: Optional[Progress] = None,
                      fractions: Sequence[float] = SEARCH_FRACTIONS,
                      precisions: Sequence[str] = ("f32",), measure: bool = True,
                      defer: Sequence[str] = (), fast_original: bool = False) -> Optional[TargetChoice]:
    """The cheapest network of ``model_folder`` whose validated agreement is at least
    ``spec.min_agreement`` (zero-shot at ``spec.policy``, or a registered distilled model); the
    original when none is, below ``MAX_FRACTION`` of the MACs. ``fractions``: the ratios tried,
    from the top down until one misses, then bisected (``quality_curve.next_fraction``).

    ``precisions`` other than f32 (``lower_precisions``): that network and the original are also
    measured at each (agreement with the same f32 reference, time per patch here), and the
    fastest that meets the target runs (``QualityCurve.fastest_for``). The ranks come from the f32
    curve alone, so they are the same on every machine; the precision is this machine's.

    ``measure`` False: None where the choice needs a measurement the cached curve does not hold
    (``pipeline.background_search`` then measures it in another process). ``defer``: precisions
    not measured now whatever ``measure`` says; the choice is made among the others and names
    those still missing in ``pending`` (for a background search to measure).

    ``fast_original`` (``original_on_fast_engine``): where no compressed network meets the target,
    the original at f32 on the engine ``auto`` picks here is measured too, and runs instead of
    stock's PyTorch where it meets the target and is faster."""
    from TuckerSegLib.compression.cache import get_compressed_model
    from TuckerSegLib.compression.quality_curve import distilled_models
    from TuckerSegLib.models.compressed_file import load_compressed
    from TuckerSegLib.models.nnunet_folder import load_model_folder, with_weights

    progress = progress or NullProgress()
    device = torch.device(device) if not isinstance(device, torch.device) else device
    folder = Path(model_folder)
    target = float(spec.min_agreement)
    # the weights only where something is measured: a settled curve is read from its key alone
    # (a warm run then loads the network once, for the engine: 0.3 s less for a full-width network)
    model = load_model_folder(folder, fold, checkpoint_name, with_network=False)
    data = ValidationPatches(model, spec.validate_on)
    stamp = (f"{model.source_fingerprint}|{spec.policy}|{spec.method}|{spec.rank_multiple}|{spec.rank_min}"
             f"|reference {REFERENCE_ENGINE}")
    key = curve_key(stamp, data.description)
    curve = load_curve(folder, key, data.description, cache_dir)
    cache = model_cache_dir(folder, cache_dir)
    reference: List[torch.Tensor] = []  # computed on first need

    def reference_labels() -> torch.Tensor:
        if not reference:
            labels, seconds = _reference(model, data, key, cache, device, progress)
            reference.append(labels)
            curve.reference_seconds_per_patch = seconds
            curve.reference_foreground = data.foreground(labels)
        return reference[0]

    def measured(network: nn.Module, precision: str = "f32", engine_cache: Optional[Path] = None
                 ) -> Tuple[float, Optional[dict], float, str]:
        """``(agreement, agreement per judged source where several were validated, seconds per
        patch, engine)``: the worst of the sources where the original labels enough foreground."""
        ref = reference_labels()
        labels, seconds, engine = _run(network, model, data.patches, device, precision, engine_cache)
        k = max(int(model.num_classes), int(ref.max()) + 1, int(labels.max()) + 1)
        judged = curve.judged_sources()
        by_source = {name: round(pooled_mean_dice(ref[rows], labels[rows], k), 4)
                     for name, rows in data.sources if name in judged}
        return min(by_source.values()), by_source if len(data.sources) > 1 else None, seconds, engine

    # first what the original finds on the validation data: where it labels (almost) nothing,
    # no agreement there is evidence, and nothing is measured
    if curve.reference_foreground is None:
        if not measure:
            return None
        reference_labels()
        save_curve(folder, key, curve, cache_dir)
    if not curve.judged:
        return TargetChoice(spec.concrete(1.0), 1.0, data.description, fallback=True, curve=curve, unjudged=True)

    while True:
        f = next_fraction(curve, target, fractions)
        if f is None:
            break
        if not measure:
            return None
        concrete = spec.concrete(f)
        progress.stage("quality", f"quality target {target:g}: measuring {100 * f:.1f} % of the MACs")
        compressed = get_compressed_model(folder, concrete, fold, cache_dir, checkpoint_name, progress)
        agreement, by_source, seconds, engine = measured(compressed.network)
        point = QualityPoint(float(compressed.manifest["report"]["macs_ratio"]), agreement, "zero-shot",
                             spec.policy, f, None, round(seconds, 4), engine, by_source)
        curve.points.append(point)
        save_curve(folder, key, curve, cache_dir)
        progress.log(f"quality curve {folder.parent.name}: {100 * point.macs_fraction:.1f} % MACs -> "
                     f"agreement {agreement:.3f} ({seconds:.2f} s/patch, {engine})")
    for distilled in distilled_models(folder, cache_dir):
        if any(p.folder == distilled for p in curve.points) or not Path(distilled).is_dir():
            continue
        if not measure:
            return None
        student = load_compressed(distilled)
        agreement, by_source, seconds, engine = measured(student.network)
        curve.points.append(QualityPoint(float(student.manifest["report"]["macs_ratio"]), agreement,
                                         "distilled", spec.policy, 1.0, str(distilled), round(seconds, 4), engine,
                                         by_source))
        save_curve(folder, key, curve, cache_dir)

    def network_of(point: Optional[QualityPoint]) -> Tuple[nn.Module, Optional[Path]]:
        """The network a point runs (None or source "original": the original), and where its
        engine files are kept (the original's beside the model: a run reuses them)."""
        if point is None or point.source == "original":
            return with_weights(model).network, cache
        if point.folder:
            return load_compressed(point.folder).network, None
        concrete = spec.concrete(point.ratio)
        return get_compressed_model(folder, concrete, fold, cache_dir, checkpoint_name, progress).network, None

    best = curve.best_for(target)
    if fast_original and best is None and curve.original_f32() is None:
        if not measure:
            return None
        progress.stage("quality", f"quality target {target:g}: measuring the original network on a faster engine")
        network, engine_cache = network_of(None)
        agreement, by_source, seconds, engine = measured(network, "f32", engine_cache)
        curve.points.append(QualityPoint(1.0, agreement, "original", spec.policy, seconds_per_patch=round(seconds, 4),
                                         engine=engine, by_source=by_source))
        save_curve(folder, key, curve, cache_dir)
        progress.log(f"quality curve {folder.parent.name}: the original network on {engine} f32 -> agreement "
                     f"{agreement:.3f} with stock's PyTorch ({seconds:.2f} s/patch, "
                     f"{curve.reference_seconds_per_patch:.2f} s/patch in PyTorch)")
    pending: List[str] = []
    for precision in precisions:
        if precision == "f32":
            continue
        # the original (None) first: where it misses in INT8, the chosen network, which adds
        # compression's error to INT8's, is not worth minutes of quantising
        for base in ([None] if best is None else [None, best]):
            if curve.variant(base, precision) is not None:
                continue
            original = curve.variant(None, precision)
            if precision == "int8" and base is not None and original is not None and not original.meets(target):
                continue
            if precision in defer:
                if precision not in pending:
                    pending.append(precision)
                continue
            if not measure:
                return None
            what = "the original network" if base is None else f"{100 * base.macs_fraction:.1f} % of the MACs"
            progress.stage("quality", f"quality target {target:g}: measuring {what} in {precision}")
            network, engine_cache = network_of(base)
            agreement, by_source, seconds, engine = measured(network, precision, engine_cache)
            runs = base or QualityPoint(1.0, 1.0, "original", spec.policy)
            curve.points.append(replace(runs, agreement=agreement, seconds_per_patch=round(seconds, 4),
                                        engine=engine, by_source=by_source, precision=precision))
            save_curve(folder, key, curve, cache_dir)
            progress.log(f"quality curve {folder.parent.name}: {what} in {precision} -> agreement "
                         f"{agreement:.3f} ({seconds:.2f} s/patch, {engine})")

    close = [p for _, p in curve.close_candidates(target, precisions, fast_original=fast_original)]
    if len(close) > 1 and None not in close and not all(p.seconds_in_turns for p in close):
        if not measure:
            return None
        progress.stage("quality", f"quality target {target:g}: timing the {len(close)} fastest ways to run it in turns")
        modules = []
        for p in close:
            network, engine_cache = network_of(p)
            modules.append(_module(network, model, device, p.precision, engine_cache)[0])
        seconds = timed_in_turns(modules, data.patches[:1].to(device))
        del modules
        for p, t in zip(close, seconds):
            curve.update(p, seconds_in_turns=round(t, 4))
        save_curve(folder, key, curve, cache_dir)
        progress.log(f"quality curve {folder.parent.name}: timed in turns: " + ", ".join(
            f"{'the original' if p.source == 'original' else f'{100 * p.macs_fraction:.1f} % of the MACs'} "
            f"{p.precision} {t:.2f} s/patch" for p, t in zip(close, seconds)))

    chosen = curve.fastest_for(target, precisions, fast_original=fast_original)
    if chosen is None or chosen.source == "original":
        return TargetChoice(spec.concrete(1.0),
                            1.0 if chosen is None else chosen.agreement, data.description, fallback=True,
                            point=chosen, precision="f32" if chosen is None else chosen.precision, curve=curve,
                            pending=tuple(pending))
    return TargetChoice(spec.concrete(chosen.ratio),
                        chosen.agreement, data.description, Path(chosen.folder) if chosen.folder else None, False,
                        chosen, chosen.precision, curve, tuple(pending))


def original_on_fast_engine(run: RunSpec, device: Union[str, torch.device]) -> bool:
    """Whether a target that falls back to the original may run it on OpenVINO f32 instead of
    stock's PyTorch: where the user left engine and precision to us, on a CPU OpenVINO runs."""
    from TuckerSegLib.engines.select import why_not

    device = torch.device(device) if not isinstance(device, torch.device) else device
    return (run.engine == "auto" and run.precision == "auto" and device.type == "cpu"
            and not why_not("openvino", device, "f32"))


def lower_precisions(run: RunSpec, device: Union[str, torch.device]) -> Tuple[str, ...]:
    """The precisions a quality target may choose for ``run`` here: f32, plus bf16 where the
    user left precision and engine to us and OpenVINO runs bf16 natively on this CPU, plus INT8
    where this CPU has VNNI or AMX."""
    from TuckerSegLib.compression.quality_curve import TARGET_PRECISIONS
    from TuckerSegLib.engines.select import why_not

    device = torch.device(device) if not isinstance(device, torch.device) else device
    if run.precision != "auto" or run.engine not in ("auto", "openvino") or device.type != "cpu":
        return ("f32",)
    return tuple(p for p in TARGET_PRECISIONS if p == "f32" or not why_not("openvino", device, p))
