"""What every stage of one experiment shares: its data table, split and run directory.

Orchestration layer: stages call these so that the split is made once (``folds.csv``)
and every stage reads the same images, classes and folds.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.core.atomic import write_text
from pipeline.core.config import Config
from pipeline.core.folds import ensure_folds, fold_members
from pipeline.core.formats import CANONICAL_COLUMNS, MaskTable
from pipeline.core.images import IMAGE_EXTENSIONS, files_fingerprint, folder_image_ids
from pipeline.core.layout import CACHE, FOLDS
from pipeline.core.mask_csv import read_masks
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


def data_key(config: Config, image_ids: list[str]) -> str:
    """What the masks of an experiment depend on: the CSV's bytes, the reading options
    (CSV format, class order, instance class) and the image folder's files (names, sizes,
    modification times). The mask table cache and the decoded masks are keyed by it,
    so an edited CSV, reordered classes or a replaced image invalidate both together."""
    data = config.data
    csv = Path(data.train_csv)
    parts = {
        "version": MASK_CACHE_VERSION,
        "csv_sha256": file_sha256(csv, experiment_cache_dir(config) / "masks"),
        # Keyed "layout", its name before data.csv_format: existing runs' caches stay valid.
        "layout": data.csv_format,
        "classes": data.classes,
        "instance_class": data.instance_class,
        "images": files_fingerprint(Path(data.train_images), image_ids),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def read_masks_cached(config: Config, known_images: list[str], key: str) -> MaskTable:
    """``mask_csv.read_masks`` of ``data.train_csv`` over the folder's images, kept once
    validated.

    Parsing and validating every RLE of a Clouds-size CSV (120 MB) takes seconds, and
    every stage opens the experiment. The validated table is kept as JSON (never a
    pickle: opening someone else's run directory must not run code) under the cache
    directory, named by ``key`` (``data_key``). An unreadable file is ignored and
    rewritten.
    """
    data = config.data
    path = Path(data.train_csv)
    cache = experiment_cache_dir(config) / "masks" / f"table-{key}.json"
    if cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            table = pd.DataFrame({name: saved[name] for name in CANONICAL_COLUMNS}, dtype=str)
            return MaskTable(
                table=table, classes=list(saved["classes"]), csv_format=saved["layout"]
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable mask table cache %s: %s", cache, exc)
    mask_table = read_masks(
        path,
        csv_format=data.csv_format,
        classes=data.classes,
        instance_class=data.instance_class,
        known_images=known_images,
    )
    _check_has_masks(config, mask_table.table, len(known_images))
    file_sha256(path, cache.parent, remember=True)
    for stale in cache.parent.glob("table-*.json"):
        stale.unlink(missing_ok=True)
    saved = {
        "classes": mask_table.classes,
        "layout": mask_table.csv_format,  # the name data_key's parts keep too
        **{name: mask_table.table[name].tolist() for name in CANONICAL_COLUMNS},
    }
    write_text(cache, json.dumps(saved))
    return mask_table


def dataset_image_ids(config: Config) -> list[str]:
    """The images of ``data.train_images``, spelled as ``data.train_csv`` names them.

    Raises:
        FileNotFoundError: the CSV or the folder is missing.
        ValueError: the folder holds no image.
    """
    data = config.data
    csv = Path(data.train_csv)
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
    folder_ids = dataset_image_ids(config)
    key = data_key(config, folder_ids)
    mask_table = read_masks_cached(config, folder_ids, key)
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
    return Experiment(
        config, table, mask_table.classes, mask_table.csv_format, image_ids, folds, key
    )


def _check_has_masks(config: Config, table: pd.DataFrame, n_images: int) -> None:
    """A CSV without a single mask (header only, or every row empty) is an error."""
    non_empty = table["rle"] != ""
    if not non_empty.any():
        raise ValueError(
            f"mask CSV {str(config.data.train_csv)!r} gives no mask for any of the "
            f"{n_images} images of {str(config.data.train_images)!r} "
            f"(header only, or every EncodedPixels empty); expected at least one mask row"
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
            config.data.train_csv,
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
