"""What every stage of one experiment shares: its data table, split and run directory.

Orchestration layer: stages call these so that the split is made once (``folds.csv``)
and every stage reads the same images, classes and folds.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.core.atomic import write_text
from pipeline.core.config import Config
from pipeline.core.exclusive import is_exclusive, overlapping_pair
from pipeline.core.folds import ensure_folds, fold_members
from pipeline.core.formats import CANONICAL_COLUMNS, MaskTable, detect_csv_format
from pipeline.core.images import (
    IMAGE_EXTENSIONS,
    files_fingerprint,
    folder_image_ids,
    read_image_size,
    resolve_image_path,
)
from pipeline.core.layout import CACHE, FOLDS
from pipeline.core.mask_csv import read_masks
from pipeline.core.mask_folder import MaskOptions, list_mask_files, read_mask_folder
from pipeline.core.masks import rles_by_image
from pipeline.run.fold_records import check_fold_number

log = logging.getLogger(__name__)

# Bump when MaskTable or read_masks changes what a cached table holds.
MASK_CACHE_VERSION = 2


@dataclass(frozen=True)
class Experiment:
    """The training data and split of one experiment."""

    config: Config
    table: pd.DataFrame
    classes: list[str]
    csv_format: str
    image_ids: list[str]
    folds: pd.DataFrame
    data_key: str  # what the masks depend on (``data_key``): keys the decoded masks
    # image_id -> RLE of its void pixels (indexed/palette ignore_index/ignore_color): a
    # softmax model's loss and every score leave them out; "" or absent: none.
    void: dict[str, str] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir

    @property
    def n_folds(self) -> int:
        return int(self.config.folds.n_splits)

    @property
    def cache_dir(self) -> Path:
        return experiment_cache_dir(self.config)

    def rles(self) -> dict[str, list[str]]:
        """image_id -> per-class RLE ("" = empty), classes in order."""
        return rles_by_image(self.table, self.classes)

    def members(self, fold: int) -> tuple[list[str], list[str]]:
        """(training ids, validation ids) of ``fold``; ValueError outside the split."""
        return fold_members(self.folds, fold)

    def check_fold(self, fold: int) -> None:
        check_fold_number(self.config, fold)


def experiment_cache_dir(config: Config) -> Path:
    """``data.cache_dir``, or ``runs/<experiment>/cache``: decoded images, parsed tables."""
    configured = config.data.cache_dir
    return Path(configured) if configured else config.run_dir / CACHE


def file_sha256(path: Path, memo_dir: Path | None = None, remember: bool = False) -> str:
    """SHA-256 of a file's bytes, remembered by (path, size, mtime) under ``memo_dir``.

    The memo makes the common case (nothing changed) a ``stat``; any change of size or
    modification time hashes the bytes again, so an edit is never missed. The memo is
    written only with ``remember`` (once the file was read and validated).
    """
    stat = path.stat()
    stamp = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    memo = None
    if memo_dir is not None:
        name = hashlib.sha1(str(stamp["path"]).encode()).hexdigest()[:16]
        memo = memo_dir / f"{name}.sha256.json"
        try:
            saved = json.loads(memo.read_text())
            if saved.get("stamp") == stamp and isinstance(saved.get("sha256"), str):
                return str(saved["sha256"])
        except (OSError, ValueError, AttributeError):
            pass  # absent or damaged: hash again
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    sha = digest.hexdigest()
    if memo is not None and remember:
        write_text(memo, json.dumps({"stamp": stamp, "sha256": sha}))
    return sha


def mask_source(config: Config) -> str:
    """How messages name the experiment's masks: ``mask CSV '...'`` or ``mask folder '...'``."""
    data = config.data
    if data.masks is not None:
        return f"mask folder {str(data.masks)!r}"
    return f"mask CSV {str(data.train_csv)!r}"


