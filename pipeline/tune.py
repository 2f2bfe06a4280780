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
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
import pandas as pd

from pipeline.cli import (
    add_config_arguments,
    add_force_argument,
    config_from_args,
    report_interrupted,
    setup_logging,
)
from pipeline.config import Config
from pipeline.experiment import (
    FOLD_METRICS,
    Experiment,
    check_folds_finished,
    check_trained_config,
    open_experiment,
)
from pipeline.folds import classifier_skip_reason
from pipeline.images import cache_path, read_original_sizes
from pipeline.postprocess import save_postprocess
from pipeline.probstore import ProbReader
from pipeline.rle import decode
from pipeline.run_lock import hold_lock
from pipeline.threshold_search import GridAccumulator, TuneResult, class_histograms

log = logging.getLogger(__name__)
Item = TypeVar("Item")
Result = TypeVar("Result")
# (image_id, fold, (C, 2, 256) level counts, pixels per class map)
_Scored = tuple[str, int, np.ndarray, int]

# The names pipeline.train and pipeline.train_classifier write under; repeated here
# (and used by pipeline.fold_jobs) because importing those modules would import TensorFlow.
SEGMENTATION_METRICS = FOLD_METRICS
SEGMENTATION_OOF = "oof"
CLASSIFIER_STAGE = "classifier"
CLASSIFIER_OOF = "oof_cls.csv"
# Images read ahead of the scoring, and histograms in flight (a Clouds image: 0.7 MB);
# the store's read chunks (probstore.DEFAULT_BATCH_BYTES) bound the rest.
READ_AHEAD_IMAGES = 32
# Threads computing per-image histograms, and images summed into the grid at a time.
MAX_WORKERS = 4
SCORE_BATCH = 64
POSTPROCESS_FILE = "postprocess.json"
TABLE_FILE = "postprocess_table.csv"
GRID_FILE = "postprocess_grid.csv"


@dataclass(frozen=True)
class TuneOutput:
    """What ``tune`` chose and wrote."""

    result: TuneResult
    n_images: int
    classifier_used: bool
    postprocess_path: Path
    table_path: Path
    grid_path: Path
    search_seconds: float  # the streaming pass alone


def open_oof_stores(config: Config, exp: Experiment) -> list[ProbReader]:
    """The out-of-fold prob store of every fold, in fold order.

    Every fold must be finished (its ``metrics.json`` exists) and its store must hold
    exactly the fold's validation images with the experiment's classes.
    """
    check_folds_finished(config)
    readers = []
    for k in range(exp.n_folds):
        reader = ProbReader(config.fold_dir(k) / SEGMENTATION_OOF)
        if reader.classes != exp.classes:
            raise ValueError(
                f"prob store {reader.directory} must have classes {exp.classes}; "
                f"got {reader.classes}"
            )
        _check_fold_ids(reader.image_ids, exp, k, str(reader.directory))
        readers.append(reader)
    return readers


def read_classifier_oof(config: Config, exp: Experiment) -> dict[str, np.ndarray] | None:
    """image_id -> (C,) float64 classifier presence probs, or None if no fold has any.

    Each fold's ``oof_cls.csv`` must have columns ``image_id`` then the classes in
    order, probabilities in [0, 1], and exactly the fold's validation images.
    """
    paths = [config.fold_dir(k, CLASSIFIER_STAGE) / CLASSIFIER_OOF for k in range(exp.n_folds)]
    present = [k for k, path in enumerate(paths) if path.is_file()]
    if not present:
        return None
    missing = [k for k in range(exp.n_folds) if k not in present]
    if missing:
        raise FileNotFoundError(
            f"classifier out-of-fold probs exist for folds {present} but not for folds "
            f"{missing} ({paths[missing[0]]} not found); finish them with "
            f"`python -m pipeline.train_classifier --config {config.source} --fold "
            f"{missing[0]}`, or remove {config.run_dir / CLASSIFIER_STAGE} to tune "
            "without the classifier gate"
        )
    expected = ["image_id", *exp.classes]
    probs: dict[str, np.ndarray] = {}
    for k, path in enumerate(paths):
        frame = pd.read_csv(path, dtype={"image_id": str}, keep_default_na=False)
        if list(frame.columns) != expected:
            raise ValueError(f"{path} must have columns {expected}; got {list(frame.columns)}")
        values = frame[exp.classes].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
        bad = np.flatnonzero(~((values >= 0) & (values <= 1)).all(axis=1))
        if len(bad):
            row = int(bad[0])
            raise ValueError(
                f"{path} row {row + 2} (image_id {frame['image_id'].iloc[row]!r}): "
                f"probabilities must be numbers in [0, 1]; got {values[row].tolist()}"
            )
        ids = frame["image_id"].tolist()
        if len(set(ids)) != len(ids):
            duplicated = frame["image_id"][frame["image_id"].duplicated()].iloc[0]
            raise ValueError(f"{path}: image_id {duplicated!r} appears more than once")
        _check_fold_ids(ids, exp, k, str(path))
        probs.update(zip(ids, values, strict=True))
    return probs


