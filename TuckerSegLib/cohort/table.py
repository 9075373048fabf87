"""The results table (one row per case, CSV and Parquet) and the end-of-batch summary.

Why: a cohort study reads the batch as a table: which cases failed and why, what each cost, and
with ``--statistics`` the volume and mean HU of every structure, as columns ready for analysis.
The table is rebuilt from the manifest, so it is complete after any rerun.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List

COLUMNS = ["case_id", "input", "status", "error", "output", "seconds", "segment_seconds",
           "attempts", "worker", "network", "ratio", "policy", "params", "macs", "params_original",
           "macs_original", "macs_fraction", "predicted_agreement", "finished_at"]
CSV_NAME = "results.csv"
PARQUET_NAME = "results.parquet"


def build_table(rows: List[Dict[str, Any]]):
    """A pandas DataFrame: the fixed columns, then ``<structure>_volume_mm3`` / ``_mean_hu``."""
    import pandas as pd

    flat, stat_cols = [], []
    for row in rows:
        item = {c: row.get(c) for c in COLUMNS}
        for name, values in (row.get("statistics") or {}).items():
            for key, suffix in (("volume", "volume_mm3"), ("intensity", "mean_hu")):
                col = f"{name}_{suffix}"
                if col not in stat_cols:
                    stat_cols.append(col)
                item[col] = (values or {}).get(key)
        flat.append(item)
    df = pd.DataFrame(flat, columns=COLUMNS + stat_cols)
    for col in ("seconds", "segment_seconds", "ratio", "macs_fraction", "predicted_agreement"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in ("attempts", "params", "macs", "params_original", "macs_original"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    for col in stat_cols:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in ("case_id", "input", "status", "error", "output", "worker", "network", "policy",
                "finished_at"):
        df[col] = df[col].astype("string")
    return df


def write_table(df, outdir: Path) -> List[Path]:
    """Write ``results.csv`` and ``results.parquet`` atomically (temporary file, then rename)."""
    outdir = Path(outdir)
    written = []
    csv_path, pq_path = outdir / CSV_NAME, outdir / PARQUET_NAME
    tmp = outdir / f".{CSV_NAME}.tmp-{os.getpid()}"
    df.to_csv(tmp, index=False)
    os.replace(tmp, csv_path)
    written.append(csv_path)
    try:
        import pyarrow  # noqa: F401
    except ImportError:  # pragma: no cover - pyarrow comes with the batch extra
        return written
    tmp = outdir / f".{PARQUET_NAME}.tmp-{os.getpid()}"
    df.to_parquet(tmp, index=False)
    os.replace(tmp, pq_path)
    written.append(pq_path)
    return written


def summarize(df, wall_seconds: float, processed: int, skipped: int, interrupted: bool) -> Dict[str, Any]:
    """Counts, throughput of this run (cases finished per hour of wall time) and the failures."""
    status = df["status"].fillna("pending")
    failed = df[status == "failed"]
    hours = wall_seconds / 3600.0
    return {"cases": int(len(df)), "done": int((status == "done").sum()),
            "failed": int(len(failed)), "pending": int((status == "pending").sum()),
            "skipped_already_done": int(skipped), "processed_this_run": int(processed),
            "wall_seconds": round(wall_seconds, 2),
            "cases_per_hour": round(processed / hours, 1) if hours > 0 and processed else 0.0,
            "interrupted": bool(interrupted),
            "failures": [{"case_id": r.case_id, "error": r.error} for r in failed.itertuples()]}


def summary_line(summary: Dict[str, Any]) -> str:
    """One line for the terminal."""
    s = summary
    text = (f"{s['cases']} case(s): {s['done']} done ({s['skipped_already_done']} from earlier runs), "
            f"{s['failed']} failed, {s['pending']} pending; {s['processed_this_run']} processed in "
            f"{s['wall_seconds']:.0f} s, {s['cases_per_hour']:.1f} cases/hour")
    if s["interrupted"]:
        text += "; interrupted: rerun the same command to continue"
    return text