def data_key(config: Config, image_ids: list[str]) -> str:
    """What the masks of an experiment depend on: the CSV's bytes (or the mask folder's
    files: names, sizes, modification times), the reading options (CSV format, mask
    format and maps, class order, instance class) and the image folder's files. The mask
    table cache and the decoded masks are keyed by it, so an edited CSV or mask,
    reordered classes or a replaced image invalidate both together."""
    data = config.data
    parts: dict[str, object] = {
        "version": MASK_CACHE_VERSION,
        # Keyed "layout", its name before data.csv_format: existing runs' caches stay valid.
        "layout": data.csv_format,
        "classes": data.classes,
        "instance_class": data.instance_class,
        "images": files_fingerprint(Path(data.train_images), image_ids),
    }
    if data.masks is not None:
        parts["masks"] = _mask_files_fingerprint(Path(data.masks))
        parts["mask_options"] = [
            data.mask_format,
            data.class_map,
            data.palette,
            data.ignore_index,
            data.ignore_color,
            data.sample_submission,
        ]
    else:
        parts["csv_sha256"] = file_sha256(
            Path(_train_csv(config)), experiment_cache_dir(config) / "masks"
        )
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _mask_files_fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in list_mask_files(folder):
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def _train_csv(config: Config) -> str:
    csv = config.data.train_csv
    assert csv is not None, "the schema gives exactly one of data.train_csv and data.masks"
    return csv


def mask_options(config: Config) -> MaskOptions:
    """The ``data`` keys that say how a mask folder is read."""
    data = config.data
    return MaskOptions(
        mask_format=data.mask_format,
        classes=data.classes,
        class_map=data.class_map,
        palette=data.palette,
        ignore_index=data.ignore_index,
        ignore_color=data.ignore_color,
        instance_class=data.instance_class,
    )


def read_training_masks(
    config: Config, known_images: list[str]
) -> tuple[MaskTable, dict[str, str]]:
    """The training masks over the folder's images, from ``data.train_csv`` or
    ``data.masks``, validated; (table, image_id -> RLE of void pixels)."""
    data = config.data
    if data.masks is None:
        mask_table = read_masks(
            _train_csv(config),
            csv_format=data.csv_format,
            classes=data.classes,
            instance_class=data.instance_class,
            known_images=known_images,
        )
        return mask_table, {}
    folder = Path(data.train_images)
    sizes = {
        image_id: read_image_size(resolve_image_path(folder, image_id)) for image_id in known_images
    }
    read = read_mask_folder(
        data.masks, sizes, mask_options(config), submission_csv_format(config), folder
    )
    log.info("%s: mask format %s", mask_source(config), read.mask_format)
    return read.masks, read.void


def submission_csv_format(config: Config) -> str:
    """The CSV format of the experiment's submissions: ``data.csv_format``; under auto,
    that of ``data.train_csv``'s header, else of the sample submission's, else
    ``image_label``."""
    data = config.data
    if data.csv_format != "auto":
        return str(data.csv_format)
    path = Path(data.train_csv if data.train_csv is not None else data.sample_submission or "")
    if data.train_csv is None and (data.sample_submission is None or not path.is_file()):
        return "image_label"
    try:
        columns = pd.read_csv(path, nrows=0).columns
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        key = "data.train_csv" if data.train_csv is not None else "data.sample_submission"
        raise FileNotFoundError(
            f"{key} {str(path)!r} cannot be read ({exc}); prediction needs its header for "
            "the submission's format (or set data.csv_format)"
        ) from None
    return detect_csv_format([str(column) for column in columns])


