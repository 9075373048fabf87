"""Figures for the demo and ``tuckerseg eval``: slices with overlays, ratio curves, heat maps.

All figures use matplotlib's Agg backend (no display needed) and are written atomically.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, tight: bool = True) -> Path:
    """Write ``fig`` to ``path`` atomically (a temporary file, then a rename) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight" if tight else None)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; it is an ordinary output file
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        fig.clf()
        pyplot().close(fig)
    return path


def _label_cmap(n_labels: int):
    from matplotlib.colors import ListedColormap

    name, n = ("tab10", 10) if n_labels <= 10 else ("tab20", 20)
    base = pyplot().get_cmap(name)
    colours = [(0, 0, 0, 0)] + [base(i % n) for i in range(max(n_labels, 1))]
    return ListedColormap(colours)


def plot_slices(image: np.ndarray, segmentations: Mapping[str, np.ndarray], spacing: Sequence[float],
                path: Path, window=(-200.0, 300.0), title: str = "") -> Path:
    """One row per segmentation (e.g. truth, ratio 1.0, 0.5, ...), columns axial/coronal/sagittal
    through the centre of the labelled region, image in a soft-tissue window with label overlay.
    Arrays are in NIfTI voxel order (i, j, k)."""
    plt = pyplot()
    any_fg = np.zeros(image.shape, dtype=bool)
    for seg in segmentations.values():
        any_fg |= seg > 0
    centre = [int(np.mean(ix)) if len(ix) else s // 2
              for ix, s in zip(np.nonzero(any_fg), image.shape)] if any_fg.any() else \
        [s // 2 for s in image.shape]
    n_labels = int(max([int(s.max()) for s in segmentations.values()] + [1]))
    cmap = _label_cmap(n_labels)
    sx, sy, sz = [float(s) for s in spacing]
    views = [("axial", lambda a: a[:, :, centre[2]].T, sy / sx),
             ("coronal", lambda a: a[:, centre[1], :].T, sz / sx),
             ("sagittal", lambda a: a[centre[0], :, :].T, sz / sy)]
    rows = len(segmentations)
    fig, axes = plt.subplots(rows, 3, figsize=(10, 3.2 * rows), squeeze=False)
    for r, (name, seg) in enumerate(segmentations.items()):
        for c, (view, cut, aspect) in enumerate(views):
            ax = axes[r][c]
            ax.imshow(cut(image), cmap="gray", vmin=window[0], vmax=window[1], origin="lower",
                      aspect=aspect, interpolation="nearest")
            overlay = np.ma.masked_equal(cut(seg), 0)
            ax.imshow(overlay, cmap=cmap, vmin=0, vmax=n_labels, alpha=0.5, origin="lower",
                      aspect=aspect, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(view)
            if c == 0:
                ax.set_ylabel(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_ratio_curves(rows: List[dict], path: Path, x_key: str = "macs_fraction",
                      quality_keys: Sequence[str] = ("dice_vs_truth", "dice_vs_original"),
                      time_key: Optional[str] = "seconds", group_key: Optional[str] = None,
                      title: str = "") -> Path:
    """Quality (left axis) and time (right axis) against the fraction of MACs kept (or ratio).
    ``group_key`` (e.g. "policy") draws one line per group."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: Dict[str, List[dict]] = {}
    for row in rows:
        groups.setdefault(str(row.get(group_key, "")) if group_key else "", []).append(row)
    markers = "osd^v<>"
    for g, (group, items) in enumerate(groups.items()):
        items = sorted(items, key=lambda r: r[x_key])
        xs = [r[x_key] for r in items]
        for q, key in enumerate(quality_keys):
            ys = [r.get(key) for r in items]
            if all(y is None for y in ys):
                continue
            label = f"{key}" + (f" ({group})" if group else "")
            ax.plot(xs, [np.nan if y is None else y for y in ys], marker=markers[(g + q) % 7],
                    label=label)
    ax.set_xlabel({"macs_fraction": "fraction of MACs kept", "ratio": "ratio"}.get(x_key, x_key))
    ax.set_ylabel("mean Dice")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if time_key and any(time_key in r for r in rows):
        ax2 = ax.twinx()
        for g, (group, items) in enumerate(groups.items()):
            items = sorted(items, key=lambda r: r[x_key])
            ax2.plot([r[x_key] for r in items], [r[time_key] for r in items], linestyle="--",
                     color="grey", marker=markers[g % 7], alpha=0.7,
                     label=f"{time_key}" + (f" ({group})" if group else ""))
        ax2.set_ylabel("seconds")
        ax2.set_ylim(bottom=0)
        h2, l2 = ax2.get_legend_handles_labels()
        handles += h2
        labels += l2
    ax.legend(handles, labels, loc="lower right", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_heatmap(matrix: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str],
                 path: Path, title: str = "", value_label: str = "Dice") -> Path:
    """Heat map (rows = classes, columns = ratio/policy), values in [0, 1]."""
    plt = pyplot()
    matrix = np.asarray(matrix, dtype=float)
    h = max(3.0, 0.22 * len(row_labels) + 1.5)
    w = max(4.0, 0.9 * len(col_labels) + 3.0)
    fig, ax = plt.subplots(figsize=(w, h))
    im = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(row_labels)))
    ax.set_yticklabels(row_labels, fontsize=7 if len(row_labels) > 30 else 9)
    ax.set_xticks(range(len(col_labels)))
    ax.set_xticklabels(col_labels, rotation=45, ha="right", fontsize=9)
    if matrix.size and matrix.shape[0] <= 40:
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                if np.isfinite(matrix[i, j]):
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if matrix[i, j] < 0.6 else "black")
    fig.colorbar(im, ax=ax, label=value_label)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)
