"""``python -m pipeline.pseudo_label``: confident test predictions as extra training labels.

Severstal's 1st place trained two more rounds on test images labelled by its own
ensemble, keeping only images where the segmenter and the classifier agree confidently.
For a trained, tuned and predicted experiment this stage reads its stored test probs
(``runs/<exp>/test_probs/``, from ``python -m pipeline.predict``) and post-processes them
with the tuned ``postprocess.json``; each class of a test image is

- **present** where its mask is non-empty and the presence probability is above
  ``pseudo_label.positive`` (0.95),
- **absent** where its mask is empty and the presence probability is below
  ``pseudo_label.negative`` (0.05).

The presence probability is the one the gated classes were tuned with
(``postprocess.json``'s ``gate_source``); without gated classes, the classifier's (mean
over its folds) when the experiment has one, else the presence head's
(``model.classification_head``: predict's ``test_presence.csv``), else the
segmentation's own top-k mean (``postprocess.topk_fraction``). An
image is kept only when every class is one or the other. The kept masks are resized to
each test image's own size and written as an ``image_label`` table,
``runs/<exp>/pseudo_labels.csv`` (with ``pseudo_labels.json``: counts and thresholds).

A following experiment names it in ``data.pseudo_labels``: its images join every fold's
training part, never a validation part, so the next round's OOF and nested CV are
scored on true labels only and compare with this round's. Use a new experiment name
with the same seed, so the split is the same (the command is printed).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from pipeline.core import rle
from pipeline.core.atomic import write_csv
from pipeline.core.clock import StageClock
from pipeline.core.commands import command_line
from pipeline.core.config import Config
from pipeline.core.exclusive import exclusive_levels, is_exclusive
from pipeline.core.images import cache_path, read_original_sizes
from pipeline.core.layout import (
    CLASSIFIER_STAGE,
    POSTPROCESS,
    PSEUDO_LABELS,
    PSEUDO_LABELS_JSON,
    TEST_PRESENCE,
)
from pipeline.core.postprocess import (
    at_least_one_applied,
    load_postprocess,
    postprocess_image,
    segmentation_score,
)
from pipeline.core.submission import make_submission_frame
from pipeline.run.command import Command, config_from_args
from pipeline.run.experiment import Experiment, open_experiment
from pipeline.run.fold_records import check_folds_finished
from pipeline.run.json_files import write_json
from pipeline.run.prediction import list_test_images
from pipeline.run.run_lock import hold_lock
from pipeline.run.stored_predictions import fresh_test_presence, fresh_test_probs
from pipeline.run.tracking import record_pseudo_labels, tracked
from pipeline.run.trained_run import fold_weights, tuned_gate_source

log = logging.getLogger(__name__)


def select(masks: np.ndarray, presence: np.ndarray, positive: float, negative: float) -> np.ndarray:
    """(C,) int per class of one image: 1 present, 0 absent, -1 not confident.

    ``masks`` (C, H, W) the post-processed masks, ``presence`` (C,) probabilities.
    """
    non_empty = masks.reshape(len(masks), -1).any(axis=1)
    out = np.full(len(masks), -1, dtype=np.int64)
    out[non_empty & (presence > positive)] = 1
    out[~non_empty & (presence < negative)] = 0
    return out


def pseudo_label(config: Config) -> dict[str, Any]:
    """Select the confident test images of a predicted experiment and write their labels."""
    check_folds_finished(config)  # before open_experiment, which writes into the run
    exp = open_experiment(config)
    p = config.pseudo_label
    image_ids = list_test_images(config, exp)
    reader = fresh_test_probs(config, image_ids)
    if reader is None:
        raise FileNotFoundError(
            f"no up-to-date test probs in {config.run_dir}: run "
            f"`{command_line('predict', config=config.source)}` (with the same --set "
            "overrides) first"
        )
    params, extra = load_postprocess(config.run_dir / POSTPROCESS, exp.classes)
    at_least_one = at_least_one_applied(extra)
    settings = [params[name] for name in exp.classes]
    sizes = read_original_sizes(cache_path(exp.cache_dir, "test", config.data.image_size))
    # The presence the gated classes were tuned with; without gated classes, the
    # classifier when trained, else the presence head, else the top-k mean.
    tuned = tuned_gate_source(config)
    if tuned is None:
        try:
            fold_weights(config, CLASSIFIER_STAGE)
            tuned = "classifier"
        except FileNotFoundError:
            tuned = "head" if config.model.classification_head else None
    with hold_lock(config.run_dir, f"run {config.run_dir} (pseudo_label)"):
        if tuned == "classifier":
            # As predict stored it when it ran the classifier, else run it here.
            presence = fresh_test_presence(config, exp.classes, image_ids, "classifier")
            if presence is None:
                presence = _classifier_presence(config, image_ids, len(exp.classes), exp.cache_dir)
            source = "the classifier"
        elif tuned == "head":
            presence = read_test_presence(config, exp, image_ids)
            source = "the presence head (mean over folds and views)"
        else:
            presence = None
            source = f"the top-{config.postprocess.topk_fraction:g} mean of the segmentation"
        log.info("presence probabilities from %s", source)
        rows: list[tuple[str, str, str]] = []
        exclusive = is_exclusive(config.model.activation)
        counts = {name: {"present": 0, "absent": 0} for name in exp.classes}
        for i, image_id in enumerate(image_ids):
            q = np.asarray(reader.get(image_id))
            if exclusive:  # softmax: the argmax masks, as predict post-processes them
                q = exclusive_levels(q)
            scores = (
                presence[i]
                if presence is not None
                else np.array([segmentation_score(c, config.postprocess.topk_fraction) for c in q])
            )
            masks = postprocess_image(q, settings, scores, at_least_one)
            chosen = select(masks, scores, float(p.positive), float(p.negative))
            if (chosen < 0).any():
                continue
            height, width = sizes[image_id]
            for c, name in enumerate(exp.classes):
                counts[name]["present" if chosen[c] else "absent"] += 1
                full = cv2.resize(
                    masks[c], (int(width), int(height)), interpolation=cv2.INTER_NEAREST
                )
                rows.append((image_id, name, rle.encode(full)))
        kept = len(rows) // len(exp.classes)
        if kept == 0:
            raise ValueError(
                f"no test image has every class confidently present (> pseudo_label.positive "
                f"{p.positive}) or absent (< pseudo_label.negative {p.negative}); nothing was "
                "written: lower positive or raise negative"
            )
        table = pd.DataFrame(rows, columns=["image_id", "class_name", "rle"])
        frame = make_submission_frame(table, "image_label", exp.classes, None)
        out = write_csv(config.run_dir / PSEUDO_LABELS, frame)
        summary = {
            "test_images": len(image_ids),
            "kept_images": kept,
            "presence_from": source,
            "positive": float(p.positive),
            "negative": float(p.negative),
            "per_class": counts,
            "table": str(out),
            "images": str(config.data.test_images),
        }
        write_json(config.run_dir / PSEUDO_LABELS_JSON, summary)
    log.info("kept %d of %d test images (presence from %s)", kept, len(image_ids), source)
    with tracked(config) as tracker:
        record_pseudo_labels(tracker, config, summary)
        tracker.log_artifact(config.run_dir / PSEUDO_LABELS_JSON)
    return summary


def read_test_presence(config: Config, exp: Experiment, image_ids: Sequence[str]) -> np.ndarray:
    """The presence head's test probs (N, C) float64 in the order of ``image_ids``, as
    predict stored them beside the test probs."""
    presence = fresh_test_presence(config, exp.classes, image_ids, "head")
    if presence is None:
        raise FileNotFoundError(
            f"{config.run_dir / TEST_PRESENCE} is missing or older than the test probs: "
            "model.classification_head is on, so predict writes it; run "
            f"`{command_line('predict', config=config.source)}` again"
        )
    return presence


def _classifier_presence(
    config: Config, image_ids: Sequence[str], n_classes: int, cache_dir: Path
) -> np.ndarray:
    """The separate classifier's (N, C) test presence, its folds run here (the Keras
    layer is imported only for it)."""
    from pipeline.nn.engines import KerasPresence
    from pipeline.run.image_cache import CACHE_WORKERS, build_cache
    from pipeline.run.predictor import predict_presence

    size = config.classifier.image_size
    folder = Path(config.data.test_images)
    cache = build_cache(cache_dir, "test", folder, list(image_ids), size, workers=CACHE_WORKERS)
    engine = KerasPresence(config, n_classes, fold_weights(config, CLASSIFIER_STAGE))
    views, batch = config.tta.views, config.tta.batch_size
    return predict_presence(engine, cache.images, views, batch, StageClock())


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    summary = pseudo_label(config)
    print(
        f"pseudo-labels: {summary['kept_images']} of {summary['test_images']} test images kept "
        f"(presence from {summary['presence_from']}) -> {summary['table']}"
    )
    for name, count in summary["per_class"].items():
        print(f"  {name}: {count['present']} present, {count['absent']} absent")
    source = config.source or "<config>"
    kept = [s for s in args.overrides if not s.startswith(("experiment=", "data.pseudo_"))]
    sets = [
        *kept,
        f"experiment={config.experiment}_pl1",
        f"data.pseudo_labels={summary['table']}",
        f"data.pseudo_images={summary['images']}",
    ]
    again = command_line(
        "train", "--all", *(f"--set {shlex.quote(s)}" for s in sets), config=source
    )
    print(f"next round (same seed, so the same split): {again}")
    return 0


COMMAND = Command(
    stage="pseudo-label",
    description=__doc__,
    add_arguments=lambda parser: None,
    run=_run,
    examples=("--config configs/demo.yaml",),
)

main = COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
