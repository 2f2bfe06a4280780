"""What a run records per fold, and the checks stages make on it before writing anything.

- a fold is finished once its ``metrics.json`` exists (it is written last);
- each fold keeps the config it was trained with (``fold_K/config.yaml``); a later
  stage whose settings changed one of ``TRAINED_KEYS`` is refused (``--force`` retrains).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.core.commands import command_line
from pipeline.core.config import Config, read_run_config, save_config
from pipeline.core.layout import CLASSIFIER_STAGE, FOLD_METRICS, TRAINED_CONFIG
from pipeline.run.json_files import read_json

log = logging.getLogger(__name__)


# The config a fold was trained with, in its fold directory (and the latest training
# command's at the run's top): later stages compare theirs with it.
# The keys whose change makes a trained fold another experiment: what the data is, how
# it is split and sized, and the network. Other keys (TTA, post-processing grids,
# energy, ...) may change between stages.
TRAINED_KEYS: tuple[str, ...] = (
    "seed",
    "framework",
    "data.train_csv",
    "data.train_images",
    "data.csv_format",
    "data.masks",
    "data.mask_format",
    "data.class_map",
    "data.palette",
    "data.ignore_index",
    "data.ignore_color",
    "data.classes",
    "data.instance_class",
    "data.image_size",
    "data.max_images",
    "folds",
    "model",
    "train.bn_recalibration",
)

CLASSIFIER_KEYS: tuple[str, ...] = (
    "classifier.backbone",
    "classifier.image_size",
    "classifier.pooling",
    "classifier.multiscale_pooling",
)

_PATH_KEYS = ("data.train_csv", "data.masks", "data.train_images")


def check_fold_number(config: Config, fold: int) -> None:
    """``fold`` in ``[0, folds.n_splits - 1]``; checked before anything is written."""
    n_folds = int(config.folds.n_splits)
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold must be in [0, {n_folds - 1}]; got {fold}")


def check_folds_finished(config: Config) -> None:
    """Every segmentation fold has finished (its ``metrics.json`` exists); checked by
    the stages that read the folds before they open or write anything.

    Raises:
        FileNotFoundError: naming the first unfinished fold and the command that makes it.
    """
    for fold in range(int(config.folds.n_splits)):
        metrics = config.fold_dir(fold) / FOLD_METRICS
        if not metrics.is_file():
            raise FileNotFoundError(
                f"segmentation fold {fold} is not finished: {metrics} does not exist; make "
                f"it with `{command_line('train', f'--fold {fold}', config=config.source)}` "
                "(with the same --set overrides)"
            )


def record_trained_config(config: Config, fold_dir: Path) -> None:
    """Keep the config a fold is trained with (and the run's latest one at its top)."""
    save_config(config, fold_dir / TRAINED_CONFIG)
    save_config(config, config.run_dir / TRAINED_CONFIG)


def _walk(data: dict[str, Any], dotted: str) -> Any:
    """The value of the dotted key (a path key resolved to an absolute path)."""
    value: Any = data
    for part in dotted.split("."):
        value = value[part]
    if dotted in _PATH_KEYS and isinstance(value, str):
        return str(Path(value).resolve())
    return value


def _leaf_differences(key: str, old: Any, new: Any) -> dict[str, tuple[Any, Any]]:
    """Differing leaves under ``key`` (a section is compared key by key)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: dict[str, tuple[Any, Any]] = {}
        for name in sorted(set(old) | set(new)):
            out.update(_leaf_differences(f"{key}.{name}", old.get(name), new.get(name)))
        return out
    return {} if old == new else {key: (old, new)}


def trained_config_differences(config: Config) -> list[str]:
    """Every key that matters (``TRAINED_KEYS``; ``CLASSIFIER_KEYS`` for classifier
    folds) whose value differs from a trained fold's recorded config: one line each,
    naming the key, the fold's file, its value then and now. A fold recorded by an
    earlier version is read as that version meant it (``config.read_run_config``: keys
    renamed since are migrated, keys added since had their defaults)."""
    now = config.to_dict()
    lines = []
    for stage, keys in (("", TRAINED_KEYS), (CLASSIFIER_STAGE, TRAINED_KEYS + CLASSIFIER_KEYS)):
        for fold in range(config.folds.n_splits):
            path = config.fold_dir(fold, stage) / TRAINED_CONFIG
            if not path.is_file():
                continue
            then = read_run_config(path).to_dict()
            for key in keys:
                old, new = _walk(then, key), _walk(now, key)
                for leaf, (was, is_now) in _leaf_differences(key, old, new).items():
                    lines.append(f"{leaf}: {was!r} in {path}, {is_now!r} now")
    return lines


def check_trained_config(config: Config, force: bool = False) -> None:
    """Stop when this config differs from the one the folds were trained with in a key
    that matters (``trained_config_differences``); with ``force`` only warn."""
    lines = trained_config_differences(config)
    if not lines:
        return
    shown = "\n  ".join(lines[:12]) + (f"\n  ... {len(lines) - 12} more" if len(lines) > 12 else "")
    if force:
        log.warning("going on (--force) although the folds were trained otherwise:\n  %s", shown)
        return
    raise ValueError(
        f"this config differs from the one the folds of {config.run_dir} were trained "
        f"with:\n  {shown}\nuse the training config, retrain, or pass --force to go on"
    )


def is_finished(fold_dir: Path) -> bool:
    """A fold is finished once its ``metrics.json`` exists (it is written last)."""
    return (fold_dir / FOLD_METRICS).is_file()


def read_fold_metrics(fold_dir: Path, command: str = "") -> dict[str, Any]:
    """A finished fold's ``metrics.json``; ``command`` trains it (for the message)."""
    command = command or command_line("train")
    return read_json(fold_dir / FOLD_METRICS, f"train the fold (again, with --force): {command}")
