"""``python -m pipeline.predict``: folds x TTA -> presence gate -> post-processing -> CSV.

The classifier gates' presence is the separate classifier's, or the presence head's
(``model.classification_head``) from the same forward passes as the masks: whichever
``postprocess.json`` was tuned with (``gate_source``).

The test images are cached once at ``data.image_size``. One model is built and given
each fold's ``best_weights.h5`` in turn; every batch of ``tta.batch_size`` images goes
through the network once per fold with all its TTA views (``inference.predict_tta``).
The folds are merged (``tta.merge``) in a memory-mapped fixed-point array under the run
directory (``FoldAccumulator``), so memory does not grow with the number of images.
Each merged prob is resized to the submission size, quantised to uint8 exactly like the
out-of-fold store the post-processing was tuned on, post-processed and RLE-encoded.

Writes ``submissions/<experiment>_<yyyymmdd-hhmm>.csv`` (validated, atomic), a row in
``submissions/history.md``, ``runs/<experiment>/predict.json`` (timings) and the
fold-merged test probs as a uint8 store, ``runs/<experiment>/test_probs/`` (with
``test_probs.json``, what they came from), which ``pipeline.ensemble`` blends, and the
test presence it computed: the presence head's (``test_presence.csv``) and the separate
classifier's (``test_cls.csv``; ``--with-classifier`` runs it although no class is gated).
``--no-postprocess`` uses threshold 0.5 for every class instead of ``postprocess.json``.

This module composes the stage; its parts live below it: ``core.fold_merge`` (the fold
merge), ``core.clock`` (stage timings), ``run.prediction`` (test images, weights,
post-processing, the submission files) and ``nn.predictor`` (the network).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.core.clock import StageClock
from pipeline.core.config import Config
from pipeline.core.fold_merge import FoldAccumulator
from pipeline.core.layout import (
    CLASSIFIER_STAGE,
    FOLD_MERGE,
    POSTPROCESS,
    TEST_PROBS,
)
from pipeline.core.layout import PREDICT as PREDICT_JSON
from pipeline.core.layout import PREDICT_WORK as WORK_DIR
from pipeline.core.probstore import ProbWriter
from pipeline.nn.devices import device_name as describe_device
from pipeline.nn.devices import inference_precision, precision_policy, set_mixed_precision
from pipeline.nn.keras_backend import check_framework
from pipeline.nn.model import check_input_size
from pipeline.nn.predictor import (
    CACHE_WORKERS,
    build_prediction_model,
    encode_predictions,
    predict_folds,
    predict_presence,
)
from pipeline.run.command import (
    Command,
    add_force_argument,
    add_submission_arguments,
    config_from_args,
    run_command,
)
from pipeline.run.experiment import open_experiment
from pipeline.run.fold_records import check_trained_config
from pipeline.run.image_cache import build_cache
from pipeline.run.json_files import write_json
from pipeline.run.prediction import (
    fold_weights,
    inputs_key,
    list_test_images,
    read_postprocess,
    tuned_gate_source,
    write_outputs,
)
from pipeline.run.run_lock import hold_lock
from pipeline.run.stored_predictions import write_test_keys, write_test_presence

log = logging.getLogger(__name__)


def predict(
    config: Config,
    out: Path | None = None,
    submissions_dir: Path = Path("submissions"),
    use_postprocess: bool = True,
    force: bool = False,
    with_classifier: bool = False,
) -> dict[str, Any]:
    """Predict the test images, write and record the submission; return the run's figures.

    ``force``: go on although this config differs from the folds' training config in a
    key that matters. ``with_classifier``: run the separate classifier on the test images
    and store its probs (``TEST_CLS``) although no tuned class is gated by it (an
    ensemble's classifier gate reads them).
    """
    check_framework(str(config.framework), config.source or "the config")
    weights = fold_weights(config)
    check_trained_config(config, force)
    # Refused here, before anything is written, where this config lacks the source.
    gate_source = tuned_gate_source(config) if use_postprocess else None
    run_classifier = gate_source == "classifier" or with_classifier
    if run_classifier:
        fold_weights(config, CLASSIFIER_STAGE)  # every classifier fold trained, else refused
    with hold_lock(config.run_dir, f"run {config.run_dir} (predict)"):
        return _predict(
            config, weights, out, submissions_dir, use_postprocess, gate_source, run_classifier
        )


def _predict(
    config: Config,
    weights: list[Path],
    out: Path | None,
    submissions_dir: Path,
    use_postprocess: bool,
    gate_source: str | None,
    run_classifier: bool,
) -> dict[str, Any]:
    clock = StageClock()
    started, cpu_started = time.perf_counter(), time.process_time()
    exp = open_experiment(config)
    inputs = inputs_key(config, use_postprocess)
    params, oof_score, oof_nested, at_least_one = read_postprocess(
        config, exp.classes, use_postprocess
    )
    gated = [name for name, p in params.items() if p.uses_classifier]
    image_ids = list_test_images(config, exp)
    data = config.data
    check_input_size(data.image_size, "data.image_size (the prediction input)")
    set_mixed_precision(False)  # the models below are built under ``precision`` alone
    precision = inference_precision(config.predict.precision)
    log.info("inference in %s (predict.precision: %s)", precision, config.predict.precision)
    with clock.stage("cache"):
        cache = build_cache(
            exp.cache_dir,
            "test",
            Path(data.test_images),
            image_ids,
            data.image_size,
            workers=CACHE_WORKERS,
        )
    with precision_policy(precision):
        classifier = (
            predict_presence(config, image_ids, len(exp.classes), exp.cache_dir, clock)
            if run_classifier
            else None
        )
        with clock.stage("build_model"):
            model = build_prediction_model(config, len(exp.classes))
    shape = (len(image_ids), *data.image_size, len(exp.classes))
    work = config.run_dir / WORK_DIR
    accumulator = FoldAccumulator(work / FOLD_MERGE, shape, len(weights), config.tta.merge)
    try:
        head = predict_folds(
            model,
            weights,
            cache.images,
            config.tta.views,
            config.tta.merge,
            config.tta.batch_size,
            accumulator,
            clock,
        )
        presence = head if gate_source == "head" else classifier
        with (
            clock.stage("postprocess"),
            ProbWriter(config.run_dir / TEST_PROBS, exp.classes, overwrite=True) as store,
        ):
            table = encode_predictions(
                cache,
                accumulator,
                exp.classes,
                params,
                data.submission_size,
                presence,
                config.tta.batch_size,
                store,
                at_least_one,
            )
        # Beside the stored probs, for pseudo_label's and an ensemble's presence.
        for source, values in (("head", head), ("classifier", classifier)):
            if values is not None:
                write_test_presence(config, source, values, exp.classes, image_ids)
        # What the stored test outputs came from: later stages reuse them while equal.
        write_test_keys(config, classifier is not None)
    finally:
        accumulator.close()
        shutil.rmtree(work, ignore_errors=True)
    with clock.stage("write"):
        result = write_outputs(
            config, exp, table, image_ids, cache, out, submissions_dir, oof_score, oof_nested
        )
    seconds = time.perf_counter() - started
    result.update(
        {
            "n_images": len(image_ids),
            "folds": len(weights),
            "views": list(config.tta.views),
            "merge": config.tta.merge,
            "precision": precision,
            "classifier_gate": gated,
            "gate_source": gate_source,
            "at_least_one": at_least_one,
            "postprocess": POSTPROCESS if use_postprocess else "threshold 0.5",
            "device": describe_device(),
            "seconds": round(seconds, 3),
            "cpu_seconds": round(time.process_time() - cpu_started, 3),
            "stage_seconds": {k: round(v, 3) for k, v in clock.seconds.items()},
            "stage_cpu_seconds": {k: round(v, 3) for k, v in clock.cpu_seconds.items()},
            "inputs_key": inputs,
        }
    )
    write_json(config.run_dir / PREDICT_JSON, result)
    return result


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_submission_arguments(parser)
    parser.add_argument(
        "--no-postprocess",
        action="store_true",
        help="threshold 0.5 for every class instead of the tuned postprocess.json",
    )
    parser.add_argument(
        "--with-classifier",
        action="store_true",
        help="also run the separate classifier on the test images and store its probs "
        "(test_cls.csv) although no tuned class is gated by it; the ensemble stage's "
        "classifier gate reads them",
    )
    add_force_argument(parser)


def _run(args: argparse.Namespace) -> int:
    result = predict(
        config_from_args(args),
        args.out,
        args.submissions_dir,
        not args.no_postprocess,
        args.force,
        args.with_classifier,
    )
    print(f"submission: {result['submission']}")
    nested = result["oof_score_nested"]
    print(
        f"OOF Kaggle Dice: nested {'-' if nested is None else f'{nested:.4f}'} (honest: tuned "
        f"on the other folds), in-sample {result['oof_score']:.4f}"
    )
    test = result["test_score"]
    print(f"test Kaggle Dice: {'-' if test is None else f'{test:.4f}'}")
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in result["stage_seconds"].items())
    print(f"{result['n_images']} images in {result['seconds']:.1f}s ({stages})")
    return 0


COMMAND = Command(
    stage="predict",
    description=__doc__,
    add_arguments=_add_arguments,
    run=_run,
    examples=("--config configs/demo.yaml", "--config configs/demo.yaml --out my.csv"),
)


def main(argv: Sequence[str] | None = None, prog: str = "") -> int:
    """``foldseg predict`` / ``python -m pipeline.predict``; returns the exit code."""
    return run_command(COMMAND, argv, prog)


if __name__ == "__main__":
    sys.exit(main())
