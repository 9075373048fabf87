"""The live read-out under the ratio slider: params, MACs and expected speed-up.

Computed from the architecture only, no weights: ``TuckerSegLib.estimate.readout_cost`` looks the
numbers up in a table shipped with the core (``estimate_cost`` at every ratio on the slider's
0.01 grid), so it neither imports torch nor traces networks on Slicer's GUI thread and can follow
the slider (microseconds per move). When the table is unavailable (an older core) the read-out
says "n/a" instead of failing.
"""
from __future__ import annotations

from typing import Optional


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


def format_readout(cost: Optional[dict]) -> str:
    """One line for the panel."""
    if not cost:
        return "Params: n/a   MACs: n/a   expected speed-up: n/a"
    speedup = cost.get("expected_speedup")
    speed = f"{float(speedup):.2f}x" if speedup else "n/a"
    return (f"Params: {human(cost.get('params'))} of {human(cost.get('params_original'))}   "
            f"MACs: {human(cost.get('macs'))} of {human(cost.get('macs_original'))}   "
            f"expected speed-up: {speed}")


def format_summary(summary: dict) -> str:
    """The panel's text after a run: time, params, MACs, ratio, segments."""
    lines = [f"Finished in {summary.get('seconds', 0.0):.1f} s "
             f"({summary.get('segments', 0)} structures found)",
             f"Compression ratio: {summary.get('ratio')} ({summary.get('policy', '')}, "
             f"{summary.get('quality', '')})"]
    if summary.get("params") is not None:
        lines.append(f"Params: {human(summary.get('params'))} (original "
                     f"{human(summary.get('params_original'))})")
    if summary.get("macs") is not None:
        lines.append(f"MACs: {human(summary.get('macs'))} (original "
                     f"{human(summary.get('macs_original'))})")
    return "\n".join(lines)
