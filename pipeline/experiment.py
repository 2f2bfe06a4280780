"""What every stage of one experiment shares: its data table, split and run directory.

Orchestration layer: stages call these so that the split is made once (``folds.csv``)
and every stage reads the same images, classes and folds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import Config, save_config
from pipeline.folds import ensure_folds, fold_members
from pipeline.formats import MaskTable, read_masks
from pipeline.masks import rles_by_image

log = logging.getLogger(__name__)
# Bump when MaskTable or read_masks changes what a cached table holds.
MASK_CACHE_VERSION = 1


@dataclass(frozen=True)
class Experiment:
    """The training data and split of one experiment."""

    config: Config
    table: pd.DataFrame
    classes: list[str]
    layout: str
    image_ids: list[str]
    folds: pd.DataFrame

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
        if not 0 <= fold < self.n_folds:
            raise ValueError(f"fold must be in [0, {self.n_folds - 1}]; got {fold}")


def experiment_cache_dir(config: Config) -> Path:
    """``data.cache_dir``, or ``runs/<experiment>/cache``: decoded images, parsed tables."""
    configured = config.data.cache_dir
    return Path(configured) if configured else config.run_dir / "cache"


def read_masks_cached(config: Config) -> MaskTable:
    """``formats.read_masks`` of ``data.train_csv``, kept once validated.

    Parsing and validating every RLE of a Clouds-size CSV (120 MB) takes seconds, and
    every stage opens the experiment. The validated table is pickled under the cache
    directory, keyed by the file's path, size and modification time and the reading
    options; any change to them reads and validates the CSV again. An unreadable
    cache file is ignored and rewritten.
    """
    data = config.data
    path = Path(data.train_csv)
    options = {
        "layout": data.layout,
        "classes": data.classes,
        "instance_class": data.instance_class,
    }
    if not path.is_file():
        return read_masks(path, **options)  # its FileNotFoundError
    stat = path.stat()
    path_key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    state = json.dumps(
        [MASK_CACHE_VERSION, stat.st_size, stat.st_mtime_ns, options], sort_keys=True
    )
    cache = (
        experiment_cache_dir(config)
        / "masks"
        / f"{path_key}-{hashlib.sha1(state.encode()).hexdigest()[:16]}.pkl"
    )
    if cache.is_file():
        try:
            with cache.open("rb") as handle:
                cached = pickle.load(handle)
            if isinstance(cached, MaskTable):
                return cached
        except Exception as exc:  # a truncated or foreign file: read the CSV again
            log.warning("ignoring unreadable mask cache %s: %s", cache, exc)
    mask_table = read_masks(path, **options)
    cache.parent.mkdir(parents=True, exist_ok=True)
    for stale in cache.parent.glob(f"{path_key}-*.pkl"):
        stale.unlink(missing_ok=True)
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        pickle.dump(mask_table, handle, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, cache)
    return mask_table


def open_experiment(config: Config) -> Experiment:
    """Read the training table, make or reuse the split, save the merged config."""
    data = config.data
    mask_table = read_masks_cached(config)
    table = mask_table.table
    image_ids = sorted(table["image_id"].unique())
    if data.max_images is not None:
        image_ids = image_ids[: data.max_images]
        table = table[table["image_id"].isin(set(image_ids))].reset_index(drop=True)
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    folds = ensure_folds(
        run_dir / "folds.csv",
        table,
        mask_table.classes,
        n_splits=config.folds.n_splits,
        seed=config.seed,
        method=config.folds.method,
    )
    log.info(
        "experiment %s: %d images, classes %s, layout %s, %d folds",
        config.experiment,
        len(image_ids),
        mask_table.classes,
        mask_table.layout,
        config.folds.n_splits,
    )
    return Experiment(config, table, mask_table.classes, mask_table.layout, image_ids, folds)


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write JSON atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    os.replace(tmp, path)
    return path


def read_json(path: Path, hint: str = "") -> dict[str, Any]:
    """Read a JSON file a previous stage wrote; FileNotFoundError says which stage."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found{'; ' + hint if hint else ''}")
    return json.loads(path.read_text())
