"""The pure parts of experiment tracking: dotted params and metric figures, and the
do-nothing tracker of ``tracking.backend: none``."""

from __future__ import annotations

import math

from pipeline.core.config import load_config
from pipeline.run.tracking import (
    NULL_TRACKER,
    config_params,
    flatten,
    numeric,
    open_tracker,
    tracking_uri,
)


def test_flatten_gives_dotted_keys():
    assert flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1, 2]}) == {
        "a.b": 1,
        "a.c.d": None,
        "e": [1, 2],
    }


def test_numeric_keeps_finite_numbers_and_lists_of_them():
    data = {
        "score": 0.5,
        "n": 3,
        "flag": True,
        "name": "x",
        "nan": math.nan,
        "none": None,
        "folds": [0.25, 0.75],
        "per_class": {"Fish (big)": 0.1},
    }
    assert numeric(data, "cv.") == {
        "cv.score": 0.5,
        "cv.n": 3.0,
        "cv.folds.0": 0.25,
        "cv.folds.1": 0.75,
        "cv.per_class.Fish _big_": 0.1,
    }


def test_config_params_spell_every_key_once():
    config = load_config(None, ["train.lr=0.001"])
    params = config_params(config)
    assert params["train.lr"] == "0.001"
    assert params["tracking.backend"] == "none"
    assert len(params) == len(flatten(config.to_dict()))


def test_tracking_off_gives_the_null_tracker(tmp_path):
    config = load_config(None, [f"runs_dir={tmp_path}"])
    assert open_tracker(config) is NULL_TRACKER
    assert not NULL_TRACKER.enabled and NULL_TRACKER.run_id is None
    assert NULL_TRACKER.fold("segmentation", 0, tmp_path) is NULL_TRACKER
    assert tracking_uri(config) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking_uri(config.with_overrides(["tracking.uri=http://h:5000"])) == "http://h:5000"
