"""``python -m pipeline.export``: the trained folds as one bundle that predicts anywhere.

Writes the folder ``--out`` (built under a temporary name, renamed whole) with:

- ``savedmodel/segmentation_fold<k>/``: each fold's network as a SavedModel (loads on a
  stock TensorFlow, no segmentation-models, no foldseg);
- ``openvino/segmentation_fold<k>.xml`` and ``.bin``: the same network as OpenVINO IR,
  which runs without TensorFlow (numpy, opencv, pandas and openvino);
- ``onnx/segmentation_fold<k>.onnx`` (``--formats ...,onnx``): the same network as ONNX
  (tf2onnx), which runs on onnxruntime without TensorFlow;
- the presence classifier's folds alike (``presence_fold<k>``) when the tuned
  post-processing gates on them;
- ``postprocess.json``; ``runner/``: the TensorFlow-free runner (``runner/run_bundle.py``
  and the few foldseg modules it needs) with its ``requirements.txt``;
- ``manifest.json``: the prediction plan (classes, input size, TTA views and merge,
  post-processing, submission layout and size), the input (NHWC float32 RGB 0-255,
  normalised inside the network), precision, the CV figures (nested and in-sample,
  labelled), the config, package versions and the SHA-256 of every other member.

Exporting twice gives identical members. Run the bundle with ``foldseg run-bundle``
or, anywhere, ``python <bundle>/runner/run_bundle.py`` (docs/deploy.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pipeline
from pipeline.core.atomic import atomic_path, write_json
from pipeline.core.bundle import (
    FORMAT,
    FORMAT_VERSION,
    INPUT,
    MANIFEST,
    NETWORK_FORMATS,
    ONNX,
    OPENVINO,
    PRESENCE,
    RUNNER,
    SAVEDMODEL,
    SEGMENTATION,
    list_members,
)
from pipeline.core.config import Config
from pipeline.core.layout import POSTPROCESS
from pipeline.nn.devices import set_mixed_precision
from pipeline.nn.engines import build_prediction_model, build_presence_model
from pipeline.nn.export import save_onnx, save_openvino, save_savedmodel
from pipeline.nn.keras_backend import check_framework
from pipeline.nn.weights import load_best_weights
from pipeline.run.bundle_files import RUNNER_PACKAGES, package_version, write_runner
from pipeline.run.command import Command, add_force_argument, config_from_args
from pipeline.run.fold_records import check_trained_config
from pipeline.run.trained_run import TrainedRun, open_trained_run

log = logging.getLogger(__name__)

# The SavedModel and the framework-free format measured fastest here (docs/deploy.md).
DEFAULT_FORMATS = (SAVEDMODEL, OPENVINO)

VERSIONED = (
    "tensorflow",
    "tf-keras",
    "keras",
    "segmentation-models",
    "openvino",
    "onnxruntime",
    "onnx",
    "tf2onnx",
    *RUNNER_PACKAGES,
)


def export(config: Config, out: Path, formats: list[str], force: bool = False) -> dict[str, Any]:
    """Export the trained folds of ``config`` to the bundle folder ``out``."""
    check_framework(str(config.framework), config.source or "the config")
    unknown = [f for f in formats if f not in NETWORK_FORMATS]
    if unknown or not formats:
        raise ValueError(f"--formats must name some of {list(NETWORK_FORMATS)}; got {formats}")
    if out.exists() and (out.is_file() or any(out.iterdir())):
        kind = "an existing file" if out.is_file() else "an existing, non-empty folder"
        raise FileExistsError(f"bundle folder {str(out)!r} is {kind}; name a new path")
    run = open_trained_run(config)
    check_trained_config(config, force)
    plan = run.plan()
    set_mixed_precision(False)  # the networks are exported in float32
    networks: dict[str, dict[str, list[str]]] = {f: {} for f in formats}
    with atomic_path(out) as built, tempfile.TemporaryDirectory() as scratch:
        built.mkdir(parents=True)
        roles = [(SEGMENTATION, run.weights)]
        if plan.uses_classifier:
            roles.append((PRESENCE, run.classifier_weights))
        for role, weights in roles:
            model = _build(config, run, role)
            for fold, path in enumerate(weights):
                name = f"{role}_fold{fold}"
                load_best_weights(model, path)
                keep = SAVEDMODEL in formats
                folder = (built if keep else Path(scratch)) / SAVEDMODEL / name
                save_savedmodel(model, folder)
                if keep:
                    networks[SAVEDMODEL].setdefault(role, []).append(f"{SAVEDMODEL}/{name}")
                if OPENVINO in formats:
                    save_openvino(folder, built / OPENVINO / f"{name}.xml")
                    networks[OPENVINO].setdefault(role, []).append(f"{OPENVINO}/{name}.xml")
                if ONNX in formats:
                    save_onnx(model, built / ONNX / f"{name}.onnx")
                    networks[ONNX].setdefault(role, []).append(f"{ONNX}/{name}.onnx")
                log.info("exported %s fold %d (%s)", role, fold, ", ".join(formats))
        shutil.copyfile(config.run_dir / POSTPROCESS, built / POSTPROCESS)
        write_runner(built / RUNNER, formats)
        manifest = _manifest(config, run, networks, built)
        write_json(built / MANIFEST, manifest)
    return {"bundle": str(out), "formats": formats, "folds": len(run.weights), **manifest["cv"]}


def _build(config: Config, run: TrainedRun, role: str) -> Any:
    n_classes = len(run.classes)
    if role == PRESENCE:
        return build_presence_model(config, n_classes)
    return build_prediction_model(config, n_classes)


def _manifest(
    config: Config, run: TrainedRun, networks: dict[str, dict[str, list[str]]], built: Path
) -> dict[str, Any]:
    plan = run.plan()
    fixed = config.data.image_size if config.model.architecture == "PSPNet" else None
    tuned = run.postprocess
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "foldseg": pipeline.__version__,
        "experiment": config.experiment,
        "plan": plan.to_dict(),
        "input": {**INPUT, "size": list(plan.input_size)},
        "fixed_input_size": list(fixed) if fixed else None,
        "id_style": "names" if any("." in i for i in run.image_ids[:50]) else "stems",
        "precision": str(config.predict.precision),
        "networks": networks,
        "folds": len(run.weights),
        "cv": {
            "oof_kaggle_dice_nested": tuned.nested,
            "oof_kaggle_dice_in_sample": tuned.score,
            "note": "out-of-fold Kaggle Dice of the tuned post-processing: nested (each fold "
            "scored with settings tuned on the others; honest) and in-sample (tuned and "
            "scored on the same images; optimistic)",
        },
        "config": json.loads(json.dumps(config.to_dict(), default=str)),
        "versions": {
            "python": platform.python_version(),
            **{name: package_version(name) for name in VERSIONED},
        },
        "members": list_members(built),
    }


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="the bundle folder to write")
    parser.add_argument(
        "--formats",
        default=",".join(DEFAULT_FORMATS),
        help=f"comma-separated network formats, of {list(NETWORK_FORMATS)} (default: %(default)s)",
    )
    add_force_argument(parser)


def _run(args: argparse.Namespace) -> int:
    formats = [f.strip() for f in str(args.formats).split(",") if f.strip()]
    result = export(config_from_args(args), args.out, formats, args.force)
    nested = result["oof_kaggle_dice_nested"]
    print(f"bundle: {result['bundle']} ({', '.join(result['formats'])}, {result['folds']} folds)")
    print(
        f"OOF Kaggle Dice: nested {'-' if nested is None else f'{nested:.4f}'}, in-sample "
        f"{result['oof_kaggle_dice_in_sample']:.4f}"
    )
    return 0


COMMAND = Command(
    stage="export",
    description=__doc__,
    add_arguments=_add_arguments,
    run=_run,
    examples=("--config configs/demo.yaml --out runs/demo/bundle",),
)

main = COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