def _check_fold_ids(ids: Sequence[str], exp: Experiment, fold: int, source: str) -> None:
    """Out-of-fold files must hold exactly the fold's validation images: no leakage."""
    expected = set(exp.members(fold)[1])
    found = set(ids)
    if found != expected:
        extra, absent = sorted(found - expected), sorted(expected - found)
        raise ValueError(
            f"{source} must hold exactly the {len(expected)} validation images of fold {fold} "
            f"in {exp.run_dir / 'folds.csv'}; got {len(extra)} others (e.g. {extra[:3]}) and "
            f"{len(absent)} missing (e.g. {absent[:3]}): was it made with another split?"
        )


def iter_oof(
    config: Config,
    readers: Sequence[ProbReader],
    original_sizes: Mapping[str, tuple[int, int]],
) -> Iterator[tuple[str, int, np.ndarray, tuple[int, int]]]:
    """Stream ``(image_id, fold, q, original size)`` over every fold's store, sequentially.

    ``q`` is uint8 (C, H, W) as stored, checked to be at the submission size (or the
    image's own size when there is none).
    """
    size = config.data.submission_size
    for fold, reader in enumerate(readers):
        for image_id, q in reader.iter():
            if image_id not in original_sizes:
                raise ValueError(
                    f"image_id {image_id!r} of {reader.directory} has no original size in the "
                    "training image cache index; rebuild it with python -m pipeline.train"
                )
            original = original_sizes[image_id]
            target = (int(size[0]), int(size[1])) if size is not None else original
            if q.shape[1:] != target:
                raise ValueError(
                    f"{reader.directory}: image {image_id!r} is stored at "
                    f"{q.shape[1]}x{q.shape[2]}; expected {target[0]}x{target[1]} "
                    f"(data.submission_size {size}): was the fold predicted with another config?"
                )
            yield image_id, fold, q, original


