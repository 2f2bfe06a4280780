"""The outcome of the post-processing grid search: ``ClassResult`` and ``TuneResult``.

Holds the chosen settings, the in-sample, nested and per-fold scores and the full score
tables, and lays them out as a summary, a long-form table and JSON (the ``extra`` of
``postprocess.json``). Built by ``threshold_choice.GridSums.result``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.postprocess import PostprocessParams


@dataclass(frozen=True)
class ClassResult:
    """One class's tuning outcome; scores are mean Kaggle Dice over its images."""

    name: str
    params: PostprocessParams  # the chosen setting (gates allowed)
    score: float
    no_gate_params: PostprocessParams  # the best threshold and area without a gate
    no_gate_score: float
    plain_score: float  # threshold 0.5, no min area, no gate
    fold_scores: tuple[float, ...]  # the chosen setting per fold; NaN for a fold with no image
    # Nested (honest) figures: for each fold, the setting chosen on the *other* folds and
    # its score on this one. ``nested_score`` pools them over all images like ``score``.
    nested_score: float = float("nan")
    nested_fold_scores: tuple[float, ...] = ()
    nested_params: tuple[PostprocessParams | None, ...] = ()  # None: fold has no image
    # Indices into the grid's binarisation axis (``GridSums``): of the chosen setting, and
    # of each fold's nested choice (an ensemble's blends are blocks of that axis).
    setting: int = -1
    nested_settings: tuple[int | None, ...] = ()

    @property
    def stable(self) -> bool:
        """Whether every fold's nested choice is the setting chosen on all folds."""
        return all(p is None or p == self.params for p in self.nested_params)


