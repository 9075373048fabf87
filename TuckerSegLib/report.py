"""Human-readable tables of compression reports (the JSON form is the report dict itself)."""
from __future__ import annotations

from typing import List


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23 M' (SI prefixes, three significant digits)."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.3g} {prefix}{unit}"
    return f"{n:.3g} {unit}".rstrip()


def format_report(report: dict, layers: bool = True) -> str:
    """A per-layer table and totals, as ``tuckerseg info`` prints it."""
    lines: List[str] = []
    if layers and report.get("layers"):
        header = f"{'layer':<44} {'type':<16} {'C_out x C_in x k':<18} {'ranks':<10} " \
                 f"{'params':>15} {'MACs':>17} {'rel.err':>8}"
        lines += [header, "-" * len(header)]
        for e in report["layers"]:
            shape = f"{e['out_channels']}x{e['in_channels']}x{'x'.join(map(str, e['kernel']))}"
            ranks = "dense" if e["ranks"] is None else f"{e['ranks'][0]},{e['ranks'][1]}"
            params = f"{human(e['params_before'])}>{human(e['params_after'])}"
            macs = f"{human(e['macs_before'])}>{human(e['macs_after'])}"
            lines.append(f"{e['name'][:44]:<44} {e['type']:<16} {shape:<18} {ranks:<10} "
                         f"{params:>15} {macs:>17} {e['rel_error']:>8.3f}")
        lines.append("")
    o, c = report["original"], report["compressed"]
    lines.append(f"policy {report.get('policy')}, ratio {report.get('ratio')}, "
                 f"method {report.get('method', '-')}, patch {report.get('patch_size', '-')}")
    lines.append(f"params: {o['params'] / 1e6:.2f} M -> {c['params'] / 1e6:.2f} M "
                 f"({100 * report['params_ratio']:.1f} %)")
    lines.append(f"MACs per patch: {o['macs'] / 1e9:.1f} G -> {c['macs'] / 1e9:.1f} G "
                 f"({100 * report['macs_ratio']:.1f} %, convolutions + normalisation as the study counts)")
    cal = report.get("calibration")
    if cal:
        lines.append(f"factors: data-aware ({cal.get('method')}) from {cal.get('patches')} patches of "
                     f"{', '.join(cal.get('data') or []) or 'calibration CTs'}")
    fin = report.get("finetune")
    if fin:
        curve = fin.get("loss_curve") or [float("nan")]
        lines.append(f"fine-tuned: {fin.get('steps')} distillation steps from {fin.get('teacher', {}).get('folder')} "
                     f"on {len(fin.get('data') or [])} CT(s), loss {curve[0]:.4f} -> {curve[-1]:.4f}")
    factorised = sum(1 for e in report.get("layers", []) if e["status"] == "factorised")
    if report.get("layers"):
        lines.append(f"layers factorised: {factorised} of {len(report['layers'])}")
    return "\n".join(lines)
