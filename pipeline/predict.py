"""``python -m pipeline.predict``: folds x TTA -> presence gate -> post-processing -> CSV.

The classifier gates' presence is the separate classifier's, or the presence head's
(``model.classification_head``) from the same forward passes as the masks: whichever
``postprocess.json`` was tuned with (``gate_source``).

The test images are cached once at ``data.image_size``. The networks run on
``predict.engine``: TensorFlow (one model built and given each fold's
``best_weights.h5`` in turn), OpenVINO or onnxruntime (each fold converted once, cached
under ``runs/<experiment>/openvino/`` or ``onnx/``; ``auto``: docs/deploy.md).
Every batch of ``tta.batch_size`` images goes through the network once per fold with
all its TTA views. The folds are merged
(``tta.merge``) in a memory-mapped fixed-point array under the run directory
(``FoldAccumulator``), so memory does not grow with the number of images. Each merged
prob is resized to the submission size, quantised to uint8 exactly like the out-of-fold
store the post-processing was tuned on, post-processed and RLE-encoded.

Writes ``submissions/<experiment>_<yyyymmdd-hhmm>.csv`` (validated, atomic), a row in
``submissions/history.md``, ``runs/<experiment>/predict.json`` (timings) and the
fold-merged test probs as a uint8 store, ``runs/<experiment>/test_probs/`` (with
``test_probs.json``, what they came from), which ``pipeline.ensemble`` blends, and the
test presence it computed: the presence head's (``test_presence.csv``) and the separate
classifier's (``test_cls.csv``; ``--with-classifier`` runs it although no class is gated).
``--no-postprocess`` uses threshold 0.5 for every class instead of ``postprocess.json``.

This module composes the stage from parts below it: ``run.trained_run`` reads the run
once (weights, classes, ``postprocess.json``) into a ``core.prediction_plan``;
``nn.engines`` builds the Keras networks; ``run.predictor.Predictor`` holds both and
does folds x TTA, the fold merge (``core.fold_merge``) and the post-processing;
``run.prediction`` lists the test images and writes the submission files.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.core.bundle import ONNX, OPENVINO
from pipeline.core.clock import StageClock
from pipeline.core.config import Config
from pipeline.core.fold_merge import FoldAccumulator
from pipeline.core.images import resolve_image_path
from pipeline.core.layout import FOLD_MERGE, ONNX_CACHE, OPENVINO_CACHE, POSTPROCESS, TEST_PROBS
from pipeline.core.layout import PREDICT as PREDICT_JSON
from pipeline.core.layout import PREDICT_WORK as WORK_DIR
from pipeline.core.probstore import ProbWriter
from pipeline.nn.devices import device_name as describe_device
from pipeline.nn.devices import inference_precision, precision_policy, set_mixed_precision
from pipeline.nn.engines import (
    KerasPresence,
    KerasSegmentation,
    build_prediction_model,
    build_presence_model,
)
from pipeline.nn.export import converted_folds
from pipeline.nn.keras_backend import check_framework
from pipeline.nn.model import check_input_size
from pipeline.run.bundle_run import MaskWriter, check_outputs
from pipeline.run.command import (
    Command,
    add_force_argument,
    add_submission_arguments,
    config_from_args,
)
from pipeline.run.fold_records import check_trained_config
from pipeline.run.image_cache import CACHE_WORKERS, build_cache
from pipeline.run.json_files import write_json
from pipeline.run.prediction import inputs_key, list_test_images, write_outputs
from pipeline.run.predictor import Predictor, PresenceEngine, SegmentationEngine
from pipeline.run.run_lock import hold_lock
from pipeline.run.runtime_engines import (
    ONNXRUNTIME,
    TENSORFLOW,
    OnnxNetworks,
    OpenVinoNetworks,
    choose_engine,
)
from pipeline.run.stored_predictions import write_test_keys, write_test_presence
from pipeline.run.tracking import record_predict, tracked
from pipeline.run.trained_run import TrainedRun, open_trained_run

log = logging.getLogger(__name__)


def predict(
    config: Config,
    out: Path | None = None,
    submissions_dir: Path = Path("submissions"),
    use_postprocess: bool = True,
    force: bool = False,
    with_classifier: bool = False,
    masks: Path | None = None,
    overlays: Path | None = None,
) -> dict[str, Any]:
    """Predict the test images, write and record the submission; return the run's figures.

    ``force``: go on although this config differs from the folds' training config in a
    key that matters. ``with_classifier``: run the separate classifier on the test images
    and store its probs (``TEST_CLS``) although no tuned class is gated by it (an
    ensemble's classifier gate reads them). ``masks``/``overlays``: also write one PNG
    per test image and class at the image's own size, and the masks drawn over the
    images (``run.bundle_run.MaskWriter``).
    """
    check_framework(str(config.framework), config.source or "the config")
    # Everything is read and checked here, before anything is written.
    run = open_trained_run(config, use_postprocess, with_classifier)
    check_trained_config(config, force)
    check_outputs(None, masks, overlays)
    with hold_lock(config.run_dir, f"run {config.run_dir} (predict)"):
        result = _predict(config, run, out, submissions_dir, masks, overlays)
    with tracked(config) as tracker:
        record_predict(tracker, config)
    return result


def _predict(
    config: Config,
    run: TrainedRun,
    out: Path | None,
    submissions_dir: Path,
    masks: Path | None = None,
    overlays: Path | None = None,
) -> dict[str, Any]:
    clock = StageClock()
    started, cpu_started = time.perf_counter(), time.process_time()
    plan = run.plan()
    image_ids = list_test_images(config, run)
    check_input_size(plan.input_size, "data.image_size (the prediction input)")
    set_mixed_precision(False)  # the models below are built under ``precision`` alone
    precision = inference_precision(config.predict.precision)
    log.info("inference in %s (predict.precision: %s)", precision, config.predict.precision)
    test_images = Path(config.data.test_images)
    with clock.stage("cache"):
        cache = build_cache(
            run.cache_dir, "test", test_images, image_ids, plan.input_size, workers=CACHE_WORKERS
        )
    engine = choose_engine(str(config.predict.engine), precision=precision, converting=True)
    log.info("networks on %s (predict.engine: %s)", engine, config.predict.engine)
    with clock.stage("build_model"):
        segmentation, classifier = _engines(config, run, engine, precision)
        predictor = Predictor(plan, segmentation, classifier)
    n_classes = len(run.classes)
    presence_by = {}
    if classifier is not None:
        size = config.classifier.image_size
        with clock.stage("cache"):
            small = build_cache(
                run.cache_dir, "test", test_images, image_ids, size, workers=CACHE_WORKERS
            )
        presence_by["classifier"] = predictor.predict_presence(small.images, clock)
    work = config.run_dir / WORK_DIR
    shape = (len(image_ids), *plan.input_size, n_classes)
    accumulator = FoldAccumulator(work / FOLD_MERGE, shape, len(run.weights), plan.merge)
    try:
        head = predictor.predict_probs(cache.images, accumulator, clock)
        if head is not None:
            presence_by["head"] = head
        gate = presence_by.get(plan.gate_source) if plan.gate_source else None
        paths = [resolve_image_path(test_images, image_id) for image_id in cache.image_ids]
        writer = MaskWriter(paths, cache.original_sizes, run.classes, masks, overlays)
        with (
            clock.stage("postprocess"),
            ProbWriter(config.run_dir / TEST_PROBS, run.classes, overwrite=True) as store,
            writer as on_masks,
        ):
            table = predictor.encode(
                cache.image_ids, cache.original_sizes, accumulator, gate, store, on_masks
            )
        # Beside the stored probs, for pseudo_label's and an ensemble's presence.
        for source, values in presence_by.items():
            write_test_presence(config, source, values, run.classes, image_ids)
        # What the stored test outputs came from: later stages reuse them while equal.
        write_test_keys(config, classifier is not None, run.stamps)
    finally:
        accumulator.close()
        shutil.rmtree(work, ignore_errors=True)
    tuned = run.postprocess
    with clock.stage("write"):
        result = write_outputs(
            config, run, table, image_ids, cache, out, submissions_dir, tuned.score, tuned.nested
        )
    seconds = time.perf_counter() - started
    result.update(
        {
            "n_images": len(image_ids),
            "folds": len(run.weights),
            "views": list(plan.views),
            "merge": plan.merge,
            "precision": precision,
            "engine": engine,
            "masks": None if masks is None else str(masks),
            "classifier_gate": plan.gated_classes,
            "gate_source": plan.gate_source,
            "at_least_one": plan.at_least_one,
            "postprocess": POSTPROCESS if tuned.tuned else "threshold 0.5",
            "device": describe_device(),
            "seconds": round(seconds, 3),
            "cpu_seconds": round(time.process_time() - cpu_started, 3),
            "stage_seconds": {k: round(v, 3) for k, v in clock.seconds.items()},
            "stage_cpu_seconds": {k: round(v, 3) for k, v in clock.cpu_seconds.items()},
            "inputs_key": inputs_key(config, tuned.tuned, run.stamps),
        }
    )
    write_json(config.run_dir / PREDICT_JSON, result)
    return result


def _engines(
    config: Config, run: TrainedRun, engine: str, precision: str
) -> tuple[SegmentationEngine, PresenceEngine | None]:
    """The segmentation and (when its folds are listed) presence engines of a run."""
    n_classes = len(run.classes)
    if engine == TENSORFLOW:
        with precision_policy(precision):
            classifier = (
                KerasPresence(config, n_classes, run.classifier_weights)
                if run.classifier_weights
                else None
            )
            return KerasSegmentation(config, n_classes, run.weights), classifier
    # OpenVINO or ONNX: float32 networks, converted once per set of weights; OpenVINO
    # computes in ``precision`` itself, onnxruntime in float32.
    onnx = engine == ONNXRUNTIME
    cache = config.run_dir / (ONNX_CACHE if onnx else OPENVINO_CACHE)
    network_format = ONNX if onnx else OPENVINO
    fixed = config.data.image_size if config.model.architecture == "PSPNet" else None
    fixed_size = None if fixed is None else (int(fixed[0]), int(fixed[1]))

    def networks(model: Any, weights: list[Path], role: str) -> Any:
        files = converted_folds(model, weights, cache, role, network_format)
        presence = role == "presence"
        if onnx:
            return OnnxNetworks(files, presence, None if presence else fixed_size)
        return OpenVinoNetworks(files, precision, presence, None if presence else fixed_size)

    segmentation = networks(build_prediction_model(config, n_classes), run.weights, "segmentation")
    presence = None
    if run.classifier_weights:
        model = build_presence_model(config, n_classes)
        presence = networks(model, run.classifier_weights, "presence")
    return segmentation, presence


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
    parser.add_argument(
        "--masks",
        type=Path,
        help="also write one PNG per test image and class here, at each image's own size",
    )
    parser.add_argument("--overlays", type=Path, help="also write the masks drawn on the images")
    add_force_argument(parser)


def _run(args: argparse.Namespace) -> int:
    result = predict(
        config_from_args(args),
        args.out,
        args.submissions_dir,
        not args.no_postprocess,
        args.force,
        args.with_classifier,
        args.masks,
        args.overlays,
    )
    print(f"submission: {result['submission']}")
    if result["masks"]:
        print(f"masks: {result['masks']}")
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
    examples=(
        "--config configs/demo.yaml",
        "--config configs/demo.yaml --out my.csv",
        "--config configs/demo.yaml --masks masks --overlays overlays",
    ),
)

main = COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
