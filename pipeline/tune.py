"""``python -m pipeline.tune``: choose each class's post-processing on out-of-fold probs.

Reads the out-of-fold prob stores of every segmentation fold (``runs/<exp>/fold_<k>/oof``)
and, when the classifier was trained, its out-of-fold presence probabilities
(``runs/<exp>/classifier/fold_<k>/oof_cls.csv``: ``image_id`` then one column per
class). One sequential pass streams every image through
``threshold_search.GridAccumulator`` against its truth at the stores' size (the
submission size, or the image's own size), so memory does not grow with the number of
images. Per class it picks the pixel threshold, minimum mask area and gate (classifier,
segmentation-derived or none) that maximise the Kaggle Dice, and writes:

- ``postprocess.json``: the chosen settings, with the scores and grids under ``extra``;
- ``postprocess_table.csv``: per class (and overall) the chosen settings and scores;
- ``postprocess_grid.csv``: the mean Dice of every grid point.

Orchestration layer, yet TensorFlow-free: it only reads files the training stages wrote.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.core.atomic import write_csv
from pipeline.core.commands import command_line
from pipeline.core.config import Config
from pipeline.core.exclusive import exclusive_levels, is_exclusive
from pipeline.core.folds import classifier_skip_reason
from pipeline.core.images import cache_path, read_original_sizes
from pipeline.core.layout import CLASSIFIER_STAGE
from pipeline.core.layout import POSTPROCESS as POSTPROCESS_FILE
from pipeline.core.layout import POSTPROCESS_GRID as GRID_FILE
from pipeline.core.layout import POSTPROCESS_TABLE as TABLE_FILE
from pipeline.core.level_counts import class_histograms
from pipeline.core.postprocess import (
    CLASSIFIER_GATES,
    TOPK_GATES,
    resolve_at_least_one,
    save_postprocess,
    searchable_gates,
)
from pipeline.core.probstore import ProbReader
from pipeline.core.streams import map_ahead, read_ahead
from pipeline.core.threshold_search import GridAccumulator
from pipeline.core.truth import decode_truth
from pipeline.core.tune_result import TuneResult
from pipeline.run.at_least_one import every_image_has_a_class, rule_scores, score_at_least_one
from pipeline.run.command import Command, add_force_argument, config_from_args
from pipeline.run.experiment import Experiment, open_experiment
from pipeline.run.fold_records import check_folds_finished, check_trained_config
from pipeline.run.oof import (
    MAX_WORKERS,
    READ_AHEAD_IMAGES,
    iter_oof,
    open_segmentation_oof,
    presence_source,
    read_classifier_probs,
)
from pipeline.run.run_lock import hold_lock
from pipeline.run.tracking import record_tune, tracked
from pipeline.run.tune_output import TuneOutput, format_summary

log = logging.getLogger(__name__)


# (image_id, fold, (C, 2, 256) level counts, pixels per class map)
# (image id, fold, level counts, pixels, component counts or None)
_Scored = tuple[str, int, np.ndarray, int, np.ndarray | None]

SCORE_BATCH = 64  # images summed into the grid at a time


def search_postprocess(
    config: Config,
    exp: Experiment,
    readers: Sequence[ProbReader],
    classifier_probs: Mapping[str, np.ndarray] | None,
) -> TuneResult:
    """The one streaming pass: score every grid point of ``config.postprocess``.

    The classifier gate is searched iff ``classifier_probs`` is given and
    ``postprocess.gates`` lists it.
    """
    grid = config.postprocess
    gates = searchable_gates(
        grid.gates,
        classifier_probs is not None,
        "classifier out-of-fold probs",
        f"train the classifier ({command_line('train-classifier', '--all', config=config.source)})",
    )
    exclusive = is_exclusive(config.model.activation)
    thresholds = list(grid.thresholds)
    if exclusive:
        # Argmax masks are 0 or 255: every threshold keeps the same pixels, and the
        # top-k mean of a mask is no confidence. Minimum area, components and the
        # classifier gate are what a softmax model's masks are tuned by.
        thresholds = [0.5]
        gates = [gate for gate in gates if gate not in TOPK_GATES]
        log.info(
            "model.activation softmax: argmax masks; searching minimum area, components "
            "and the classifier gate per class (no thresholds, no top-k gates)"
        )
    accumulator = GridAccumulator(
        exp.classes,
        thresholds,
        grid.min_areas,
        grid.gate_thresholds,
        len(readers),
        grid.topk_fraction,
        gates=gates,
        min_components=grid.min_components,
    )
    lookup = classifier_probs if CLASSIFIER_GATES & set(gates) else None
    original_sizes = read_original_sizes(cache_path(exp.cache_dir, "train", config.data.image_size))
    rles = exp.rles()

    def histograms(item: tuple[str, int, np.ndarray, tuple[int, int]]) -> _Scored:
        image_id, fold, q, original = item
        truth = decode_truth(rles[image_id], original, q.shape[1:])
        if exclusive:  # the argmax masks; void pixels out of truth and prediction
            void = exp.void.get(image_id)
            void_mask = decode_truth([void], original, q.shape[1:])[0] if void else None
            q = exclusive_levels(q, void_mask)
            if void_mask is not None:
                truth = truth * (void_mask == 0)
        components = accumulator.component_counts(q, truth)
        return image_id, fold, class_histograms(q, truth), q.shape[1] * q.shape[2], components

    # Reading runs in one thread ahead; truth decoding and the per-pixel histograms in
    # a pool (numpy and OpenCV release the GIL); the grid sums here, a batch at a time.
    stream = read_ahead(iter_oof(config, readers, original_sizes), READ_AHEAD_IMAGES)
    workers = max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    batch: list[_Scored] = []
    for scored in map_ahead(histograms, stream, workers, READ_AHEAD_IMAGES):
        batch.append(scored)
        if len(batch) == SCORE_BATCH:
            _add_batch(accumulator, batch, lookup)
            batch = []
    _add_batch(accumulator, batch, lookup)
    return accumulator.result()


def _add_batch(
    accumulator: GridAccumulator,
    batch: Sequence[_Scored],
    classifier_probs: Mapping[str, np.ndarray] | None,
) -> None:
    if not batch:
        return
    ids = [image_id for image_id, *_ in batch]
    components = [item[4] for item in batch if item[4] is not None]
    accumulator.add_histograms(
        ids,
        [item[1] for item in batch],
        np.stack([item[2] for item in batch]),
        [item[3] for item in batch],
        None if classifier_probs is None else np.stack([classifier_probs[i] for i in ids]),
        np.stack(components) if components else None,
    )


def exclusive_oof(
    config: Config, exp: Experiment, readers: Sequence[ProbReader]
) -> Iterator[tuple[str, int, np.ndarray, tuple[int, int]]]:
    """``oof.iter_oof`` of a softmax run with each image's argmax masks
    (``exclusive_levels``, void pixels emptied) in place of its class maps."""
    original_sizes = read_original_sizes(cache_path(exp.cache_dir, "train", config.data.image_size))
    for image_id, fold, q, original in iter_oof(config, readers, original_sizes):
        void = exp.void.get(image_id)
        void_mask = decode_truth([void], original, q.shape[1:])[0] if void else None
        yield image_id, fold, exclusive_levels(q, void_mask), original


def compare_gates(result: TuneResult) -> dict[str, dict[str, float]]:
    """Per class, the best score reachable with each gate kind (``none`` = no gate)."""
    out: dict[str, dict[str, float]] = {}
    for c, name in enumerate(result.classes):
        best = {"none": float(result.no_gate_table[c].max())}
        for kind, table in result.gate_tables.items():
            best[kind] = float(table[c, :, :, 1:].max())
        out[name] = best
    return out


def tune(config: Config, force: bool = False) -> TuneOutput:
    """Tune post-processing on every fold's out-of-fold probs and write the results.

    Writes ``postprocess.json``, ``postprocess_table.csv`` and ``postprocess_grid.csv``
    into the run directory, each atomically. ``force``: go on although this config
    differs from the folds' training config in a key that matters.
    """
    check_folds_finished(config)
    check_trained_config(config, force)
    with hold_lock(config.run_dir, f"run {config.run_dir} (tune)"):
        output = _tune(config)
    with tracked(config) as tracker:
        record_tune(tracker, config)
    return output


def _tune(config: Config) -> TuneOutput:
    exp = open_experiment(config)
    readers = open_segmentation_oof(config, exp)
    classifier_probs = None
    source = presence_source(config, exp)
    if CLASSIFIER_GATES & set(config.postprocess.gates):
        reason = classifier_skip_reason(exp.table, exp.classes)
        if reason is None and source is not None:
            classifier_probs = read_classifier_probs(config, exp, source)
        if reason is not None:
            log.info("the classifier gate is left out: %s", reason)
        elif classifier_probs is not None:
            log.info(
                "the classifier gates' presence: %s",
                "the separate classifier" if source == "classifier" else "the presence head",
            )
        else:
            log.warning(
                "no classifier out-of-fold probs under %s: tuning without the classifier "
                "gate (train it with %s, or train the folds with "
                "model.classification_head=true)",
                config.run_dir / CLASSIFIER_STAGE,
                command_line("train-classifier", "--all", config=config.source),
            )
    n_images = sum(len(reader) for reader in readers)
    log.info("tuning post-processing on %d out-of-fold images", n_images)
    started = time.perf_counter()
    result = search_postprocess(config, exp, readers, classifier_probs)
    search_seconds = time.perf_counter() - started
    log.info(
        "scored %d images in %.1f s (%.1f ms per image)",
        n_images,
        search_seconds,
        1e3 * search_seconds / max(n_images, 1),
    )

    comparison = compare_gates(result)
    has_class = every_image_has_a_class(exp)
    choice = config.postprocess.at_least_one
    at_least_one: dict[str, Any] = {
        "choice": choice,
        "every_training_image_has_a_class": has_class,
        "applied": resolve_at_least_one(choice, has_class),
    }
    if at_least_one["applied"] or choice == "search":
        at_least_one.update(
            score_at_least_one(
                config,
                exp,
                readers,
                result,
                classifier_probs,
                search=choice == "search",
                items=exclusive_oof(config, exp, readers)
                if is_exclusive(config.model.activation)
                else None,
            )
        )
    size = config.data.submission_size
    extra: dict[str, Any] = {
        **result.to_dict(),
        "at_least_one": at_least_one,
        "n_images": n_images,
        "size": list(size) if size is not None else "each image's own size",
        "classifier_used": classifier_probs is not None,
        "gate_source": source if classifier_probs is not None else None,
        "gates_won": {name: result.per_class[name].params.gate for name in result.classes},
        "gate_comparison": comparison,
        "oof_stores": [str(reader.directory) for reader in readers],
    }
    if "per_class" in at_least_one:
        # What predict will do: the OOF figures it reports, and evaluate recomputes, are
        # those of the rule as applied (nested: as each fold decided without itself).
        extra["scores"] = {**extra["scores"], **rule_scores(at_least_one)}
        for name, figures in at_least_one["per_class"].items():
            extra["per_class"][name] = {**extra["per_class"][name], **figures}
    run_dir = config.run_dir
    postprocess_path = run_dir / POSTPROCESS_FILE
    save_postprocess(postprocess_path, result.params_by_class(), extra=extra)
    table = result.summary().astype({"min_area": "Int64", "min_component": "Int64"})
    for kind in ("none", *result.gate_tables):
        table[f"best_{kind}"] = [comparison[name][kind] for name in result.classes] + [np.nan]
    table_path = write_csv(run_dir / TABLE_FILE, table)
    grid_path = write_csv(run_dir / GRID_FILE, result.table_frame())
    log.info("wrote %s, %s and %s", postprocess_path, table_path.name, grid_path.name)
    return TuneOutput(
        result,
        n_images,
        classifier_probs is not None,
        postprocess_path,
        table_path,
        grid_path,
        search_seconds,
        at_least_one,
    )


def _run(args: argparse.Namespace) -> int:
    print(format_summary(tune(config_from_args(args), force=args.force)))
    return 0


COMMAND = Command(
    stage="tune",
    description=__doc__,
    add_arguments=add_force_argument,
    run=_run,
    examples=("--config configs/demo.yaml",),
)

main = COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
