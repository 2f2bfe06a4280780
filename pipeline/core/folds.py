"""The cross-validation split: made once per experiment, saved, and reused by every stage.

The split is a pure function of the image ids (sorted, so row order never matters),
their per-class presence labels, ``n_splits``, ``seed`` and ``method``. It is written to
``runs/<experiment>/folds.csv`` the first time and every later stage reads that file,
so training, tuning and evaluation all see the same out-of-fold images.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pandas as pd

from pipeline.core.atomic import write_csv
from pipeline.core.commands import command_line

logger = logging.getLogger(__name__)

FoldMethod = Literal["multilabel_stratified", "kfold"]
FOLD_METHODS: tuple[str, ...] = get_args(FoldMethod)
NO_MASK_COLUMN = "no_mask"
_TABLE_COLUMNS = ("image_id", "class_name", "rle")
_FOLD_COLUMNS = ["image_id", "fold"]


def classifier_skip_reason(table: pd.DataFrame, classes: Sequence[str]) -> str | None:
    """Why a presence classifier has nothing to learn, or None when it has.

    A class present in every image (DSB 2018's nuclei), or in none, has one label
    everywhere: its AUC is undefined and a gate on it can only remove true masks. When
    every class is like that the classifier is skipped.
    """
    presence = presence_matrix(table, classes)
    constant = {
        name: ("every" if bool(presence[name].all()) else "no")
        for name in classes
        if presence[name].nunique() <= 1
    }
    if len(constant) < len(classes):
        return None
    described = ", ".join(f"{name!r} in {where} image" for name, where in constant.items())
    return f"presence is the same in all {len(presence)} images ({described}): nothing to learn"


def presence_matrix(table: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Per-image class presence from the canonical mask table.

    Args:
        table: columns ``image_id``, ``class_name``, ``rle`` (``""`` or NaN = empty mask);
            an (image, class) pair with no row counts as absent.
        classes: the data set's class names, in column order.

    Returns:
        One row per ``image_id`` (sorted ascending, as the ``image_id`` column), one bool
        column per class (True where that class has a non-empty mask) and a bool column
        ``no_mask`` (True where no class is present).
    """
    missing = [c for c in _TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(
            f"table must have columns {list(_TABLE_COLUMNS)}; missing {missing} "
            f"(got {list(table.columns)})"
        )
    classes = list(classes)
    if not classes:
        raise ValueError("classes must name at least one class; got []")
    if NO_MASK_COLUMN in classes:
        raise ValueError(f"classes must not contain the reserved name {NO_MASK_COLUMN!r}")
    unknown = sorted(set(table["class_name"].astype(str)) - set(classes))
    if unknown:
        raise ValueError(f"table.class_name must be one of {classes}; got {unknown}")

    ids = table["image_id"].astype(str).to_numpy()
    image_ids = np.unique(ids)
    rle = table["rle"]
    text = rle.where(rle.notna(), "").astype(str)
    # No strip: it would copy every (long) string; isspace stops at the first digit.
    nonempty = ((text.str.len() > 0) & ~text.str.isspace()).to_numpy(bool)
    rows = np.searchsorted(image_ids, ids[nonempty])
    names = pd.Index(table["class_name"].astype(str).to_numpy()[nonempty])
    cols = pd.Index(classes).get_indexer(names)
    matrix = np.zeros((len(image_ids), len(classes)), dtype=bool)
    matrix[rows, cols] = True
    presence = pd.DataFrame(matrix, index=pd.Index(image_ids, name="image_id"), columns=classes)
    presence[NO_MASK_COLUMN] = pd.Series(~matrix.any(axis=1), index=presence.index)
    return presence.reset_index()


def make_folds(
    image_ids: Sequence[str],
    labels: np.ndarray | None,
    n_splits: int,
    seed: int,
    method: str,
) -> pd.DataFrame:
    """Assign every image to one of ``n_splits`` validation folds.

    Args:
        image_ids: unique ids, any order (they are sorted first, with ``labels``).
        labels: (N, L) bool/int presence labels aligned with ``image_ids``; required for
            ``"multilabel_stratified"``, ignored (may be None) for ``"kfold"``.
        n_splits: number of folds, 2 <= n_splits <= N.
        seed: random state of the shuffling splitter.
        method: ``"multilabel_stratified"`` (iterstrat MultilabelStratifiedKFold) or
            ``"kfold"`` (sklearn KFold), both with ``shuffle=True``.

    Returns:
        Columns ``image_id`` (str, sorted ascending) and ``fold`` (int64 in [0, n_splits-1]).
    """
    if method not in FOLD_METHODS:
        raise ValueError(f"method must be one of {list(FOLD_METHODS)}; got {method!r}")
    ids = np.asarray([str(i) for i in image_ids], dtype=object)
    n_images = len(ids)
    if isinstance(n_splits, bool) or not isinstance(n_splits, (int, np.integer)):
        raise ValueError(f"n_splits must be an integer; got {n_splits!r}")
    if not 2 <= n_splits <= n_images:
        raise ValueError(
            f"n_splits must be in [2, {n_images}] (the number of images); got {n_splits}"
        )
    duplicated = pd.Series(ids).duplicated()
    if duplicated.any():
        repeated = sorted(set(ids[duplicated.to_numpy()]))[:5]
        raise ValueError(f"image_ids must be unique; got duplicates {repeated}")
    order = np.argsort(ids, kind="stable")
    ids = ids[order]

    # Imported here: scikit-learn costs about a second at start-up, which every command
    # that reads a config (the bundle runner included) would otherwise pay.
    if method == "kfold":
        from sklearn.model_selection import KFold

        splitter = KFold(n_splits=n_splits, shuffle=True, random_state=seed)
        splits = splitter.split(ids)
    else:
        if labels is None:
            raise ValueError("labels are required for method 'multilabel_stratified'; got None")
        label_array = np.asarray(labels)
        if label_array.ndim != 2 or label_array.shape[0] != n_images:
            raise ValueError(
                f"labels must have shape ({n_images}, n_labels) to match image_ids; "
                f"got {label_array.shape}"
            )
        label_array = label_array[order].astype(np.int64)
        from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

        splitter = MultilabelStratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        splits = splitter.split(ids, label_array)

    fold = np.full(n_images, -1, dtype=np.int64)
    for k, (_, val_index) in enumerate(splits):
        fold[val_index] = k
    assert (fold >= 0).all(), "a splitter left some images without a fold"
    return pd.DataFrame({"image_id": ids.astype(str), "fold": fold})


def ensure_folds(
    path: str | Path,
    table: pd.DataFrame,
    classes: Sequence[str],
    n_splits: int,
    seed: int,
    method: str,
) -> pd.DataFrame:
    """Return the experiment's split, making and saving it on first use.

    Args:
        path: the experiment's ``folds.csv`` (``runs/<experiment>/folds.csv``).
        table: canonical mask table (``image_id``, ``class_name``, ``rle``).
        classes: class names; their presence plus ``no_mask`` stratify the split.
        n_splits, seed, method: as in ``make_folds``.

    Returns:
        Columns ``image_id`` (str, sorted) and ``fold`` (int64).

    Raises:
        ValueError: ``path`` already holds a split that differs from the one these
            arguments produce; it is never overwritten.
    """
    path = Path(path)
    presence = presence_matrix(table, classes)
    labels = presence.drop(columns="image_id").to_numpy()
    folds = make_folds(presence["image_id"].tolist(), labels, n_splits, seed, method)

    if path.exists():
        saved = load_folds(path)
        if saved.equals(folds):
            logger.info("reusing the split in %s (%d images, %d folds)", path, len(saved), n_splits)
            return saved
        raise ValueError(
            f"{path} already holds a different split for this experiment "
            f"({len(saved)} images, {saved['fold'].nunique()} folds) than the one requested "
            f"({len(folds)} images, n_splits={n_splits}, seed={seed}, method={method!r}); "
            "use a new experiment name for a new split, or delete the file to re-split "
            "(which invalidates every fold already trained in this experiment)"
        )

    # Two workers may write the same split at once: each has its own temporary name.
    write_csv(path, folds)
    logger.info("wrote %s (%d images, %d folds, %s)", path, len(folds), n_splits, method)
    return folds


def load_folds(path: str | Path) -> pd.DataFrame:
    """Read and validate a saved ``folds.csv``.

    Returns:
        Columns ``image_id`` (str) and ``fold`` (int64 >= 0), one row per image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the split is made by the first training run; "
            f"run `{command_line('train', '--all', config='<config>')}` for this experiment first"
        )
    # Everything is read as text so ids such as "NA" or "0012" survive and a bad fold
    # value is reported as written.
    try:
        folds = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty; expected columns {_FOLD_COLUMNS}") from None
    if list(folds.columns) != _FOLD_COLUMNS:
        raise ValueError(f"{path} must have columns {_FOLD_COLUMNS}; got {list(folds.columns)}")
    fold_values = pd.to_numeric(folds["fold"], errors="coerce")
    bad = folds.index[fold_values.isna() | (fold_values % 1 != 0) | (fold_values < 0)]
    if len(bad):
        row = int(bad[0])
        raise ValueError(
            f"{path} row {row + 2}: fold must be an integer >= 0; got {folds.at[row, 'fold']!r}"
        )
    duplicated = folds["image_id"].duplicated()
    if duplicated.any():
        raise ValueError(
            f"{path}: image_id must be unique; got duplicates "
            f"{sorted(folds.loc[duplicated, 'image_id'].unique())[:5]}"
        )
    folds["fold"] = fold_values.astype(np.int64)
    return folds


def fold_members(folds: pd.DataFrame, fold: int) -> tuple[list[str], list[str]]:
    """Split the image ids into (train ids, validation ids) for one fold.

    Args:
        folds: columns ``image_id`` and ``fold`` (int in [0, K-1]).
        fold: the validation fold.

    Returns:
        (train ids, val ids), each a list of str in the order of ``folds``.
    """
    n_folds = int(folds["fold"].max()) + 1
    if (
        isinstance(fold, bool)
        or not isinstance(fold, (int, np.integer))
        or not (0 <= fold < n_folds)
    ):
        raise ValueError(f"fold must be in [0, {n_folds - 1}]; got {fold!r}")
    is_val = (folds["fold"] == fold).to_numpy()
    ids = folds["image_id"].astype(str)
    return ids[~is_val].tolist(), ids[is_val].tolist()