@dataclass(frozen=True, eq=False)
class TuneResult:
    """Outcome of a grid search: the chosen settings, scores and the full score tables.

    The B binarisation settings are (``thresholds[b]``, ``min_components[b]``) pairs.
    ``no_gate_table`` is (C, B, A) mean Dice; ``gate_tables[kind]`` is (C, B, A, G + 1)
    with ``[..., 0]`` the no-gate column and ``[..., 1 + j]`` gate threshold j.
    Overall scores are means over classes (= over image-class pairs: every image has
    every class). Fold mean and std (ddof 0) are over folds that have images.
    """

    classes: list[str]
    thresholds: tuple[float, ...]
    min_components: tuple[int, ...]
    min_areas: tuple[int, ...]
    gate_thresholds: tuple[float, ...]
    gates: tuple[str, ...]
    topk_fraction: float
    fold_counts: tuple[int, ...]
    per_class: dict[str, ClassResult]
    no_gate_table: np.ndarray = field(repr=False)
    gate_tables: dict[str, np.ndarray] = field(repr=False)

    def params_by_class(self) -> dict[str, PostprocessParams]:
        """The chosen setting of every class, in class order."""
        return {name: self.per_class[name].params for name in self.classes}

    def _mean(self, attribute: str) -> float:
        return float(np.mean([getattr(self.per_class[c], attribute) for c in self.classes]))

    @property
    def score(self) -> float:
        """Overall tuned score (gates allowed)."""
        return self._mean("score")

    @property
    def nested_score(self) -> float:
        """Overall nested score: each fold scored with settings tuned on the other folds."""
        return self._mean("nested_score")

    @property
    def nested_fold_scores(self) -> tuple[float, ...]:
        """Overall nested score per fold (NaN for a fold with no image)."""
        per_class = np.array([self.per_class[c].nested_fold_scores for c in self.classes])
        return tuple(float(s) for s in per_class.mean(axis=0))

    def stability(self) -> dict[str, dict[str, Any]]:
        """Per class: whether the folds' nested choices agree with the final one, and
        each fold's choice (threshold, min area, gate)."""
        out: dict[str, dict[str, Any]] = {}
        for name in self.classes:
            r = self.per_class[name]
            chosen = [p.to_dict() if p is not None else None for p in r.nested_params]
            same = sum(1 for p in r.nested_params if p is not None and p == r.params)
            out[name] = {
                "stable": r.stable,
                "folds_agreeing": same,
                "folds": sum(1 for p in r.nested_params if p is not None),
                "per_fold": chosen,
            }
        return out

    @property
    def no_gate_score(self) -> float:
        """Overall score of tuned thresholds and areas without gates."""
        return self._mean("no_gate_score")

    @property
    def plain_score(self) -> float:
        """Overall score at threshold 0.5, no min area, no gate."""
        return self._mean("plain_score")

    @property
    def fold_scores(self) -> tuple[float, ...]:
        """Overall score of the chosen settings per fold (NaN for a fold with no image)."""
        per_class = np.array([self.per_class[c].fold_scores for c in self.classes])
        return tuple(float(s) for s in per_class.mean(axis=0))

    @property
    def fold_mean(self) -> float:
        """Mean over folds with images of ``fold_scores``."""
        return float(np.nanmean(self.fold_scores))

    @property
    def fold_std(self) -> float:
        """Standard deviation (ddof 0) over folds with images of ``fold_scores``."""
        return float(np.nanstd(self.fold_scores))

    def summary(self) -> pd.DataFrame:
        """One row per class plus ``overall``: scores, fold spread and the chosen setting."""
        rows = []
        for name in self.classes:
            result = self.per_class[name]
            folds = np.array(result.fold_scores)
            rows.append(
                {
                    "class": name,
                    "plain": result.plain_score,
                    "no_gate": result.no_gate_score,
                    "tuned": result.score,
                    "tuned_nested": result.nested_score,
                    "fold_mean": float(np.nanmean(folds)),
                    "fold_std": float(np.nanstd(folds)),
                    **result.params.to_dict(),
                }
            )
        rows.append(
            {
                "class": "overall",
                "plain": self.plain_score,
                "no_gate": self.no_gate_score,
                "tuned": self.score,
                "tuned_nested": self.nested_score,
                "fold_mean": self.fold_mean,
                "fold_std": self.fold_std,
            }
        )
        return pd.DataFrame(rows)

    def table_frame(self) -> pd.DataFrame:
        """Every grid point's mean Dice, long form: class, gate, gate_threshold,
        threshold, min_component, min_area, score (gate ``none`` rows have
        gate_threshold NaN)."""
        t_idx, a_idx = np.meshgrid(
            np.arange(len(self.thresholds)), np.arange(len(self.min_areas)), indexing="ij"
        )
        thresholds, areas = np.array(self.thresholds), np.array(self.min_areas)
        components = np.array(self.min_components)
        frames = []
        for c, name in enumerate(self.classes):
            frames.append(
                pd.DataFrame(
                    {
                        "class": name,
                        "gate": "none",
                        "gate_threshold": np.nan,
                        "threshold": thresholds[t_idx.ravel()],
                        "min_component": components[t_idx.ravel()],
                        "min_area": areas[a_idx.ravel()],
                        "score": self.no_gate_table[c].ravel(),
                    }
                )
            )
            for kind, table in self.gate_tables.items():
                for j, g in enumerate(self.gate_thresholds):
                    frames.append(
                        pd.DataFrame(
                            {
                                "class": name,
                                "gate": kind,
                                "gate_threshold": g,
                                "threshold": thresholds[t_idx.ravel()],
                                "min_component": components[t_idx.ravel()],
                                "min_area": areas[a_idx.ravel()],
                                "score": table[c, :, :, 1 + j].ravel(),
                            }
                        )
                    )
        return pd.concat(frames, ignore_index=True)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready scores and grids (for ``postprocess.json``'s ``extra``)."""
        return {
            "scores": {
                "plain": self.plain_score,
                "no_gate": self.no_gate_score,
                # In-sample: chosen and scored on the same OOF images (optimistic).
                "tuned": self.score,
                # Honest: each fold scored with the setting chosen on the other folds.
                "tuned_nested": self.nested_score,
                "nested_fold_scores": list(self.nested_fold_scores),
                "fold_scores": list(self.fold_scores),
                "fold_mean": self.fold_mean,
                "fold_std": self.fold_std,
            },
            "per_class": {
                name: {
                    "plain": r.plain_score,
                    "no_gate": r.no_gate_score,
                    "no_gate_params": r.no_gate_params.to_dict(),
                    "tuned": r.score,
                    "tuned_nested": r.nested_score,
                    "fold_scores": list(r.fold_scores),
                    "nested_fold_scores": list(r.nested_fold_scores),
                }
                for name, r in self.per_class.items()
            },
            "stability": self.stability(),
            "grid": {
                "thresholds": list(dict.fromkeys(self.thresholds)),
                "min_components": list(dict.fromkeys(self.min_components)),
                "min_areas": list(self.min_areas),
                "gate_thresholds": list(self.gate_thresholds),
                "gates": list(self.gates),
                "topk_fraction": self.topk_fraction,
            },
            "fold_counts": list(self.fold_counts),
        }