def read_masks_cached(
    config: Config, known_images: list[str], key: str
) -> tuple[MaskTable, dict[str, str]]:
    """``mask_csv.read_masks`` of ``data.train_csv`` over the folder's images, kept once
    validated.

    Parsing and validating every RLE of a Clouds-size CSV (120 MB) takes seconds, and
    every stage opens the experiment. The validated table is kept as JSON (never a
    pickle: opening someone else's run directory must not run code) under the cache
    directory, named by ``key`` (``data_key``). An unreadable file is ignored and
    rewritten.
    """
    data = config.data
    cache = experiment_cache_dir(config) / "masks" / f"table-{key}.json"
    if cache.is_file():
        cached = None
        try:
            saved = json.loads(cache.read_text())
            table = pd.DataFrame({name: saved[name] for name in CANONICAL_COLUMNS}, dtype=str)
            void = {str(k): str(v) for k, v in dict(saved.get("void", {})).items()}
            cached = MaskTable(
                table=table, classes=list(saved["classes"]), csv_format=saved["layout"]
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable mask table cache %s: %s", cache, exc)
        if cached is not None:
            if is_exclusive(config.model.activation):
                check_exclusive(config, cached.table, cached.classes)
            return cached, void
    mask_table, void = read_training_masks(config, known_images)
    _check_has_masks(config, mask_table.table, len(known_images))
    if is_exclusive(config.model.activation):  # before anything is written
        check_exclusive(config, mask_table.table, mask_table.classes)
    if data.train_csv is not None:
        file_sha256(Path(data.train_csv), cache.parent, remember=True)
    for stale in cache.parent.glob("table-*.json"):
        stale.unlink(missing_ok=True)
    saved = {
        "classes": mask_table.classes,
        "layout": mask_table.csv_format,  # the name data_key's parts keep too
        "void": void,  # indexed/palette void pixels (out of softmax's loss and scores)
        **{name: mask_table.table[name].tolist() for name in CANONICAL_COLUMNS},
    }
    write_text(cache, json.dumps(saved))
    return mask_table, void


def dataset_image_ids(config: Config) -> list[str]:
    """The images of ``data.train_images``, spelled as ``data.train_csv`` names them (for
    a mask folder: as the sample submission does, else by file stem).

    Raises:
        FileNotFoundError: the CSV, the mask folder or the image folder is missing.
        ValueError: the folder holds no image.
    """
    data = config.data
    if data.masks is not None:
        if not Path(data.masks).is_dir():
            raise FileNotFoundError(f"data.masks {str(data.masks)!r} is not a folder")
        sample = Path(data.sample_submission) if data.sample_submission else None
        csv_ids = _csv_image_ids(sample) if sample is not None and sample.is_file() else []
    else:
        csv = Path(_train_csv(config))
        if not csv.is_file():
            raise FileNotFoundError(f"data.train_csv {str(csv)!r} does not exist")
        csv_ids = _csv_image_ids(csv)
    ids = folder_image_ids(data.train_images, csv_ids)
    if not ids:
        raise ValueError(
            f"data.train_images folder {str(data.train_images)!r} holds no image files "
            f"({', '.join(IMAGE_EXTENSIONS)})"
        )
    return ids


def _csv_image_ids(csv: Path, limit: int = 1000) -> list[str]:
    """The image ids of the CSV's first ``limit`` rows (enough to see how it spells them)."""
    try:
        head = pd.read_csv(csv, dtype=str, keep_default_na=False, nrows=limit)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return []  # read_masks names the problem with its row
    for column in ("ImageId", "Image_Label", "ImageId_ClassId"):
        if column in head.columns:
            values = head[column].tolist()
            return values if column == "ImageId" else [v.rpartition("_")[0] for v in values]
    return []


def open_experiment(config: Config) -> Experiment:
    """Read the training table, make or reuse the split, save the merged config.

    The data set is every image of ``data.train_images``; the CSV gives their masks (an
    image without rows has empty masks) and a row naming another image is an error.
    """
    data = config.data
    if is_exclusive(config.model.activation) and config.tta.merge != "mean":
        # The stores keep a softmax's C class probabilities and the background is what
        # they leave (1 - sum): only a mean of distributions is still one.
        raise ValueError(
            f"tta.merge {config.tta.merge!r} does not apply to model.activation softmax: its "
            "class probabilities are merged by their mean; set tta.merge: mean"
        )
    folder_ids = dataset_image_ids(config)
    key = data_key(config, folder_ids)
    mask_table, void = read_masks_cached(config, folder_ids, key)
    table = mask_table.table
    image_ids = sorted(table["image_id"].unique())
    if data.max_images is not None:
        image_ids = image_ids[: data.max_images]
        table = table[table["image_id"].isin(set(image_ids))].reset_index(drop=True)
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    folds = ensure_folds(
        run_dir / FOLDS,
        table,
        mask_table.classes,
        n_splits=config.folds.n_splits,
        seed=config.seed,
        method=config.folds.method,
    )
    log_data_set(config, table, mask_table.classes, mask_table.csv_format)
    kept = set(image_ids)
    return Experiment(
        config,
        table,
        mask_table.classes,
        mask_table.csv_format,
        image_ids,
        folds,
        key,
        {image_id: rle for image_id, rle in void.items() if rle and image_id in kept},
    )


def check_exclusive(config: Config, table: pd.DataFrame, classes: list[str]) -> None:
    """``model.activation: softmax`` needs one class per pixel: a ValueError naming the
    first image whose masks of two classes share a pixel."""
    for image_id, rles in rles_by_image(table, classes).items():
        pair = overlapping_pair(rles, f"{mask_source(config)}, image {image_id!r}")
        if pair is not None:
            raise ValueError(
                f"{mask_source(config)}: image {image_id!r} has pixels in both class "
                f"{classes[pair[0]]!r} and class {classes[pair[1]]!r}; model.activation: "
                "softmax needs mutually exclusive classes (one class per pixel); use "
                "model.activation: sigmoid for overlapping masks"
            )


def _check_has_masks(config: Config, table: pd.DataFrame, n_images: int) -> None:
    """Masks without a single foreground pixel (a CSV of a header only, or every row
    empty; a folder of blank masks) are an error."""
    non_empty = table["rle"] != ""
    if not non_empty.any():
        raise ValueError(
            f"{mask_source(config)} gives no mask for any of the "
            f"{n_images} images of {str(config.data.train_images)!r} "
            f"(header only, every EncodedPixels empty, or every mask blank); expected at "
            "least one mask"
        )


def log_data_set(config: Config, table: pd.DataFrame, classes: list[str], csv_format: str) -> None:
    """Images on disk, with and without any mask, and images per class."""
    non_empty = table["rle"] != ""
    with_mask = table.loc[non_empty, "image_id"].nunique()
    n_images = table["image_id"].nunique()
    per_class = table.loc[non_empty, "class_name"].value_counts()
    log.info(
        "experiment %s: %d images in %s (%d with a mask, %d without any), CSV format %s, "
        "%d folds; images per class %s",
        config.experiment,
        n_images,
        config.data.train_images,
        with_mask,
        n_images - with_mask,
        csv_format,
        config.folds.n_splits,
        {name: int(per_class.get(name, 0)) for name in classes},
    )
    absent = [name for name in classes if per_class.get(name, 0) == 0]
    if absent:
        log.warning(
            "class(es) %s have no mask in any image of %s: the model cannot learn them",
            absent,
            mask_source(config),
        )


def read_pseudo_labels(config: Config, exp: Experiment) -> MaskTable:
    """The table of ``data.pseudo_labels`` (``image_label`` format, as
    ``python -m pipeline.pseudo_label`` writes it), checked: a readable file with at
    least one image, none of them a training image."""
    if config.data.pseudo_labels is None:
        raise ValueError("data.pseudo_labels is null: there is no pseudo-label table to read")
    path = Path(config.data.pseudo_labels)
    if not path.is_file():
        raise FileNotFoundError(f"data.pseudo_labels {str(path)!r} is not a file")
    table = read_masks(path, csv_format="image_label", classes=exp.classes)
    ids = set(table.table["image_id"])
    if not ids:
        raise ValueError(f"data.pseudo_labels {str(path)!r} labels no image")
    overlap = sorted(ids & set(exp.image_ids))
    if overlap:
        raise ValueError(
            f"data.pseudo_labels {str(path)!r} labels training images ({overlap[:3]}): "
            "pseudo-labels must come from images outside the training set"
        )
    return table