def map_ahead(
    function: Callable[[Item], Result], items: Iterable[Item], workers: int, depth: int
) -> Iterator[Result]:
    """``map(function, items)`` in order, on ``workers`` threads, at most ``depth`` ahead.

    For work that releases the GIL (numpy, OpenCV). Memory is bounded by ``depth``
    items in flight; an exception is raised at its item's place in the order.
    """
    if workers < 1 or depth < 1:
        raise ValueError(f"workers and depth must be >= 1; got {workers} and {depth}")
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="map_ahead") as pool:
        pending: deque[Future[Result]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(function, item))
                if len(pending) >= depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def read_ahead(items: Iterable[Item], depth: int) -> Iterator[Item]:
    """Yield ``items`` in order while a background thread produces up to ``depth`` ahead.

    Disk reads release the GIL, so reading overlaps the consumer's work. An exception
    in the producer is raised in the consumer; closing the generator stops the thread.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1; got {depth}")
    buffer: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((False, item)):
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            put((True, exc))
        else:
            put((True, None))

    thread = threading.Thread(target=produce, name="read_ahead", daemon=True)
    thread.start()
    try:
        while True:
            finished, value = buffer.get()
            if finished:
                if value is not None:
                    raise value
                return
            yield value
    finally:
        stop.set()
        thread.join()


def decode_truth(
    rles: Sequence[str], original_shape: tuple[int, int], size: tuple[int, int]
) -> np.ndarray:
    """Truth (C, H, W) uint8 {0, 1} at ``size``: ``masks.truth_masks`` transposed, faster.

    ``rles`` are already validated (``formats.read_masks``). Rather than decoding every
    mask at its original size (1400x2100 for Clouds) and resizing it, the runs are
    counted directly at the original pixels the nearest-neighbour resize samples.
    """
    height, width = size
    out = np.zeros((len(rles), height, width), dtype=np.uint8)
    if tuple(original_shape) == tuple(size):
        for c, text in enumerate(rles):
            if text.strip():
                out[c] = decode(text, original_shape)
        return out
    grid = _sampling(tuple(original_shape), (height, width))
    n_pixels = original_shape[0] * original_shape[1]
    n_sampled = grid.n_rows * grid.n_cols
    for c, text in enumerate(rles):
        if not text.strip():
            continue
        # Run starts (0-based) and ends, alternately.
        bounds = np.fromstring(text, dtype=np.int64, sep=" ")
        bounds[0::2] -= 1
        bounds[1::2] += bounds[0::2]
        if bounds[-1] > n_pixels:
            raise ValueError(
                f"rle of class {c} runs to pixel {bounds[-1]}, past the end of a "
                f"{original_shape[0]}x{original_shape[1]} image ({n_pixels} pixels)"
            )
        # Sampled pixels before each run boundary (column-major: whole sampled columns
        # first, then sampled rows of its own column) give the runs' lengths in sampled
        # pixels, alternately background and foreground.
        col, row = np.divmod(bounds, original_shape[0])
        before = grid.col_rank[col] * grid.n_rows + grid.col_sampled[col] * grid.row_rank[row]
        counts = np.empty(before.size + 1, dtype=np.int64)
        counts[0] = before[0]
        np.subtract(before[1:], before[:-1], out=counts[1:-1])
        counts[-1] = n_sampled - before[-1]
        values = np.zeros(counts.size, dtype=np.uint8)
        values[1::2] = 1
        sampled = np.repeat(values, counts).reshape(grid.n_cols, grid.n_rows)
        if grid.one_to_one:
            cv2.transpose(sampled, dst=out[c])  # faster than numpy's strided copy
        else:
            out[c] = sampled.T[np.ix_(grid.row_map, grid.col_map)]
    return out


@dataclass(frozen=True)
class _Sampling:
    """Which original rows and columns a nearest resize reads, and where they go.

    ``row_rank[r]``: sampled rows above row r (r in [0, H]); ``col_rank``, the same for
    columns; ``col_sampled[x]``: 1 if column x is read; ``row_map``/``col_map``: for
    each target row/column, its source's index among the sampled ones.
    """

    n_rows: int
    n_cols: int
    row_rank: np.ndarray
    col_rank: np.ndarray
    col_sampled: np.ndarray
    row_map: np.ndarray
    col_map: np.ndarray
    one_to_one: bool


@lru_cache(maxsize=8)
def _sampling(original_shape: tuple[int, int], size: tuple[int, int]) -> _Sampling:
    rows, row_map = np.unique(_nearest_indices(original_shape[0], size[0]), return_inverse=True)
    cols, col_map = np.unique(_nearest_indices(original_shape[1], size[1]), return_inverse=True)
    row_read = np.zeros(original_shape[0] + 1, dtype=np.int64)
    row_read[rows] = 1
    col_read = np.zeros(original_shape[1] + 1, dtype=np.int64)
    col_read[cols] = 1
    return _Sampling(
        n_rows=rows.size,
        n_cols=cols.size,
        row_rank=np.cumsum(row_read) - row_read,
        col_rank=np.cumsum(col_read) - col_read,
        col_sampled=col_read,
        row_map=row_map,
        col_map=col_map,
        one_to_one=(rows.size, cols.size) == tuple(size),
    )


def _nearest_indices(n_source: int, n_target: int) -> np.ndarray:
    """Source index that cv2's nearest resize (as in ``masks.resize_masks``) picks for
    each target index along one axis; cv2 itself computes them, so they match exactly."""
    source = np.arange(n_source, dtype=np.float32)[None, :]
    picked = cv2.resize(source, (n_target, 1), interpolation=cv2.INTER_NEAREST)
    return picked[0].astype(np.int64)


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
    gates = [g for g in grid.gates if classifier_probs is not None or g != "classifier"]
    if not gates:
        raise ValueError(
            f"postprocess.gates {list(grid.gates)} leaves nothing to search without "
            "classifier out-of-fold probs; add 'none' or 'segmentation', or train the "
            "classifier (python -m pipeline.train_classifier --all)"
        )
    accumulator = GridAccumulator(
        exp.classes,
        grid.thresholds,
        grid.min_areas,
        grid.gate_thresholds,
        len(readers),
        grid.topk_fraction,
        gates=gates,
    )
    lookup = classifier_probs if "classifier" in gates else None
    original_sizes = read_original_sizes(cache_path(exp.cache_dir, "train", config.data.image_size))
    rles = exp.rles()

    def histograms(item: tuple[str, int, np.ndarray, tuple[int, int]]) -> _Scored:
        image_id, fold, q, original = item
        truth = decode_truth(rles[image_id], original, q.shape[1:])
        return image_id, fold, class_histograms(q, truth), q.shape[1] * q.shape[2]

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
    accumulator.add_histograms(
        ids,
        [fold for _, fold, _, _ in batch],
        np.stack([hist for _, _, hist, _ in batch]),
        [n_pixels for *_, n_pixels in batch],
        None if classifier_probs is None else np.stack([classifier_probs[i] for i in ids]),
    )


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
        return _tune(config)


def _tune(config: Config) -> TuneOutput:
    exp = open_experiment(config)
    readers = open_oof_stores(config, exp)
    classifier_probs = None
    if "classifier" in config.postprocess.gates:
        reason = classifier_skip_reason(exp.table, exp.classes)
        classifier_probs = None if reason is not None else read_classifier_oof(config, exp)
        if reason is not None:
            log.info("the classifier gate is left out: %s", reason)
        elif classifier_probs is None:
            log.warning(
                "no classifier out-of-fold probs under %s: tuning without the classifier "
                "gate (train it with python -m pipeline.train_classifier --all)",
                config.run_dir / CLASSIFIER_STAGE,
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
    size = config.data.submission_size
    extra: dict[str, Any] = {
        **result.to_dict(),
        "n_images": n_images,
        "size": list(size) if size is not None else "each image's own size",
        "classifier_used": classifier_probs is not None,
        "gates_won": {name: result.per_class[name].params.gate for name in result.classes},
        "gate_comparison": comparison,
        "oof_stores": [str(reader.directory) for reader in readers],
    }
    run_dir = config.run_dir
    postprocess_path = run_dir / POSTPROCESS_FILE
    save_postprocess(postprocess_path, result.params_by_class(), extra=extra)
    table = result.summary().astype({"min_area": "Int64", "min_component": "Int64"})
    for kind in ("none", *result.gate_tables):
        table[f"best_{kind}"] = [comparison[name][kind] for name in result.classes] + [np.nan]
    table_path = _write_csv(table, run_dir / TABLE_FILE)
    grid_path = _write_csv(result.table_frame(), run_dir / GRID_FILE)
    log.info("wrote %s, %s and %s", postprocess_path, table_path.name, grid_path.name)
    return TuneOutput(
        result,
        n_images,
        classifier_probs is not None,
        postprocess_path,
        table_path,
        grid_path,
        search_seconds,
    )


def _write_csv(frame: pd.DataFrame, path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False, lineterminator="\n")
    os.replace(tmp, path)
    return path


def format_summary(output: TuneOutput) -> str:
    """The printed table: per class and overall, plain 0.5, tuned (nested, then in-sample),
    the chosen setting and how many folds' nested choices agree with it."""
    result = output.result
    lines = [
        f"post-processing tuned on {output.n_images} out-of-fold images "
        f"({len(result.fold_counts)} folds); gates searched: {', '.join(result.gates)}"
        + ("" if "classifier" in result.gates else " (the classifier gate was not searched)"),
        "nested = each fold scored with the setting tuned on the other folds (the honest "
        "CV); in-sample = tuned and scored on the same images (optimistic)",
        f"{'class':<12} {'plain 0.5':>9} {'nested':>9} {'in-sample':>9} {'thr+area':>9} "
        f"{'folds mean ± std':>17}  {'gate':<20} {'threshold':>9} {'min_area':>8} {'agree':>6}",
    ]
    summary = result.summary()
    stability = result.stability()
    for row in summary.itertuples(index=False):
        name = str(row[0])
        spread = f"{row.fold_mean:.4f} ± {row.fold_std:.4f}"
        head = (
            f"{name:<12} {row.plain:>9.4f} {row.tuned_nested:>9.4f} {row.tuned:>9.4f} "
            f"{row.no_gate:>9.4f} {spread:>17}"
        )
        if name in result.per_class:
            params = result.per_class[name].params
            gate = (
                params.gate if params.gate == "none" else f"{params.gate}@{params.gate_threshold}"
            )
            agree = f"{stability[name]['folds_agreeing']}/{stability[name]['folds']}"
            head += f"  {gate:<20} {params.threshold:>9} {params.min_area:>8} {agree:>6}"
        lines.append(head)
    lines.append(
        f"CV Kaggle Dice: nested {result.nested_score:.4f} (honest), in-sample "
        f"{result.score:.4f}, plain 0.5 {result.plain_score:.4f}"
    )
    lines.append(f"wrote {output.postprocess_path}, {output.table_path}, {output.grid_path}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tune", description=__doc__)
    add_config_arguments(parser)
    add_force_argument(parser)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        output = tune(config_from_args(args), force=args.force)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return report_interrupted("python -m pipeline.tune")
    print(format_summary(output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
