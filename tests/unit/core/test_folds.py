"""Tests of the cross-validation split (pipeline.core.folds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import KFold

from pipeline.core.folds import (
    ensure_folds,
    fold_members,
    load_folds,
    make_folds,
    presence_matrix,
)

CLASSES = ["Fish", "Flower", "Gravel", "Sugar"]


def random_table(n_images: int, seed: int) -> pd.DataFrame:
    """A canonical mask table (every image x class) with random presence, rows shuffled."""
    rng = np.random.default_rng(seed)
    ids = [f"{i:07x}.jpg" for i in rng.choice(16**7, size=n_images, replace=False)]
    present = rng.random((n_images, len(CLASSES))) < rng.uniform(0.3, 0.6, len(CLASSES))
    rows = [
        (image_id, name, "1 5" if present[i, c] else "")
        for i, image_id in enumerate(ids)
        for c, name in enumerate(CLASSES)
    ]
    table = pd.DataFrame(rows, columns=["image_id", "class_name", "rle"])
    return table.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def random_labels(n_images: int, n_labels: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Ids in random order and presence labels (prevalence 10-70%) plus a no-mask column."""
    rng = np.random.default_rng(seed)
    prevalence = rng.uniform(0.1, 0.7, n_labels)
    labels = rng.random((n_images, n_labels)) < prevalence
    labels = np.column_stack([labels, ~labels.any(axis=1)])
    ids = [f"{i:07x}.jpg" for i in rng.permutation(n_images)]
    return ids, labels


# presence_matrix


def test_presence_matrix_hand_computed() -> None:
    table = pd.DataFrame(
        {
            "image_id": ["b.jpg", "b.jpg", "a.jpg", "a.jpg", "c.jpg"],
            "class_name": ["Fish", "Sugar", "Fish", "Sugar", "Sugar"],
            "rle": ["1 3", "", "", np.nan, "4 2"],
        }
    )
    presence = presence_matrix(table, ["Fish", "Sugar"])
    assert list(presence.columns) == ["image_id", "Fish", "Sugar", "no_mask"]
    assert presence["image_id"].tolist() == ["a.jpg", "b.jpg", "c.jpg"]
    assert presence["Fish"].tolist() == [False, True, False]
    assert presence["Sugar"].tolist() == [False, False, True]
    assert presence["no_mask"].tolist() == [True, False, False]
    assert all(presence[c].dtype == bool for c in ["Fish", "Sugar", "no_mask"])


def test_presence_matrix_rejects_unknown_class() -> None:
    table = pd.DataFrame({"image_id": ["a"], "class_name": ["Cat"], "rle": ["1 1"]})
    with pytest.raises(ValueError, match=r"class_name must be one of .*got \['Cat'\]"):
        presence_matrix(table, CLASSES)


def test_presence_matrix_rejects_missing_column() -> None:
    table = pd.DataFrame({"image_id": ["a"], "rle": ["1 1"]})
    with pytest.raises(ValueError, match=r"missing \['class_name'\]"):
        presence_matrix(table, CLASSES)


# make_folds


@pytest.mark.parametrize("method", ["multilabel_stratified", "kfold"])
@pytest.mark.parametrize("n_splits", [2, 3, 5])
def test_folds_are_disjoint_and_cover_every_image_once(method: str, n_splits: int) -> None:
    ids, labels = random_labels(97, 4, seed=n_splits)
    folds = make_folds(ids, labels, n_splits, seed=1, method=method)
    assert sorted(folds["image_id"]) == sorted(ids)
    assert folds["image_id"].is_unique
    assert set(folds["fold"]) == set(range(n_splits))
    if method == "kfold":
        sizes = np.bincount(folds["fold"], minlength=n_splits)
        assert sizes.max() - sizes.min() <= 1
    val_sets = [set(fold_members(folds, k)[1]) for k in range(n_splits)]
    assert sum(len(v) for v in val_sets) == 97
    assert set().union(*val_sets) == set(ids)


@pytest.mark.parametrize("method", ["multilabel_stratified", "kfold"])
def test_folds_do_not_depend_on_input_order(method: str) -> None:
    ids, labels = random_labels(80, 4, seed=3)
    perm = np.random.default_rng(0).permutation(len(ids))
    first = make_folds(ids, labels, 3, seed=12345, method=method)
    second = make_folds([ids[i] for i in perm], labels[perm], 3, seed=12345, method=method)
    pd.testing.assert_frame_equal(first, second)
    assert first["image_id"].tolist() == sorted(ids)


