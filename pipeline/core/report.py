"""The CV report's numbers, figures and documents (pure layer: numpy, pandas, matplotlib).

- Scores: ``ScoreAccumulator`` sums, per post-processing stage, fold and class, the
  Kaggle Dice of every image, the pixel counts behind pixel-level Dice and IoU, and the
  image-level presence confusion counts; ``score_table`` turns sums into metrics (per
  fold or pooled, with an ``all`` row over classes) and ``summarise_folds`` gives the
  mean and standard deviation across folds. Pixel-level means the intersections and
  areas summed over a fold's images before dividing.
- ``estimate_energy``: kWh and CO2e of a timed run from ``config.energy``.
- Figures (each function returns a matplotlib Figure; ``save_figure`` writes it).
- Data-set statistics and ``overlay`` for the notebooks.
- ``render_markdown`` / ``render_html``: the report documents from ``Section`` lists.
"""

from __future__ import annotations

import base64
import heapq
import html
import itertools
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from sklearn.metrics import roc_auc_score, roc_curve

from pipeline.core.curves import smooth
from pipeline.core.folds import presence_matrix
from pipeline.core.images import read_image, resolve_image_path
from pipeline.core.masks import decode_masks, rles_by_image
from pipeline.core.postprocess import PostprocessParams

logger = logging.getLogger(__name__)

ALL_CLASSES = "all"
COUNT_COLUMNS: tuple[str, ...] = (
    "n_images",
    "dice_sum",
    "intersection",
    "truth_pixels",
    "pred_pixels",
    "tp",
    "fp",
    "fn",
    "tn",
)
METRIC_COLUMNS: tuple[str, ...] = (
    "kaggle_dice",
    "dice",
    "iou",
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
)


# ---------------------------------------------------------------- scores


def predict_masks(
    q: np.ndarray, params: Sequence[PostprocessParams], classifier_prob: np.ndarray | None
) -> np.ndarray:
    """Post-process every class of one image: ``q`` uint8 (C, H, W) -> uint8 (C, H, W) {0, 1}.

    ``params`` holds one setting per class; ``classifier_prob`` (C,) float64 is needed
    iff some class is gated by the classifier.
    """
    if q.dtype != np.uint8 or q.ndim != 3 or q.shape[0] != len(params):
        raise ValueError(f"q must be uint8 ({len(params)}, H, W); got {q.dtype} {q.shape}")
    return np.stack(
        [
            p.apply(q[c], None if classifier_prob is None else float(classifier_prob[c]))
            for c, p in enumerate(params)
        ]
    )


class ScoreAccumulator:
    """Per (stage, fold, class) sums over images, in constant memory."""

    def __init__(self, classes: Sequence[str], n_folds: int, stages: Sequence[str]) -> None:
        self.classes = list(classes)
        self.stages = list(stages)
        if not self.classes or not self.stages or n_folds < 1:
            raise ValueError(
                f"need classes, stages and n_folds >= 1; got {self.classes}, {self.stages}, "
                f"{n_folds}"
            )
        self.n_folds = n_folds
        self._sums = np.zeros((len(self.stages), n_folds, len(self.classes), len(COUNT_COLUMNS)))

    def add(self, stage: str, fold: int, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
        """Add one image: ``truth`` and ``pred`` (C, H, W) {0, 1}; returns its (C,) Kaggle Dice."""
        if stage not in self.stages:
            raise ValueError(f"stage must be one of {self.stages}; got {stage!r}")
        if not 0 <= fold < self.n_folds:
            raise ValueError(f"fold must be in [0, {self.n_folds - 1}]; got {fold}")
        if truth.shape != pred.shape or truth.ndim != 3 or truth.shape[0] != len(self.classes):
            raise ValueError(
                f"truth and pred must both be ({len(self.classes)}, H, W); "
                f"got {truth.shape} and {pred.shape}"
            )
        t, p = truth.astype(bool), pred.astype(bool)
        inter = np.count_nonzero(t & p, axis=(1, 2))
        t_area = np.count_nonzero(t, axis=(1, 2))
        p_area = np.count_nonzero(p, axis=(1, 2))
        denom = t_area + p_area
        dice = np.where(denom == 0, 1.0, 2.0 * inter / np.maximum(denom, 1))
        t_on, p_on = t_area > 0, p_area > 0
        row = np.stack(
            [
                np.ones(len(self.classes)),
                dice,
                inter,
                t_area,
                p_area,
                t_on & p_on,
                ~t_on & p_on,
                t_on & ~p_on,
                ~t_on & ~p_on,
            ],
            axis=1,
        )
        self._sums[self.stages.index(stage), fold] += row
        return dice

    def counts(self) -> pd.DataFrame:
        """Long table: ``stage, fold, class`` and the ``COUNT_COLUMNS`` sums."""
        s, f, c = np.meshgrid(
            np.arange(len(self.stages)),
            np.arange(self.n_folds),
            np.arange(len(self.classes)),
            indexing="ij",
        )
        frame = pd.DataFrame(self._sums.reshape(-1, len(COUNT_COLUMNS)), columns=COUNT_COLUMNS)
        frame.insert(0, "class", np.array(self.classes, dtype=object)[c.ravel()])
        frame.insert(0, "fold", f.ravel())
        frame.insert(0, "stage", np.array(self.stages, dtype=object)[s.ravel()])
        return frame


def _ratio(numerator: pd.Series, denominator: pd.Series, empty: float) -> np.ndarray:
    # ``empty`` is the value where nothing was counted: 1 for overlaps (both masks
    # empty is a perfect match), NaN for rates (undefined, never a made-up 0 or 1).
    num = numerator.to_numpy(dtype=np.float64)
    den = denominator.to_numpy(dtype=np.float64)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), empty)


