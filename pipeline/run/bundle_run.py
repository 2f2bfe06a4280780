"""Run an exported bundle on a folder of images (pure run layer: never imports
TensorFlow for a framework-free bundle).

``run_bundle`` checks the bundle (``core.bundle.read_manifest``: members, checksums,
format), the folder (every image decoded before anything is written: an unreadable
image, one of an unsupported channel count, an empty folder, a sample submission naming
images the folder lacks are each bad input naming the file) and the outputs (none may be
an existing file), then predicts with the same code as ``pipeline.predict``
(``run.predictor.Predictor``: TTA, fold merge, post-processing, RLE) on one engine of
``run.runtime_engines`` (or ``run.savedmodel_engine``) and writes:

- ``out``: a validated Kaggle submission in the manifest's layout (rows in a sample
  submission's order when one is given), scored against ``truth`` when given;
- ``masks``: one PNG per image and class (``<masks>/<class>/<image stem>.png``, 0 or
  255) at each image's own size, whatever the sizes in the folder;
- ``overlays``: each image with its masks drawn over it (``<overlays>/<image stem>.png``).

Folders are built under a temporary name and renamed whole, so a failed run leaves
nothing half-written. ``main`` is the standalone entry the bundle's own ``runner/``
copy runs (``python runner/run_bundle.py ...``), with exit code 2 for bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.core import submission, submission_check
from pipeline.core.atomic import atomic_path
from pipeline.core.bundle import (
    ONNX,
    OPENVINO,
    PRESENCE,
    SAVEDMODEL,
    SEGMENTATION,
    Manifest,
    read_manifest,
)
from pipeline.core.clock import StageClock
from pipeline.core.fold_merge import FoldAccumulator
from pipeline.core.images import (
    IMAGE_CHANNELS,
    IMAGE_EXTENSIONS,
    folder_image_ids,
    missing_images,
    read_image,
    resize_image,
    resolve_image_path,
)
from pipeline.core.layout import FOLD_MERGE
from pipeline.core.mask_csv import read_masks
from pipeline.core.precision import ENGINE_CHOICES, PRECISIONS, choose_precision, cpu_flags
from pipeline.run.predictor import Predictor
from pipeline.run.runtime_engines import (
    ONNXRUNTIME,
    TENSORFLOW,
    OnnxNetworks,
    OpenVinoNetworks,
    choose_engine,
    exported_precision,
)
from pipeline.run.runtime_engines import (
    OPENVINO as OPENVINO_ENGINE,
)
from pipeline.run.savedmodel_engine import SavedModelNetworks

log = logging.getLogger(__name__)

# The engine that runs each network format.
ENGINE_OF_FORMAT = {OPENVINO: OPENVINO_ENGINE, ONNX: ONNXRUNTIME, SAVEDMODEL: TENSORFLOW}
# Overlay colours (BGR) by class index, and how strongly a mask tints its pixels.
PALETTE = ((0, 0, 255), (0, 255, 0), (255, 0, 0), (0, 255, 255), (255, 0, 255), (255, 255, 0))
OVERLAY_ALPHA = 0.45


class FolderImages:
    """A folder's images decoded once and resized to the network's size (``ImageSet``)."""

    def __init__(
        self,
        folder: Path,
        image_ids: Sequence[str],
        size: tuple[int, int],
        channels: Sequence[int] = IMAGE_CHANNELS,
    ) -> None:
        self.folder = folder
        self.channels = tuple(channels)
        self.image_ids = list(image_ids)
        self.paths = [resolve_image_path(folder, image_id) for image_id in image_ids]
        self.images = np.empty((len(image_ids), *size, 3), dtype=np.uint8)
        sizes = []
        for i, path in enumerate(self.paths):
            # names the file when it cannot be read or decoded, or has another channel count
            image = read_image(path, self.channels)
            sizes.append(image.shape[:2])
            self.images[i] = resize_image(image, size)
        self.original_sizes = np.array(sizes, dtype=np.int64).reshape(-1, 2)

    def resized(self, size: tuple[int, int]) -> np.ndarray:
        """Every image at another size (the presence classifier's)."""
        return np.stack([resize_image(read_image(p, self.channels), size) for p in self.paths])


def list_folder_images(
    folder: Path, manifest: Manifest, sample_submission: Path | None
) -> list[str]:
    """The images to predict: those a sample submission lists (each must be in the
    folder), else every image file of the folder, spelled as the run spelled its ids."""
    if not folder.is_dir():
        what = "a file, not a folder" if folder.exists() else "not found"
        raise FileNotFoundError(f"image folder {str(folder)!r} is {what}")
    plan = manifest.plan
    if sample_submission is not None:
        sample = read_masks(sample_submission, csv_format=plan.csv_format, classes=plan.classes)
        ids = sorted(sample.table["image_id"].unique())
        missing = missing_images(folder, ids)
        if missing:
            raise FileNotFoundError(
                f"sample submission {str(sample_submission)!r} lists {len(missing)} image(s) "
                f"that the folder {str(folder)!r} lacks, e.g. {missing[:3]}"
            )
        return ids
    style = ["x.png"] if manifest.id_style == "names" else ["x"]
    ids = folder_image_ids(folder, style)
    if not ids:
        raise FileNotFoundError(
            f"image folder {str(folder)!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return ids


def check_outputs(out: Path | None, masks: Path | None, overlays: Path | None) -> None:
    """None of the outputs may be an existing file (nor a non-empty folder); overlays
    need masks."""
    if overlays is not None and masks is None:
        raise ValueError("--overlays needs --masks")
    check_output(out, "submission", folder=False)
    check_output(masks, "mask folder", folder=True)
    check_output(overlays, "overlay folder", folder=True)


def check_output(path: Path | None, what: str, folder: bool) -> None:
    """``path`` is new (or, for a ``folder``, an empty folder); else FileExistsError."""
    if path is None:
        return
    if folder and path.is_dir() and not any(path.iterdir()):
        return
    if path.exists():
        kind = "an existing file" if path.is_file() else "an existing, non-empty folder"
        raise FileExistsError(f"{what} {str(path)!r} is {kind}; name a new path")


def build_engines(
    manifest: Manifest, engine: str, precision: str
) -> tuple[str, str, Any, Any | None]:
    """(engine, precision computed in, segmentation engine, presence engine or None) for a
    bundle."""
    offered = [ENGINE_OF_FORMAT[f] for f in manifest.formats]
    resolved = choose_precision(precision, cpu_flags())
    chosen = choose_engine(engine, offered, resolved)
    if chosen not in offered:
        raise ValueError(
            f"bundle {str(manifest.folder)!r} holds {manifest.formats}, which engine "
            f"{chosen!r} does not run"
        )
    network_format = next(f for f in manifest.formats if ENGINE_OF_FORMAT[f] == chosen)
    fixed = manifest.data.get("fixed_input_size")
    fixed_size = (int(fixed[0]), int(fixed[1])) if fixed else None
    needs_presence = manifest.plan.uses_classifier

    def engine_of(role: str, presence: bool) -> Any:
        paths = manifest.paths(network_format, role)
        if chosen == OPENVINO_ENGINE:
            return OpenVinoNetworks(paths, resolved, presence, fixed_size)
        if chosen == ONNXRUNTIME:
            return OnnxNetworks(paths, presence, fixed_size)
        return SavedModelNetworks(paths, presence, fixed_size)

    segmentation = engine_of(SEGMENTATION, False)
    presence = engine_of(PRESENCE, True) if needs_presence else None
    return chosen, exported_precision(chosen, resolved), segmentation, presence


def run_bundle(
    bundle: Path,
    images: Path,
    out: Path | None = None,
    masks: Path | None = None,
    overlays: Path | None = None,
    sample_submission: Path | None = None,
    truth: Path | None = None,
    engine: str = "auto",
    precision: str = "auto",
) -> dict[str, Any]:
    """Predict a folder of images with a bundle; see the module docstring."""
    started = time.perf_counter()
    if out is None and masks is None:
        raise ValueError("name at least one output: --out (a submission) or --masks (a folder)")
    check_outputs(out, masks, overlays)
    manifest = read_manifest(bundle)
    plan = manifest.plan
    image_ids = list_folder_images(images, manifest, sample_submission)
    truth_frame = submission_check.read_submission(truth) if truth is not None else None
    clock = StageClock()
    with clock.stage("read_images"):
        folder = FolderImages(images, image_ids, plan.input_size, manifest.image_channels)
    chosen, resolved, segmentation, presence_engine = build_engines(manifest, engine, precision)
    log.info("engine %s in %s; %d images", chosen, resolved, len(image_ids))
    predictor = Predictor(plan, segmentation, presence_engine)
    gate = None
    if presence_engine is not None:
        assert plan.presence_size is not None, "a classifier-gated plan has presence_size"
        gate = predictor.predict_presence(folder.resized(plan.presence_size), clock)
    shape = (len(image_ids), *plan.input_size, len(plan.classes))
    with tempfile.TemporaryDirectory(prefix="foldseg-bundle-") as work:
        accumulator = FoldAccumulator(
            Path(work) / FOLD_MERGE, shape, segmentation.n_folds, plan.merge
        )
        try:
            head = predictor.predict_probs(folder.images, accumulator, clock)
            if plan.gate_source == "head":
                gate = head
            writer = MaskWriter(folder.paths, folder.original_sizes, plan.classes, masks, overlays)
            with writer as on_masks:
                with clock.stage("postprocess"):
                    table = predictor.encode(
                        image_ids, folder.original_sizes, accumulator, gate, on_masks=on_masks
                    )
                result: dict[str, Any] = {}
                if out is not None:
                    with clock.stage("write"):
                        result = _write_submission(
                            manifest, table, image_ids, folder, out, sample_submission, truth_frame
                        )
        finally:
            accumulator.close()
    result.update(
        {
            "engine": chosen,
            "precision": resolved,
            "n_images": len(image_ids),
            "masks": None if masks is None else str(masks),
            "overlays": None if overlays is None else str(overlays),
            "seconds": round(time.perf_counter() - started, 3),
            "stage_seconds": {k: round(v, 3) for k, v in clock.seconds.items()},
        }
    )
    return result


class MaskWriter:
    """Writes each image's masks (``<masks>/<class>/<stem>.png``, 0 or 255, at the image's
    own size) and overlay (``<overlays>/<stem>.png``) into folders built under temporary
    names, renamed into place when the block ends without an error (``pipeline.predict``
    writes its folder masks with it too). Entered, it gives ``on_masks(i, masks)`` for
    ``Predictor.encode``, or None when no folder is asked for."""

    def __init__(
        self,
        paths: Sequence[Path],
        original_sizes: np.ndarray,
        classes: Sequence[str],
        masks: Path | None,
        overlays: Path | None,
    ) -> None:
        self.paths, self.original_sizes, self.classes = list(paths), original_sizes, list(classes)
        self.targets = [p for p in (masks, overlays) if p is not None]
        self.overlays = overlays is not None
        self._contexts: list[Any] = []
        self._dirs: list[Path] = []

    def __enter__(self) -> Callable[[int, np.ndarray], None] | None:
        if not self.targets:
            return None
        for target in self.targets:
            context = atomic_path(target)
            self._dirs.append(context.__enter__())
            self._contexts.append(context)
            self._dirs[-1].mkdir(parents=True)
        return self.write

    def write(self, i: int, masks: np.ndarray) -> None:
        """Image ``i``'s masks (C, h, w) {0, 1} at any size, resized to its own."""
        height, width = (int(v) for v in self.original_sizes[i])
        stem = Path(self.paths[i].name).stem
        full = [
            cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST) for mask in masks
        ]
        for name, mask in zip(self.classes, full, strict=True):
            path = self._dirs[0] / name / f"{stem}.png"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(_png(mask * np.uint8(255)))
        if self.overlays:
            image = cv2.cvtColor(read_image(self.paths[i]), cv2.COLOR_RGB2BGR)
            tint = image.copy()
            for k, mask in enumerate(full):
                tint[mask > 0] = PALETTE[k % len(PALETTE)]
            blended = cv2.addWeighted(image, 1 - OVERLAY_ALPHA, tint, OVERLAY_ALPHA, 0)
            (self._dirs[1] / f"{stem}.png").write_bytes(_png(blended))

    def __exit__(self, *exc: Any) -> None:
        for context in reversed(self._contexts):
            context.__exit__(*exc)


def _png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image)
    assert ok, "PNG encoding of a uint8 image succeeds"
    return bytes(data.tobytes())