def test_kfold_matches_the_reference_recipe_on_sorted_ids() -> None:
    ids = [f"{i:07x}.jpg" for i in np.random.default_rng(5).permutation(50)]
    folds = make_folds(ids, None, 3, seed=12345, method="kfold")
    expected = np.empty(50, dtype=np.int64)
    for k, (_, val) in enumerate(KFold(3, shuffle=True, random_state=12345).split(range(50))):
        expected[val] = k
    np.testing.assert_array_equal(folds["fold"].to_numpy(), expected)


def test_different_seeds_give_different_folds() -> None:
    ids, labels = random_labels(60, 4, seed=4)
    a = make_folds(ids, labels, 3, seed=1, method="multilabel_stratified")
    b = make_folds(ids, labels, 3, seed=2, method="multilabel_stratified")
    assert not a["fold"].equals(b["fold"])


def max_balance_ratio(folds: pd.DataFrame, ids: list[str], labels: np.ndarray, k: int) -> float:
    """Worst |positives in a fold - total/K| over classes and folds, divided by the bound."""
    sorted_labels = labels[np.argsort(np.asarray(ids))]
    worst = 0.0
    for column in sorted_labels.T:
        expected = column.sum() / k
        counts = np.bincount(folds["fold"].to_numpy()[column], minlength=k)
        worst = max(worst, float(np.abs(counts - expected).max()) / max(2.0, 0.1 * expected))
    return worst


# The bound |count - total/K| <= max(2, 0.1 * total/K) per class and fold: iterstrat is
# greedy, not exact. Measured on 100 Clouds-like label sets (4-6 classes at 10-70%
# prevalence plus no_mask, N in {60, 300, 1000, 5546}, K in {3, 5}) the worst case used
# 83% of the bound; plain shuffled KFold exceeded it in 80-100% of those sets (N <= 1000).
@pytest.mark.parametrize(
    ("n_images", "n_splits", "n_labels", "seed"),
    [(60, 3, 4, 0), (60, 3, 4, 1), (300, 3, 4, 2), (300, 5, 4, 3), (1000, 3, 6, 4)],
)
def test_multilabel_stratified_spreads_each_class_evenly(
    n_images: int, n_splits: int, n_labels: int, seed: int
) -> None:
    ids, labels = random_labels(n_images, n_labels, seed)
    folds = make_folds(ids, labels, n_splits, seed, "multilabel_stratified")
    assert max_balance_ratio(folds, ids, labels, n_splits) <= 1.0


