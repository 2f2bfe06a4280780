"""The CV report's and the notebooks' figures (pure layer: numpy, pandas, matplotlib).

Each ``figure_*`` function returns a ``matplotlib.figure.Figure`` built without pyplot,
so importing this module or drawing changes no global matplotlib state (backend,
figure registry); ``save_figure`` writes one as PNG. ``overlay`` blends class colours
into an image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from sklearn.metrics import roc_curve

from pipeline.core.atomic import atomic_path
from pipeline.core.curves import smooth
from pipeline.core.report_scores import ALL_CLASSES, presence_auc


def class_colors(n: int) -> np.ndarray:
    """(n, 3) uint8 RGB: one distinct colour per class (tab10, then tab20)."""
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    rgb = np.array([cmap(i % cmap.N)[:3] for i in range(n)]).reshape(n, 3)
    return np.rint(rgb * 255).astype(np.uint8)


def overlay(image: np.ndarray, masks: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend class colours into ``image`` (H, W, 3) uint8 where ``masks`` (H, W, C) {0, 1} are on.

    Returns (H, W, 3) uint8; overlapping classes blend in class order.
    """
    if image.ndim != 3 or masks.ndim != 3 or image.shape[:2] != masks.shape[:2]:
        raise ValueError(
            f"image (H, W, 3) and masks (H, W, C) must share H, W; got {image.shape}, {masks.shape}"
        )
    out = image.astype(np.float32)
    for c, color in enumerate(class_colors(masks.shape[2])):
        on = masks[:, :, c] > 0
        out[on] = (1 - alpha) * out[on] + alpha * color.astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def figure_overlays(
    panels: Sequence[Sequence[tuple[str, np.ndarray]]], classes: Sequence[str]
) -> Figure:
    """A grid of images, one row per item of ``panels``: ``(title, image (H, W, 3) uint8)``."""
    rows = max(1, len(panels))
    cols = max((len(row) for row in panels), default=1)
    height = 2.7 * rows + 0.4
    fig = Figure(figsize=(3.6 * cols, height))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, row in enumerate(panels):
        for c, (title, image) in enumerate(row):
            axes[r, c].imshow(image)
            axes[r, c].set_title(title, fontsize=8)
    colors = class_colors(len(classes)) / 255.0
    handles = [Patch(color=colors[i], label=name) for i, name in enumerate(classes)]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(classes), 8), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / height))
    return fig


