"""The live read-out under the quality target and the ratio slider: params, MACs, predicted
agreement with the original networks and measured speed.

Params and MACs come from the architecture only, no weights: ``TuckerSegLib.estimate.readout_cost``
looks them up in a table shipped with the core. Agreement and speed come from the quality curves
that quality-target runs measure and keep beside the installed models
(``TuckerSegLib.estimate.quality_readout``): until a run has measured them the read-out says
"not measured yet" (a MAC ratio is not a speed-up, so none is shown), or that the curve is being
measured in the background now. Neither imports torch nor
traces networks on Slicer's GUI thread (about a millisecond per slider move). When the core
cannot answer (an older core) the read-out says "n/a" instead of failing.
"""
from __future__ import annotations

from typing import Optional


# While a detached search measures a curve (``TuckerSegLib.pipeline.background_search``); the
# panel reads the curves again every ``REFRESH_SECONDS`` while its read-out says this.
MEASURING = "Agreement being measured in the background now; the next run uses it"
REFRESH_SECONDS = 15


def human(count: Optional[float], unit: str = "") -> str:
    """1.23 G / 45.6 M / 789 k style numbers."""
    if count is None:
        return "n/a"
    value = float(count)
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {suffix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def estimate(task: str, quality: str, ratio: float, policy: str) -> Optional[dict]:
    """``readout_cost``'s dict, or None when it is not available or fails (never imports torch)."""
    try:
        from TuckerSegLib.estimate import readout_cost
    except Exception:
        return None
    try:
        return dict(readout_cost(task=task, quality=quality, ratio=float(ratio), policy=policy))
    except Exception:
        return None


def quality(task: str, quality: str, ratio: float, policy: str, min_agreement: Optional[float] = None,
            weights_root=None, cache_dir=None) -> Optional[dict]:
    """``quality_readout``'s dict (target mode when ``min_agreement`` is given), or None when it is
    not available or fails (never imports torch)."""
    try:
        from TuckerSegLib.estimate import quality_readout
    except Exception:
        return None
    try:
        return dict(quality_readout(task, quality, float(ratio), weights_root=weights_root,
                                    cache_dir=cache_dir, policy=policy, min_agreement=min_agreement))
    except Exception:
        return None


def warn_below() -> float:
    try:
        from TuckerSegLib.compression.quality_curve import WARN_BELOW
    except Exception:
        return 0.90
    return float(WARN_BELOW)


def warning_text(threshold: float) -> str:
    return f"\u26a0 below {threshold:.2f}: segmentations may be unusable"


def _speed_text(q: Optional[dict]) -> str:
    seconds = (q or {}).get("seconds_per_patch")
    if not seconds:
        return "Speed not measured yet"
    text = f"Speed: {float(seconds):.2f} s/patch measured"
    extras = []
    reference = q.get("reference_seconds_per_patch")
    if reference:
        extras.append(f"original {float(reference):.2f} s")
    if q.get("engine"):
        extras.append(str(q["engine"]))
    return text + (f" ({', '.join(extras)})" if extras else "")


def _agreement_text(q: Optional[dict], target_mode: bool) -> str:
    if q is None:
        return "Predicted agreement: n/a"
    value = q.get("predicted_agreement")
    several = len(q.get("models") or []) > 1
    where = " (lowest of the task's networks)" if several else ""
    if value is not None:
        return f"Predicted agreement {float(value):.3f}{where}"
    bound = q.get("agreement_at_most")
    if bound is not None:
        return f"Predicted agreement at most {float(bound):.3f}{where} (not measured this low)"
    if q.get("unjudged"):
        return (f"Agreement cannot be judged for {len(q['unjudged'])} network(s): the original finds almost "
                f"nothing on the validation data, so it runs uncompressed (--validate-on a CT can judge it)")
    if q.get("measuring"):
        return MEASURING
    if target_mode:
        return "Agreement not measured yet: the first run runs the original and measures it in the background"
    return "Agreement not measured yet: a run with a quality target measures it"


def format_readout(cost: Optional[dict], quality_info: Optional[dict] = None,
                   min_agreement: Optional[float] = None) -> str:
    """The panel's lines: params and MACs, predicted agreement, measured speed, and the warning
    below ``WARN_BELOW``. ``min_agreement`` set: the quality target's read-out (what
    the curves say it picks), else the fixed ratio's."""
    target_mode = min_agreement is not None
    if target_mode and (quality_info or {}).get("predicted_agreement") is None:
        sizes = "Params and MACs: chosen once the curve is measured"
    elif not cost:
        sizes = "Params: n/a   MACs: n/a"
    else:
        share = float(cost.get("macs") or 0) / max(1.0, float(cost.get("macs_original") or 0))
        sizes = (f"Params: {human(cost.get('params'))} of {human(cost.get('params_original'))}   "
                 f"MACs: {human(cost.get('macs'))} of {human(cost.get('macs_original'))} "
                 f"({100 * share:.0f} %)")
    lines = [sizes, _agreement_text(quality_info, target_mode), _speed_text(quality_info)]
    threshold = warn_below()
    value = None
    if quality_info:
        value = quality_info.get("predicted_agreement")
        if value is None:
            value = quality_info.get("agreement_at_most")
    if target_mode and float(min_agreement) < threshold:
        value = min(float(min_agreement), float(value) if value is not None else 1.0)
    if value is not None and round(float(value), 3) < threshold:
        lines.append(warning_text(threshold))
    return "\n".join(lines)


def readout(task: str, quality_mode: str, ratio: float, policy: str,
            min_agreement: Optional[float] = None, weights_root=None, cache_dir=None) -> str:
    """The whole read-out of the panel's state (the widget calls only this). Target mode shows
    params and MACs at the fraction the curves say the target picks."""
    q = quality(task, quality_mode, ratio, policy, min_agreement, weights_root, cache_dir)
    at = ratio
    if min_agreement is not None and q and q.get("predicted_agreement") is not None and q.get("macs_fraction"):
        at = max(0.01, min(1.0, float(q["macs_fraction"])))
    return format_readout(estimate(task, quality_mode, at, policy), q, min_agreement)


def format_summary(summary: dict) -> str:
    """The panel's text after a run: time, the quality target or ratio, predicted agreement and
    where it came from, params, MACs, segments."""
    lines = [f"Finished in {summary.get('seconds', 0.0):.1f} s "
             f"({summary.get('segments', 0)} structures found)"]
    extra = f"{summary.get('policy', '')}, {summary.get('quality', '')}"
    if summary.get("min_agreement") is not None:
        ratio = summary.get("ratio")
        kept = f", {100 * float(ratio):.0f} % of the MACs kept" if ratio is not None else ""
        lines.append(f"Quality target: agreement \u2265 {float(summary['min_agreement']):g} ({extra}{kept})")
    else:
        lines.append(f"Compression ratio: {summary.get('ratio')} ({extra})")
    agreement = summary.get("predicted_agreement")
    source = summary.get("agreement_source") or ""
    if agreement is None:
        lines.append("Predicted agreement: not measured" + (f" ({source})" if source else ""))
    else:
        lines.append(f"Predicted agreement: {float(agreement):.3f}" + (f" ({source})" if source else ""))
        if round(float(agreement), 3) < warn_below():
            lines.append(warning_text(warn_below()))
    if summary.get("params") is not None:
        lines.append(f"Params: {human(summary.get('params'))} (original "
                     f"{human(summary.get('params_original'))})")
    if summary.get("macs") is not None:
        lines.append(f"MACs: {human(summary.get('macs'))} (original "
                     f"{human(summary.get('macs_original'))})")
    return "\n".join(lines)