def test_balance_bound_is_not_met_by_plain_kfold() -> None:
    ratios = []
    for seed in range(5):
        ids, labels = random_labels(300, 4, seed)
        folds = make_folds(ids, labels, 3, seed, "kfold")
        ratios.append(max_balance_ratio(folds, ids, labels, 3))
    assert max(ratios) > 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_splits": 1}, r"n_splits must be in \[2, 10\] \(the number of images\); got 1"),
        ({"n_splits": 11}, r"n_splits must be in \[2, 10\] .*got 11"),
        ({"method": "group"}, r"method must be one of \['multilabel_stratified', 'kfold'\]"),
        ({"labels": np.zeros((9, 3))}, r"labels must have shape \(10, n_labels\).*got \(9, 3\)"),
        ({"labels": None}, r"labels are required for method 'multilabel_stratified'"),
        ({"image_ids": ["a"] * 2 + [str(i) for i in range(8)]}, r"unique; got duplicates \['a'\]"),
    ],
)
def test_make_folds_errors(kwargs: dict, message: str) -> None:
    args = {
        "image_ids": [str(i) for i in range(10)],
        "labels": np.ones((10, 3)),
        "n_splits": 3,
        "seed": 0,
        "method": "multilabel_stratified",
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        make_folds(**args)


# ensure_folds / load_folds


def test_ensure_folds_writes_sorted_csv_and_same_seed_is_byte_identical(tmp_path: Path) -> None:
    table = random_table(50, seed=7)
    first = tmp_path / "a" / "folds.csv"
    second = tmp_path / "b" / "folds.csv"
    folds = ensure_folds(first, table, CLASSES, 3, 12345, "multilabel_stratified")
    ensure_folds(second, table.iloc[::-1], CLASSES, 3, 12345, "multilabel_stratified")
    assert first.read_bytes() == second.read_bytes()
    assert first.read_text().splitlines()[0] == "image_id,fold"
    assert not first.with_suffix(".csv.tmp").exists()
    saved = load_folds(first)
    assert saved["image_id"].tolist() == sorted(table["image_id"].unique())
    pd.testing.assert_frame_equal(saved, folds)


def test_ensure_folds_reuses_an_identical_split(tmp_path: Path) -> None:
    table = random_table(40, seed=8)
    path = tmp_path / "folds.csv"
    ensure_folds(path, table, CLASSES, 3, 1, "kfold")
    before = path.read_bytes()
    again = ensure_folds(path, table.sample(frac=1.0, random_state=1), CLASSES, 3, 1, "kfold")
    assert path.read_bytes() == before
    pd.testing.assert_frame_equal(again, load_folds(path))


@pytest.mark.parametrize(
    "change",
    [
        {"n_splits": 4},
        {"seed": 2},
        {"method": "multilabel_stratified"},
        {"table": "drop_one_image"},
    ],
)
def test_ensure_folds_refuses_a_different_split(tmp_path: Path, change: dict) -> None:
    table = random_table(40, seed=9)
    path = tmp_path / "folds.csv"
    args = {"table": table, "classes": CLASSES, "n_splits": 3, "seed": 1, "method": "kfold"}
    ensure_folds(path, **args)
    before = path.read_bytes()
    if change.get("table") == "drop_one_image":
        change = {"table": table[table["image_id"] != table["image_id"].iloc[0]]}
    with pytest.raises(
        ValueError, match=r"folds\.csv already holds a different split.*new experiment"
    ):
        ensure_folds(path, **{**args, **change})
    assert path.read_bytes() == before


def test_load_folds_missing_file_hints_at_training(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"folds\.csv not found.*foldseg train"):
        load_folds(tmp_path / "folds.csv")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("image_id,k\na,0\n", r"must have columns \['image_id', 'fold'\]; got \['image_id', 'k'\]"),
        ("image_id,fold\na,0\nb,1.5\n", r"row 3: fold must be an integer >= 0; got '1\.5'"),
        ("image_id,fold\na,0\nb,x\n", r"row 3: fold must be an integer >= 0; got 'x'"),
        ("image_id,fold\na,0\nb,-1\n", r"row 3: fold must be an integer >= 0"),
        ("image_id,fold\na,0\na,1\n", r"image_id must be unique; got duplicates \['a'\]"),
    ],
)
def test_load_folds_validates(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "folds.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_folds(path)


def test_load_folds_keeps_ids_as_strings(tmp_path: Path) -> None:
    path = tmp_path / "folds.csv"
    path.write_text("image_id,fold\nNA,0\n0012,1\n")
    folds = load_folds(path)
    assert folds["image_id"].tolist() == ["NA", "0012"]
    assert folds["fold"].dtype == np.int64


# fold_members


def test_fold_members_hand_computed() -> None:
    folds = pd.DataFrame({"image_id": ["a", "b", "c", "d", "e"], "fold": [0, 1, 2, 1, 0]})
    assert fold_members(folds, 1) == (["a", "c", "e"], ["b", "d"])
    assert fold_members(folds, 2) == (["a", "b", "d", "e"], ["c"])


@pytest.mark.parametrize("fold", [7, -1, 3])
def test_fold_members_rejects_fold_out_of_range(fold: int) -> None:
    folds = pd.DataFrame({"image_id": ["a", "b", "c"], "fold": [0, 1, 2]})
    with pytest.raises(ValueError, match=rf"fold must be in \[0, 2\]; got {fold}"):
        fold_members(folds, fold)


def test_classifier_is_skipped_only_when_no_class_varies() -> None:
    from pipeline.core.folds import classifier_skip_reason

    every = pd.DataFrame(
        {"image_id": ["a", "b"], "class_name": ["nucleus"] * 2, "rle": ["1 2", "3 1"]}
    )
    reason = classifier_skip_reason(every, ["nucleus"])
    assert reason is not None and "'nucleus' in every image" in reason and "all 2 images" in reason
    mixed = pd.DataFrame(
        {
            "image_id": ["a", "a", "b", "b"],
            "class_name": ["x", "y", "x", "y"],
            "rle": ["1 2", "1 1", "3 1", ""],
        }
    )
    assert classifier_skip_reason(mixed, ["x", "y"]) is None  # y varies
    none = mixed.assign(rle=["1 2", "", "3 1", ""])
    assert "'y' in no image" in str(classifier_skip_reason(none, ["x", "y"]))
