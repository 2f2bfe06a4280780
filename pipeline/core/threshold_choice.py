"""Choosing the post-processing setting from the grid search's summed Dice tables.

``GridSums`` holds, per class and fold, the Dice sums of every grid point (as
``threshold_search.GridAccumulator`` gathered them) and turns them into a
``TuneResult``: the best setting per class, its in-sample and per-fold scores, and the
nested (honest) scores, where each fold is scored at the setting chosen on the others.

Ties (scores within ``TIE_TOLERANCE``) go to the simpler setting, in this order: no
gate, then the smaller min area, then the smaller min component size, then the
threshold closest to 0.5 (then the lower one), then the gate kind in ``GATE_KINDS``
order, then the lower gate threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.core.postprocess import TOPK_GATES, PostprocessParams
from pipeline.core.tune_result import ClassResult, TuneResult

GATE_KINDS: tuple[str, ...] = ("classifier", "segmentation", "fused")
PLAIN_THRESHOLD = 0.5
TIE_TOLERANCE = 1e-12


@dataclass(frozen=True, eq=False)
class GridSums:
    """Dice sums of every grid point per class and fold, and the grid they were taken on.

    The B binarisation settings are (``thresholds[b]``, ``min_components[b]``) pairs.
    ``base`` is (C, n_folds, B, A) without a gate, ``gated`` (kinds, C, n_folds, B, A, G)
    with gate kind ``kinds[i]`` at each gate threshold, ``plain`` (C, n_folds) at
    threshold 0.5 with no min area and no gate; ``counts`` (n_folds,) images per fold,
    at least one image in all. ``kinds`` are the searched gates of ``GATE_KINDS``, in
    that order; ``gates`` every searched gate, ``none`` included when allowed.
    """

    classes: list[str]
    thresholds: np.ndarray
    min_components: np.ndarray
    min_areas: np.ndarray
    gate_thresholds: np.ndarray
    gates: tuple[str, ...]
    kinds: list[str]
    topk_fraction: float
    base: np.ndarray
    gated: np.ndarray
    plain: np.ndarray
    counts: np.ndarray

    @staticmethod
    def concat(parts: Sequence[GridSums]) -> GridSums:
        """One grid whose binarisation axis is every part's, part after part.

        The parts (e.g. one per blend of an ensemble's members) must share classes,
        folds, areas, gates and gate thresholds; the choice then runs over all of them.
        """
        first = parts[0]
        for part in parts[1:]:
            same = (
                part.classes == first.classes
                and part.gates == first.gates
                and part.kinds == first.kinds
                and part.topk_fraction == first.topk_fraction
                and np.array_equal(part.min_areas, first.min_areas)
                and np.array_equal(part.gate_thresholds, first.gate_thresholds)
                and np.array_equal(part.counts, first.counts)
            )
            if not same:
                raise ValueError("grid sums to concatenate must share classes, folds and grids")
        return GridSums(
            classes=list(first.classes),
            thresholds=np.concatenate([p.thresholds for p in parts]),
            min_components=np.concatenate([p.min_components for p in parts]),
            min_areas=first.min_areas,
            gate_thresholds=first.gate_thresholds,
            gates=first.gates,
            kinds=list(first.kinds),
            topk_fraction=first.topk_fraction,
            base=np.concatenate([p.base for p in parts], axis=2),
            gated=np.concatenate([p.gated for p in parts], axis=3),
            plain=first.plain,
            counts=first.counts,
        )

    @property
    def n_folds(self) -> int:
        """The number of folds (with or without images)."""
        return len(self.counts)

    def result(self) -> TuneResult:
        """Choose each class's setting (ties as in the module docstring) and report scores."""
        n_images = int(self.counts.sum())
        base_mean = self.base.sum(axis=1) / n_images
        gated_mean = self.gated.sum(axis=2) / n_images
        plain_mean = self.plain.sum(axis=1) / n_images

        per_class: dict[str, ClassResult] = {}
        for c, name in enumerate(self.classes):
            no_gate = self._best(base_mean[c], gated_mean[:, c], True, False)
            best = self._best(
                base_mean[c], gated_mean[:, c], "none" in self.gates, bool(self.kinds)
            )
            fold_sums = self._sums_of(c, best)
            with np.errstate(invalid="ignore"):
                fold_scores = fold_sums / self.counts
            nested_sums, nested_choices = self._nested(c)
            with np.errstate(invalid="ignore"):
                nested_fold_scores = nested_sums / self.counts
            per_class[name] = ClassResult(
                name=name,
                params=self._params(best),
                score=float(fold_sums.sum() / n_images),
                no_gate_params=self._params(no_gate),
                no_gate_score=float(self._sums_of(c, no_gate).sum() / n_images),
                plain_score=float(plain_mean[c]),
                fold_scores=tuple(float(s) for s in fold_scores),
                nested_score=float(np.nansum(nested_sums) / n_images),
                nested_fold_scores=tuple(float(s) for s in nested_fold_scores),
                nested_params=tuple(
                    None if choice is None else self._params(choice) for choice in nested_choices
                ),
                setting=best[1],
                nested_settings=tuple(
                    None if choice is None else choice[1] for choice in nested_choices
                ),
            )
        gate_tables = {
            kind: np.concatenate([base_mean[..., None], gated_mean[i]], axis=-1)
            for i, kind in enumerate(self.kinds)
        }
        return TuneResult(
            classes=list(self.classes),
            thresholds=tuple(float(t) for t in self.thresholds),
            min_components=tuple(int(m) for m in self.min_components),
            min_areas=tuple(int(a) for a in self.min_areas),
            gate_thresholds=tuple(float(g) for g in self.gate_thresholds),
            gates=self.gates,
            topk_fraction=self.topk_fraction,
            fold_counts=tuple(int(count) for count in self.counts),
            per_class=per_class,
            no_gate_table=base_mean,
            gate_tables=gate_tables,
        )

    def _nested(self, c: int) -> tuple[np.ndarray, list[tuple[str | None, int, int, int] | None]]:
        """Class ``c``'s nested Dice sums per fold and each fold's choice.

        Fold f is scored at the setting that the same rule (``_best``) chooses on the
        sums of every other fold; a fold with no image scores 0 and has no choice. With
        a single fold holding images there is nothing else to tune on, so that fold
        falls back to its own (in-sample) choice, which only happens on degenerate splits.
        """
        allow_none, allow_gates = "none" in self.gates, bool(self.kinds)
        total_base = self.base[c].sum(axis=0)
        total_gated = self.gated[:, c].sum(axis=1)
        sums = np.zeros(self.n_folds)
        choices: list[tuple[str | None, int, int, int] | None] = []
        for fold in range(self.n_folds):
            count = int(self.counts[fold])
            if count == 0:
                choices.append(None)
                continue
            others = int(self.counts.sum()) - count
            if others == 0:
                base, gated, n = total_base, total_gated, count
            else:
                base = total_base - self.base[c, fold]
                gated = total_gated - self.gated[:, c, fold]
                n = others
            choice = self._best(base / n, gated / n, allow_none, allow_gates)
            sums[fold] = self._sums_of(c, choice)[fold]
            choices.append(choice)
        return sums, choices

    def _sums_of(self, c: int, choice: tuple[str | None, int, int, int]) -> np.ndarray:
        """(n_folds,) Dice sums of class ``c`` at one grid point."""
        kind, t, a, g = choice
        if kind is None:
            return self.base[c, :, t, a]
        return self.gated[self.kinds.index(kind), c, :, t, a, g]

    def _best(
        self, base: np.ndarray, gated: np.ndarray, allow_none: bool, allow_gates: bool
    ) -> tuple[str | None, int, int, int]:
        """(gate kind or None, b index, a index, g index) of the best candidate.

        ``base`` is (B, A) and ``gated`` (kinds, B, A, G) mean Dice of one class.
        """
        # Gate options: none, then every (kind, gate threshold), kind-major.
        options = [(None, 0)] + [
            (kind, j) for kind in self.kinds for j in range(len(self.gate_thresholds))
        ]
        scores = np.concatenate([base[None], np.moveaxis(gated, -1, 1).reshape(-1, *base.shape)])
        allowed = np.array([allow_none] + [allow_gates] * (len(options) - 1))
        scores = np.where(allowed[:, None, None], scores, -np.inf)
        tied = np.flatnonzero(scores.ravel() >= scores.max() - TIE_TOLERANCE)
        o, t, a = np.unravel_index(tied, scores.shape)
        is_gated = o > 0
        kind_rank = np.array([-1] + [GATE_KINDS.index(k) for k, _ in options[1:]])[o]
        gate_value = np.array([-1.0] + [self.gate_thresholds[j] for _, j in options[1:]])[o]
        thresholds = self.thresholds[t]
        # lexsort's last key is the primary one: simplest setting first.
        first = np.lexsort(
            (
                gate_value,
                kind_rank,
                thresholds,
                np.abs(thresholds - PLAIN_THRESHOLD),
                self.min_components[t],
                self.min_areas[a],
                is_gated,
            )
        )[0]
        kind, j = options[o[first]]
        return kind, int(t[first]), int(a[first]), j

    def _params(self, choice: tuple[str | None, int, int, int]) -> PostprocessParams:
        kind, t, a, g = choice
        return PostprocessParams(
            threshold=float(self.thresholds[t]),
            min_area=int(self.min_areas[a]),
            min_component=int(self.min_components[t]),
            gate=kind or "none",
            gate_threshold=None if kind is None else float(self.gate_thresholds[g]),
            topk_fraction=self.topk_fraction if kind in TOPK_GATES else None,
        )
