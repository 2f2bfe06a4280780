"""Training-curve plots from a history table (pure layer: pandas + matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pipeline.core.atomic import atomic_path


def smooth(values: Sequence[float] | np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Bias-corrected exponential moving average (TensorBoard-style), float64 (N,)."""
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha must be in [0, 1); got {alpha}")
    x = np.asarray(values, dtype=np.float64)
    out = np.empty_like(x)
    acc, weight = 0.0, 0.0
    for i, v in enumerate(x):  # a few hundred epochs at most: a loop is clearest
        acc = alpha * acc + (1 - alpha) * v
        weight = alpha * weight + (1 - alpha)
        out[i] = acc / weight
    return out


def plot_history(history: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Write a PNG of every metric (train and val on one panel) and the learning rate.

    ``history`` has an ``epoch`` column, metric columns (``loss``, ``val_loss``, ...) and
    optionally ``lr``; each series is drawn raw (thin) and smoothed (thick).
    """
    names = [c for c in history.columns if c not in ("epoch", "lr", "epoch_time")]
    bases = sorted({c.removeprefix("val_") for c in names})
    panels = [*bases, "lr"] if "lr" in history.columns else bases
    cols = min(3, len(panels))
    rows = int(np.ceil(len(panels) / cols))
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows))  # no pyplot: no global state touched
    axes = fig.subplots(rows, cols, squeeze=False)
    epochs = history["epoch"].to_numpy()
    for ax, name in zip(axes.ravel(), panels, strict=False):
        series = ["lr"] if name == "lr" else [c for c in (name, f"val_{name}") if c in history]
        for col in series:
            values = history[col].to_numpy(dtype=np.float64)
            (line,) = ax.plot(epochs, values, alpha=0.35, linewidth=1)
            if len(values) > 1:
                ax.plot(epochs, smooth(values), color=line.get_color(), linewidth=2, label=col)
            else:
                ax.plot(epochs, values, "o", color=line.get_color(), label=col)
        if name == "lr":
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    for ax in axes.ravel()[len(panels) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path, keep_suffix=True) as tmp:
        fig.savefig(tmp, dpi=80)
    return Path(path)