def score_table(counts: pd.DataFrame, pooled: bool = False) -> pd.DataFrame:
    """Metrics from ``ScoreAccumulator.counts()`` sums, with an ``all`` row over classes.

    Per ``stage, fold, class`` (``pooled``: per ``stage, class``, folds summed):
    ``kaggle_dice`` (mean over images), pixel-level ``dice`` and ``iou`` (1 when truth
    and prediction are empty throughout), and the presence ``tp, fp, fn, tn`` with
    ``accuracy, sensitivity, specificity, precision, f1`` (NaN where undefined).
    """
    keys = ["stage"] if pooled else ["stage", "fold"]
    stage_order = {s: i for i, s in enumerate(dict.fromkeys(counts["stage"]))}
    class_order = {c: i for i, c in enumerate(dict.fromkeys(counts["class"]))}
    class_order[ALL_CLASSES] = len(class_order)
    columns = list(COUNT_COLUMNS)
    per_class = counts.groupby([*keys, "class"], sort=False)[columns].sum().reset_index()
    overall = counts.groupby(keys, sort=False)[columns].sum().reset_index()
    overall["class"] = ALL_CLASSES
    frame = pd.concat([per_class, overall], ignore_index=True)
    frame["_stage"] = frame["stage"].map(stage_order)
    frame["_class"] = frame["class"].map(class_order)
    order = ["_stage", "_class"] if pooled else ["_stage", "fold", "_class"]
    frame = frame.sort_values(order, kind="stable").drop(columns=["_stage", "_class"])
    frame = frame.reset_index(drop=True)
    inter, t, p = frame["intersection"], frame["truth_pixels"], frame["pred_pixels"]
    tp, fp, fn, tn = frame["tp"], frame["fp"], frame["fn"], frame["tn"]
    frame["kaggle_dice"] = _ratio(frame["dice_sum"], frame["n_images"], np.nan)
    frame["dice"] = _ratio(2 * inter, t + p, 1.0)
    frame["iou"] = _ratio(inter, t + p - inter, 1.0)
    frame["accuracy"] = _ratio(tp + tn, tp + fp + fn + tn, np.nan)
    frame["sensitivity"] = _ratio(tp, tp + fn, np.nan)
    frame["specificity"] = _ratio(tn, tn + fp, np.nan)
    frame["precision"] = _ratio(tp, tp + fp, np.nan)
    frame["f1"] = _ratio(2 * tp, 2 * tp + fp + fn, np.nan)
    for name in ("n_images", "intersection", "truth_pixels", "pred_pixels", "tp", "fp", "fn", "tn"):
        frame[name] = frame[name].astype(np.int64)
    return frame.drop(columns=["dice_sum"])


