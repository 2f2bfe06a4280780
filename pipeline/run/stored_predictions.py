"""Predict's stored test outputs, and whether they are still what a config would predict.

Beside the submission, ``python -m pipeline.predict`` stores the fold-merged test probs
(``TEST_PROBS``, a uint8 store at the submission size), the presence head's test probs
(``TEST_PRESENCE``, when the model has the head) and, when it ran the separate
classifier, its test probs (``TEST_CLS``). ``TEST_PROBS_KEY`` records what they were
predicted from: ``prediction_key`` for the probs and the head's presence,
``classifier_key`` for the classifier's. Later stages (``pipeline.ensemble``,
``pipeline.pseudo_label``) reuse them while those keys are unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.config import Config
from pipeline.core.layout import (
    CLASSIFIER_STAGE,
    TEST_CLS,
    TEST_PRESENCE,
    TEST_PROBS,
    TEST_PROBS_KEY,
)
from pipeline.core.probstore import ProbReader
from pipeline.run.json_files import read_json, write_json
from pipeline.run.oof import PRESENCE_SOURCES, read_presence_table, write_presence_oof
from pipeline.run.prediction import weights_key
from pipeline.run.trained_run import weight_stamps

# Weight files by stage ("" segmentation, "classifier"): [path, size, modification time].
Stamps = Mapping[str, Sequence[list[object]]]

# The config sections the stored test probs are predicted from.
_PREDICTION_SECTIONS = ("data", "model", "tta", "predict")


def prediction_key(config: Config, stamps: Stamps | None = None) -> str:
    """What predict's stored test probs depend on: the config sections predict reads for
    them (data, model, TTA, inference precision, the folds), every segmentation fold's
    weights (size and modification time) and the test images; not the post-processing,
    the classifier or the keys of later stages (pseudo_label, ensemble). ``stamps``: the
    weight files by stage, when the caller listed them (``trained_run.weight_stamps``)."""
    whole = config.to_dict()
    parts: list[Any] = [
        {key: whole[key] for key in _PREDICTION_SECTIONS},
        [config.folds.n_splits, config.train.mixed_precision],
    ]
    return weights_key(config, parts, _stamps(config, "", stamps))


def classifier_key(config: Config, stamps: Stamps | None = None) -> str:
    """What the stored classifier test probs depend on: the same sections and the
    ``classifier`` one, every classifier fold's weights and the test images."""
    whole = config.to_dict()
    parts: list[Any] = [
        {key: whole[key] for key in (*_PREDICTION_SECTIONS, "classifier")},
        [config.folds.n_splits, config.train.mixed_precision],
    ]
    return weights_key(config, parts, _stamps(config, CLASSIFIER_STAGE, stamps))


def _stamps(config: Config, stage: str, stamps: Stamps | None) -> list[list[object]]:
    return list(stamps[stage]) if stamps is not None else weight_stamps(config, stage)


def _stored_keys(config: Config) -> dict[str, Any]:
    try:
        keys = read_json(config.run_dir / TEST_PROBS_KEY)
    except (FileNotFoundError, ValueError):
        return {}
    return keys if isinstance(keys, dict) else {}


def fresh_test_probs(config: Config, image_ids: Sequence[str]) -> ProbReader | None:
    """The experiment's stored test probs (``TEST_PROBS``, written by predict) when they
    hold ``image_ids`` and nothing they were predicted from has changed since; else None."""
    store = config.run_dir / TEST_PROBS
    if _stored_keys(config).get("inputs_key") != prediction_key(config) or not store.is_dir():
        return None
    reader = ProbReader(store)
    return reader if set(reader.image_ids) >= set(image_ids) else None


def stored_presence_path(config: Config, source: str) -> Path:
    """Where predict stores the test presence of ``source`` (classifier or head)."""
    if source not in PRESENCE_SOURCES:
        raise ValueError(f"presence source must be one of {list(PRESENCE_SOURCES)}; got {source!r}")
    return config.run_dir / (TEST_CLS if source == "classifier" else TEST_PRESENCE)


def fresh_test_presence(
    config: Config, classes: Sequence[str], image_ids: Sequence[str], source: str
) -> np.ndarray | None:
    """(N, C) float64 test presence of ``source`` in the order of ``image_ids``, as
    predict stored it, when it is still what this config would predict; else None.

    A stale, missing or incomplete table is None (predict again); a malformed one is a
    ValueError naming the file and row (``oof.read_presence_table``).
    """
    path = stored_presence_path(config, source)
    keys = _stored_keys(config)
    wanted = classifier_key(config) if source == "classifier" else prediction_key(config)
    stored = keys.get("classifier_key" if source == "classifier" else "inputs_key")
    if stored != wanted or not path.is_file():
        return None
    frame = read_presence_table(path, classes).set_index("image_id")
    if not set(image_ids) <= set(frame.index):
        return None
    return frame.loc[list(image_ids), list(classes)].to_numpy(np.float64)


def write_test_presence(
    config: Config, source: str, values: np.ndarray, classes: Sequence[str], ids: Sequence[str]
) -> Path:
    """Store (N, C) test presence of ``source`` beside the test probs (atomically)."""
    frame = pd.DataFrame(np.asarray(values, np.float64), columns=list(classes))
    frame.insert(0, "image_id", list(ids))
    return write_presence_oof(frame, stored_presence_path(config, source))


def write_test_keys(config: Config, classifier_ran: bool, stamps: Stamps | None = None) -> None:
    """Record what the stored test outputs were predicted from. The classifier's key is
    kept from an earlier run that did not run it, while it is still current."""
    keys: dict[str, Any] = {"inputs_key": prediction_key(config, stamps)}
    current = classifier_key(config, stamps)
    if classifier_ran or _stored_keys(config).get("classifier_key") == current:
        keys["classifier_key"] = current
    write_json(config.run_dir / TEST_PROBS_KEY, keys)