def _write_submission(
    manifest: Manifest,
    table: Any,
    image_ids: Sequence[str],
    folder: FolderImages,
    out: Path,
    sample_submission: Path | None,
    truth: Any,
) -> dict[str, Any]:
    plan = manifest.plan
    sample = (
        submission_check.read_submission(sample_submission)
        if sample_submission is not None
        else None
    )
    classes = list(plan.classes)
    frame = submission.make_submission_frame(table, plan.csv_format, classes, sample)
    shapes: submission.Shapes = plan.submission_size or {
        image_id: (int(h), int(w))
        for image_id, (h, w) in zip(image_ids, folder.original_sizes, strict=True)
    }
    if plan.csv_format == "instances":
        frame = submission.split_instances(frame, shapes)
    score = None
    if truth is not None:
        scored = submission.score_submission(
            frame, truth, plan.csv_format, classes, shapes, "predictions", "truth"
        )
        score = scored["overall"]
    submission.write_submission_file(frame, out, plan.csv_format, classes, image_ids, shapes)
    return {"submission": str(out), "test_score": score}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The runner's options (the ``run-bundle`` stage and the standalone entry)."""
    parser.add_argument("--bundle", type=Path, required=True, help="the exported bundle folder")
    parser.add_argument("--images", type=Path, required=True, help="the folder of images")
    parser.add_argument("--out", type=Path, help="write a validated submission CSV here")
    parser.add_argument(
        "--masks", type=Path, help="write one PNG per image and class here, at each image's size"
    )
    parser.add_argument("--overlays", type=Path, help="write each image with its masks drawn")
    parser.add_argument(
        "--sample-submission", type=Path, help="lay rows out as this CSV (its images only)"
    )
    parser.add_argument("--truth", type=Path, help="score the submission against this CSV")
    parser.add_argument(
        "--engine",
        choices=ENGINE_CHOICES,
        default="auto",
        help="runtime (auto: of those installed that the bundle holds a network for, "
        "OpenVINO, then TensorFlow in float32 or onnxruntime in bfloat16, then the other)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: bfloat16 where the CPU computes it natively, else float32",
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run parsed ``add_arguments`` options; print what was written."""
    result = run_bundle(
        args.bundle,
        args.images,
        args.out,
        args.masks,
        args.overlays,
        args.sample_submission,
        args.truth,
        args.engine,
        args.precision,
    )
    if result.get("submission"):
        print(f"submission: {result['submission']}")
    if result.get("test_score") is not None:
        print(f"test Kaggle Dice: {result['test_score']:.4f}")
    if result["masks"]:
        print(f"masks: {result['masks']}")
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in result["stage_seconds"].items())
    print(
        f"{result['n_images']} images in {result['seconds']:.1f}s on {result['engine']} "
        f"({result['precision']}; {stages})"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The standalone entry (``runner/run_bundle.py`` in a bundle): exit 2 on bad input."""
    parser = argparse.ArgumentParser(prog="run_bundle.py", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return run_from_args(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