def summarise_folds(fold_scores: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation across folds of ``score_table`` per-fold metrics.

    One row per ``stage, class``; columns ``n_folds`` and ``<metric>_mean``,
    ``<metric>_std`` for each of ``METRIC_COLUMNS``. The std is the population one
    (ddof 0), as ``threshold_search`` reports it; NaN values (undefined rates) are skipped.
    """
    grouped = fold_scores.groupby(["stage", "class"], sort=False)
    out = grouped.size().rename("n_folds").reset_index()
    for name in METRIC_COLUMNS:
        values = grouped[name]
        out[f"{name}_mean"] = values.mean().to_numpy()
        out[f"{name}_std"] = values.std(ddof=0).to_numpy()
    return out


class WorstImages:
    """Keeps the ``k`` images of lowest score seen so far (ties: the earlier one stays)."""

    def __init__(self, k: int) -> None:
        if k < 0:
            raise ValueError(f"k must be >= 0; got {k}")
        self.k = k
        self._heap: list[tuple[float, int, str, Any]] = []
        self._counter = itertools.count()

    def add(self, score: float, image_id: str, payload: Any = None) -> None:
        """Offer one image; ``payload`` (e.g. its masks) is kept only if the image is kept."""
        if self.k == 0:
            return
        entry = (-score, -next(self._counter), image_id, payload)
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, entry)
        elif score < -self._heap[0][0]:
            heapq.heapreplace(self._heap, entry)

    def items(self) -> list[tuple[float, str, Any]]:
        """``(score, image_id, payload)``, lowest score first."""
        ordered = sorted(self._heap, key=lambda e: (-e[0], -e[1]))
        return [(-neg, image_id, payload) for neg, _, image_id, payload in ordered]


def presence_auc(truth: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """ROC AUC per class of (N, C) presence probs against (N, C) {0, 1} truth (NaN: one label)."""
    if truth.shape != probs.shape or truth.ndim != 2 or truth.shape[1] != len(classes):
        raise ValueError(
            f"truth and probs must both be (N, {len(classes)}); got {truth.shape}, {probs.shape}"
        )
    out = {}
    for c, name in enumerate(classes):
        labels = truth[:, c] > 0.5
        single = labels.all() or not labels.any()
        out[name] = float("nan") if single else float(roc_auc_score(labels, probs[:, c]))
    return out


# ---------------------------------------------------------------- energy

_GPU_COUNT = re.compile(r"^\s*(\d+)\s*x\s+\S")


def estimate_energy(
    seconds: float, device: str, energy_config: Mapping[str, float]
) -> dict[str, Any]:
    """Energy and CO2e estimate of one run of ``seconds`` wall time on ``device``.

    ``device`` is as the stages record it: ``"CPU"`` or ``"<n> x <GPU name>"`` (a name
    with "GPU" in it counts as one GPU). Power is ``cpu_watts`` on CPU and
    ``gpu_watts * n`` on n GPUs; ``kwh = seconds / 3600 * watts / 1000 * pue`` and
    ``g_co2e = kwh * grid_g_co2_per_kwh``. Returns ``seconds, device, hardware, n_gpus,
    watts, kwh, g_co2e``.
    """
    if not np.isfinite(seconds) or seconds < 0:
        raise ValueError(f"seconds must be a finite number >= 0; got {seconds}")
    for key in ("cpu_watts", "gpu_watts", "pue", "grid_g_co2_per_kwh"):
        if float(energy_config[key]) < 0:
            raise ValueError(f"energy.{key} must be >= 0; got {energy_config[key]}")
    name = device.strip()
    match = _GPU_COUNT.match(name)
    if name.upper().startswith("CPU"):
        n_gpus = 0
    elif match:
        n_gpus = int(match.group(1))
    elif "GPU" in name.upper():
        n_gpus = 1
    else:
        raise ValueError(
            f"device must be 'CPU' or '<n> x <GPU name>' as the stages record it; got {device!r}"
        )
    watts = float(energy_config["gpu_watts"]) * n_gpus if n_gpus else energy_config["cpu_watts"]
    kwh = seconds / 3600.0 * float(watts) / 1000.0 * float(energy_config["pue"])
    return {
        "seconds": float(seconds),
        "device": device,
        "hardware": "gpu" if n_gpus else "cpu",
        "n_gpus": n_gpus,
        "watts": float(watts),
        "kwh": kwh,
        "g_co2e": kwh * float(energy_config["grid_g_co2_per_kwh"]),
    }


def energy_table(
    runs: Sequence[Mapping[str, Any]], energy_config: Mapping[str, float]
) -> pd.DataFrame:
    """``estimate_energy`` of each ``{run, seconds, device}`` plus a ``total`` row.

    A run whose device cannot be read stays in the table with hardware ``unknown`` and
    NaN energy, and is left out of the total (a warning names it).
    """
    rows = []
    for run in runs:
        try:
            estimate = estimate_energy(run["seconds"], run["device"], energy_config)
        except ValueError as err:
            logger.warning("%s: %s; left out of the energy total", run["run"], err)
            estimate = {"seconds": float(run["seconds"]), "device": str(run["device"])}
            estimate |= {"hardware": "unknown", "watts": np.nan, "kwh": np.nan, "g_co2e": np.nan}
        rows.append({"run": run["run"], **estimate})
    columns = ["run", "seconds", "device", "hardware", "n_gpus", "watts", "kwh", "g_co2e"]
    frame = pd.DataFrame(rows, columns=columns)
    counted = frame[frame["kwh"].notna()]
    total = {"run": "total", "seconds": counted["seconds"].sum(), "device": "", "hardware": ""}
    total |= {"n_gpus": "", "watts": "", "kwh": counted["kwh"].sum()}
    total["g_co2e"] = counted["g_co2e"].sum()
    return pd.concat([frame.astype(object), pd.DataFrame([total])], ignore_index=True)


# ---------------------------------------------------------------- figures


def class_colors(n: int) -> np.ndarray:
    """(n, 3) uint8 RGB: one distinct colour per class (tab10, then tab20)."""
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
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
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, height), squeeze=False)
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
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.3 * rows), squeeze=False)
    cmap = plt.get_cmap("tab10")
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
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
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
    fig, axes = plt.subplots(
        len(stages),
        len(classes),
        figsize=(2.4 * len(classes), 2.3 * len(stages)),
        squeeze=False,
    )
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
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
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
    fig, ax = plt.subplots(figsize=(1.1 * len(counts) + 1.5, 1.0 * len(counts) + 1.0))
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
    fig, axes = plt.subplots(1, len(classes), figsize=(3.4 * len(classes), 2.6), squeeze=False)
    for c, (ax, name) in enumerate(zip(axes[0], classes, strict=True)):
        shown = ax.imshow(prob[:, :, c], vmin=0, vmax=1, cmap="viridis")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.colorbar(shown, ax=axes[0].tolist(), shrink=0.8)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 80) -> Path:
    """Write ``fig`` as PNG atomically and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- data-set statistics


def mask_areas(table: pd.DataFrame) -> pd.DataFrame:
    """``image_id, class_name, area``: pixels of every non-empty mask (sum of RLE run lengths)."""
    rles = table["rle"].fillna("").astype(str)
    present = table[rles.str.len() > 0]
    areas = [
        int(np.array(rle.split(), dtype=np.int64)[1::2].sum()) for rle in present["rle"].astype(str)
    ]
    return pd.DataFrame(
        {
            "image_id": present["image_id"].to_numpy(),
            "class_name": present["class_name"].to_numpy(),
            "area": np.array(areas, dtype=np.int64),
        }
    )


def truth_panels(
    table: pd.DataFrame, classes: Sequence[str], image_folder: str | Path, image_ids: Sequence[str]
) -> list[list[tuple[str, np.ndarray]]]:
    """Per image: ``[(image_id, image), ("truth", overlay)]``, masks at the image's own size.

    For ``figure_overlays``; ``table`` is the canonical mask table.
    """
    rles = rles_by_image(table[table["image_id"].isin(set(image_ids))], classes)
    panels = []
    for image_id in image_ids:
        image = read_image(resolve_image_path(image_folder, image_id))
        truth = decode_masks(rles[image_id], (image.shape[0], image.shape[1]))
        panels.append([(image_id, image), ("truth", overlay(image, truth))])
    return panels


def class_statistics(table: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Per class: ``images, present, frequency, empty_rate`` and mask area (pixels at the
    images' own size) ``area_mean, area_median, area_min, area_max`` over non-empty masks."""
    presence = presence_matrix(table, classes)
    areas = mask_areas(table).groupby("class_name")["area"]
    n = len(presence)
    stats = pd.DataFrame({"class": list(classes)})
    stats["images"] = n
    stats["present"] = [int(presence[c].sum()) for c in classes]
    stats["frequency"] = stats["present"] / max(n, 1)
    stats["empty_rate"] = 1.0 - stats["frequency"]
    for name, how in (("mean", "mean"), ("median", "median"), ("min", "min"), ("max", "max")):
        stats[f"area_{name}"] = stats["class"].map(areas.agg(how)).astype(float)
    return stats


def co_occurrence(table: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """(C, C) number of images in which both classes are present (diagonal: each alone counted)."""
    present = presence_matrix(table, classes)[list(classes)].to_numpy(dtype=np.int64)
    return pd.DataFrame(present.T @ present, index=list(classes), columns=list(classes))


# ---------------------------------------------------------------- documents


@dataclass
class Section:
    """One part of the report: paragraphs, then captioned tables, then captioned PNGs."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    images: list[tuple[str, Path]] = field(default_factory=list)


def format_value(value: Any, digits: int = 4) -> str:
    """A table cell: floats to ``digits`` decimals, NaN as ``n/a``, the rest as ``str``."""
    if isinstance(value, float | np.floating):
        if np.isnan(value):
            return "n/a"
        # Values too small for the fixed digits (a rounding difference, a short run's
        # energy) keep two significant digits instead of showing as 0.
        small = value != 0 and abs(float(value)) < 0.5 * 10.0**-digits
        return f"{value:.1e}" if small else f"{value:.{digits}f}"
    return str(value)


def mean_std(mean: float, std: float, digits: int = 4) -> str:
    """``"0.6512 ± 0.0123"``; ``n/a`` for NaN."""
    if np.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def stage_table(summary: pd.DataFrame, pooled: pd.DataFrame, metric: str) -> pd.DataFrame:
    """class x stage: ``mean ± std`` over folds of ``metric``, then its pooled value per stage.

    ``summary`` is ``summarise_folds`` output, ``pooled`` ``score_table(..., pooled=True)``.
    """
    stages = list(dict.fromkeys(summary["stage"]))
    out = pd.DataFrame({"class": list(dict.fromkeys(summary["class"]))})
    for stage in stages:
        rows = summary[summary["stage"] == stage].set_index("class").reindex(out["class"])
        means, stds = rows[f"{metric}_mean"], rows[f"{metric}_std"]
        out[f"{stage} (folds)"] = [mean_std(m, s) for m, s in zip(means, stds, strict=True)]
    for stage in stages:
        values = pooled[pooled["stage"] == stage].set_index("class")[metric]
        out[f"{stage} (pooled)"] = values.reindex(out["class"]).to_numpy()
    return out


def spread_table(summary: pd.DataFrame, stage: str) -> pd.DataFrame:
    """One stage's ``mean ± std`` over folds of every metric, one row per class."""
    rows = summary[summary["stage"] == stage]
    out = pd.DataFrame({"class": rows["class"].to_numpy(), "folds": rows["n_folds"].to_numpy()})
    for metric in METRIC_COLUMNS:
        means, stds = rows[f"{metric}_mean"], rows[f"{metric}_std"]
        out[metric] = [mean_std(m, s) for m, s in zip(means, stds, strict=True)]
    return out


def json_ready(value: Any) -> Any:
    """NaN and inf -> None, numpy scalars -> Python, recursively: strict JSON."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _cells(frame: pd.DataFrame) -> list[list[str]]:
    return [[format_value(v) for v in row] for row in frame.itertuples(index=False)]


def render_markdown(title: str, sections: Sequence[Section]) -> str:
    """The report as Markdown; images are referenced by file name (same folder)."""
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for paragraph in section.paragraphs:
            lines += [paragraph, ""]
        for caption, frame in section.tables:
            if caption:
                lines += [f"**{caption}**", ""]
            lines.append("| " + " | ".join(map(str, frame.columns)) + " |")
            lines.append("|" + "---|" * len(frame.columns))
            lines += ["| " + " | ".join(row) + " |" for row in _cells(frame)]
            lines.append("")
        for caption, path in section.images:
            lines += [f"![{caption}]({Path(path).name})", "", f"*{caption}*", ""]
    return "\n".join(lines)


def render_html(title: str, sections: Sequence[Section]) -> str:
    """The report as one self-contained HTML page, every PNG embedded as base64."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "th{background:#f2f2f2}img{max-width:100%}</style>",
        f"</head><body><h1>{esc(title)}</h1>",
    ]
    for section in sections:
        parts.append(f"<h2>{esc(section.title)}</h2>")
        parts += [f"<p>{esc(paragraph)}</p>" for paragraph in section.paragraphs]
        for caption, frame in section.tables:
            if caption:
                parts.append(f"<p><b>{esc(caption)}</b></p>")
            head = "".join(f"<th>{esc(str(c))}</th>" for c in frame.columns)
            body = "".join(
                "<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>"
                for row in _cells(frame)
            )
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        for caption, path in section.images:
            data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{esc(caption)}">'
                f"<figcaption>{esc(caption)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)
