"""The distillation loss curve as a PNG (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def save_loss_curve(loss_curve: Sequence[float], path: Path, title: str = "distillation loss") -> Path:
    """Raw per-step loss and its running mean, log scale; written atomically."""
    from TuckerSegLib.evaluation.plots import pyplot, save_figure

    plt = pyplot()
    y = np.asarray(loss_curve, dtype=float)
    steps = np.arange(1, len(y) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.plot(steps, y, lw=0.8, alpha=0.45, label="per step")
    window = max(1, len(y) // 20)
    if len(y) >= window > 1:
        smooth = np.convolve(y, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, lw=1.8, label=f"running mean ({window})")
    if len(y) and y.min() > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path, tight=False)
