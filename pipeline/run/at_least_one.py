"""The "at least one class per image" rule scored on the OOF stores (tune's second pass).

``score_at_least_one`` streams every fold's store once more and measures, in-sample and
nested, what the rule (``core.postprocess.keep_at_least_one``) changes; ``rule_scores``
reads the figures that predict reports and evaluate recomputes when it applies.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.core.config import Config
from pipeline.core.images import cache_path, read_original_sizes
from pipeline.core.metrics import dice
from pipeline.core.postprocess import keep_at_least_one, postprocess_image
from pipeline.core.probstore import ProbReader
from pipeline.core.streams import map_ahead, read_ahead
from pipeline.core.truth import decode_truth
from pipeline.core.tune_result import TuneResult
from pipeline.run.experiment import Experiment
from pipeline.run.oof import MAX_WORKERS, READ_AHEAD_IMAGES, iter_oof


def every_image_has_a_class(exp: Experiment) -> bool:
    """Whether every training image has at least one non-empty class mask."""
    return all(any(text for text in per_class) for per_class in exp.rles().values())


def score_at_least_one(
    config: Config,
    exp: Experiment,
    readers: Sequence[ProbReader],
    result: TuneResult,
    classifier_probs: Mapping[str, np.ndarray] | None,
    search: bool,
    items: Iterable[tuple[str, int, np.ndarray, tuple[int, int]]] | None = None,
    probs_at: Callable[[np.ndarray, int], np.ndarray] | None = None,
) -> dict[str, Any]:
    """The at-least-one rule's effect on the tuned OOF scores: one more streaming pass.

    Every image of fold j is post-processed with the chosen settings (in-sample) and
    with its own fold's nested settings (chosen without fold j) or, when ``search``,
    with every fold k's; where all of its masks are empty, the class the rule keeps is
    scored instead of its empty mask. ``gain[j][k]`` sums that change over fold j's
    images under fold k's settings. Always on, the nested score adds ``gain[k][k]``.
    Searched, fold k applies the rule iff it gains on the *other* folds under fold k's
    own settings (``sum_j!=k gain[j][k] > 0``): a decision made without fold k, so
    the nested figure stays honest; the final decision is the in-sample gain's sign.
    Scores overall and per class: the mean over image-class pairs, as ``result``'s.

    ``items`` replaces the stream of the ``readers``' stores (``oof.iter_oof``); then
    ``probs_at(q, row)`` gives the (C, H, W) levels that fold ``row``'s settings (row
    ``n_folds``: the chosen ones) post-process: an ensemble's items hold every member's
    levels and each row blends them with its own weights.
    """
    classes = exp.classes
    n_folds = len(readers)
    chosen = [result.per_class[name].params for name in classes]
    nested = [[result.per_class[name].nested_params[k] for name in classes] for k in range(n_folds)]
    original_sizes = read_original_sizes(cache_path(exp.cache_dir, "train", config.data.image_size))
    rles = exp.rles()

    def gains(item: tuple[str, int, np.ndarray, tuple[int, int]]) -> tuple[int, np.ndarray]:
        """(fold, (n_folds + 1, C + 1)): per class the Dice gained, then 1 if the image
        changed, under each fold's settings (rows), then the chosen ones (last row)."""
        image_id, fold, levels, original = item
        truth = decode_truth(rles[image_id], original, levels.shape[-2:])
        presence = None if classifier_probs is None else classifier_probs.get(image_id)
        out = np.zeros((n_folds + 1, len(classes) + 1))
        rows = [*range(n_folds)] if search else [fold]
        for row in [*rows, n_folds]:
            settings = chosen if row == n_folds else nested[row]
            params = [p for p in settings if p is not None]
            if len(params) < len(classes):  # a fold without images has no nested setting
                continue
            q = levels if probs_at is None else probs_at(levels, row)
            masks = postprocess_image(q, params, presence)
            ruled = keep_at_least_one(masks, q, params)
            if ruled is masks or not ruled.any():
                continue  # an image with a mask is left alone
            c = int(np.argmax(ruled.any(axis=(1, 2))))
            # The kept class's Dice replaces its empty mask's (1 iff its truth is empty).
            out[row, c] = dice(truth[c], ruled[c]) - float(not truth[c].any())
            out[row, -1] = 1
        return fold, out

    if items is None:
        items = iter_oof(config, readers, original_sizes)
    stream = read_ahead(items, READ_AHEAD_IMAGES)
    workers = max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    # sums[j, k]: fold j's images under fold k's nested settings (k = n_folds: chosen).
    sums = np.zeros((n_folds, n_folds + 1, len(classes) + 1))
    n_images = 0
    for fold, values in map_ahead(gains, stream, workers, READ_AHEAD_IMAGES):
        sums[fold] += values
        n_images += 1
    own = np.stack([sums[k, k, :-1] for k in range(n_folds)])  # (folds, C)
    elsewhere = np.array([sums[:, k, :-1].sum() - sums[k, k, :-1].sum() for k in range(n_folds)])
    decisions = elsewhere > 0 if search else np.ones(n_folds, bool)
    in_sample = sums[:, n_folds, :-1].sum(axis=0)  # (C,)
    applied = bool(in_sample.sum() > 0) if search else True
    images = max(n_images, 1)
    held_out = own[decisions].sum(axis=0)  # (C,)
    per_class = {
        name: {
            "tuned": result.per_class[name].score + (in_sample[c] / images if applied else 0.0),
            "tuned_nested": result.per_class[name].nested_score + held_out[c] / images,
        }
        for c, name in enumerate(classes)
    }
    pairs = images * len(classes)
    report: dict[str, Any] = {
        "applied": applied,
        "in_sample": {
            "without": result.score,
            "with": result.score + float(in_sample.sum()) / pairs,
        },
        "nested": {
            "without": result.nested_score,
            "with": result.nested_score + float(own.sum()) / pairs,
        },
        "images_changed": {
            "in_sample": int(sums[:, n_folds, -1].sum()),
            "nested": int(sum(sums[k, k, -1] for k in range(n_folds))),
        },
        "n_images": n_images,
        "per_class": per_class,
    }
    if search:
        report["nested"]["searched"] = result.nested_score + float(held_out.sum()) / pairs
        report["fold_decisions"] = [bool(d) for d in decisions]
    return report


def rule_scores(at_least_one: Mapping[str, Any]) -> dict[str, float]:
    """The tuned OOF scores (in-sample, nested) with the at-least-one rule as applied."""
    nested = at_least_one["nested"]
    return {
        "tuned": at_least_one["in_sample"]["with" if at_least_one["applied"] else "without"],
        "tuned_nested": nested.get("searched", nested["with"]),
    }