def figure_fold_histories(histories: Mapping[str, pd.DataFrame], title: str = "") -> Figure:
    """Every fold's curves on one figure: a panel per metric (train dashed, val solid) and lr.

    ``histories`` maps a label (e.g. ``fold 0``) to a history table with ``epoch``,
    metric columns and optionally ``lr``; each series is raw (thin) and smoothed (thick).
    """
    names = {c for h in histories.values() for c in h.columns} - {"epoch", "lr", "epoch_time"}
    panels = sorted({c.removeprefix("val_") for c in names})
    if any("lr" in h.columns for h in histories.values()):
        panels.append("lr")
    cols = min(3, max(1, len(panels)))
    rows = max(1, int(np.ceil(len(panels) / cols)))
    fig = Figure(figsize=(4.8 * cols, 3.3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    cmap = matplotlib.colormaps["tab10"]
    for ax, panel in zip(axes.ravel(), panels, strict=False):
        series = [("lr", "-")] if panel == "lr" else [(panel, "--"), (f"val_{panel}", "-")]
        for i, (label, history) in enumerate(histories.items()):
            color = cmap(i % 10)
            for column, style in series:
                if column not in history.columns:
                    continue
                epochs = history["epoch"].to_numpy()
                values = history[column].to_numpy(dtype=np.float64)
                ax.plot(epochs, values, style, color=color, alpha=0.3, linewidth=1)
                kind = "" if panel == "lr" else " val" if column.startswith("val_") else " train"
                name = label + kind
                ax.plot(
                    epochs, smooth(values.tolist()), style, color=color, linewidth=2, label=name
                )
        lows, highs = ax.dataLim.intervaly
        if panel == "lr" and lows > 0 and highs > 10 * lows:  # log only where lr spans decades
            ax.set_yscale("log")
        ax.set_title(panel)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"{title} (train dashed, validation solid; thick = smoothed)".strip(), fontsize=10)
    fig.tight_layout()
    return fig


def figure_stage_bars(
    summary: pd.DataFrame,
    stages: Sequence[str],
    metrics: Sequence[str] = ("kaggle_dice", "dice", "iou"),
) -> Figure:
    """Grouped bars per class (and ``all``), one bar per stage, error bars = std across folds.

    ``summary`` is ``summarise_folds`` output.
    """
    classes = list(dict.fromkeys(summary["class"]))
    fig = Figure(figsize=(5 * len(metrics), 3.6))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    width = 0.8 / max(1, len(stages))
    x = np.arange(len(classes))
    for ax, metric in zip(axes[0], metrics, strict=True):
        for i, stage in enumerate(stages):
            rows = summary[summary["stage"] == stage].set_index("class").reindex(classes)
            ax.bar(
                x + (i - (len(stages) - 1) / 2) * width,
                rows[f"{metric}_mean"].to_numpy(),
                width,
                yerr=rows[f"{metric}_std"].to_numpy(),
                capsize=3,
                label=stage,
            )
        ax.set_xticks(x, classes, rotation=30, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{metric} (mean ± std over folds)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def figure_confusions(pooled: pd.DataFrame, stages: Sequence[str]) -> Figure:
    """Presence confusion matrices (rows = truth, columns = prediction), stages x classes.

    ``pooled`` is ``score_table(counts, pooled=True)``; the ``all`` row is left out.
    """
    classes = [c for c in dict.fromkeys(pooled["class"]) if c != ALL_CLASSES]
    fig = Figure(figsize=(2.4 * len(classes), 2.3 * len(stages)))
    axes = fig.subplots(len(stages), len(classes), squeeze=False)
    for r, stage in enumerate(stages):
        rows = pooled[pooled["stage"] == stage].set_index("class")
        for c, name in enumerate(classes):
            row = rows.loc[name]
            matrix = np.array([[row["tp"], row["fn"]], [row["fp"], row["tn"]]])
            ax = axes[r, c]
            ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(1, int(matrix.max())))
            for (i, j), value in np.ndenumerate(matrix):
                ax.text(j, i, str(int(value)), ha="center", va="center", fontsize=9)
            ax.set_xticks([0, 1], ["present", "absent"], fontsize=7)
            ax.set_yticks([0, 1], ["present", "absent"], fontsize=7)
            ax.set_title(f"{name} / {stage}", fontsize=8)
            if c == 0:
                ax.set_ylabel("truth", fontsize=7)
            if r == len(stages) - 1:
                ax.set_xlabel("predicted", fontsize=7)
    fig.tight_layout()
    return fig


def figure_roc(truth: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> Figure:
    """ROC curve per class of (N, C) presence probs against (N, C) {0, 1} truth; AUC in legend."""
    auc = presence_auc(truth, probs, classes)
    fig = Figure(figsize=(4.8, 4.2))
    ax = fig.subplots()
    for c, name in enumerate(classes):
        if np.isnan(auc[name]):
            continue
        fpr, tpr, _ = roc_curve(truth[:, c] > 0.5, probs[:, c])
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc[name]:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="gray")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("classifier out-of-fold ROC", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def figure_counts(counts: pd.DataFrame, title: str = "") -> Figure:
    """An annotated heat map of a square count table (e.g. ``co_occurrence``)."""
    values = counts.to_numpy()
    fig = Figure(figsize=(1.1 * len(counts) + 1.5, 1.0 * len(counts) + 1.0))
    ax = fig.subplots()
    ax.imshow(values, cmap="Blues", vmin=0, vmax=max(1, int(values.max())))
    for (i, j), value in np.ndenumerate(values):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(counts.columns)), list(counts.columns), rotation=30, fontsize=8)
    ax.set_yticks(range(len(counts.index)), list(counts.index), fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def figure_probs(prob: np.ndarray, classes: Sequence[str]) -> Figure:
    """One heat map per class of ``prob`` (H, W, C) float in [0, 1]."""
    fig = Figure(figsize=(3.4 * len(classes), 2.6))
    axes = fig.subplots(1, len(classes), squeeze=False)
    for c, (ax, name) in enumerate(zip(axes[0], classes, strict=True)):
        shown = ax.imshow(prob[:, :, c], vmin=0, vmax=1, cmap="viridis")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.colorbar(shown, ax=axes[0].tolist(), shrink=0.8)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 80) -> Path:
    """Write ``fig`` as PNG atomically (a pyplot-free figure needs no closing)."""
    with atomic_path(path, keep_suffix=True) as tmp:
        fig.savefig(tmp, dpi=dpi)
    return Path(path)
