"""The predictor on fake engines: folds x TTA, the fold merge, the gates, the encoding.

The engines stand in for networks with hand-computed outputs, so every number here is
known: a fold's mask probability is a function of the pixel, the view inversion must
bring it back, and the fold merge is their mean.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.core import rle
from pipeline.core.clock import StageClock
from pipeline.core.fold_merge import FoldAccumulator
from pipeline.core.postprocess import PostprocessParams
from pipeline.core.prediction_plan import PredictionPlan
from pipeline.run.predictor import Predictor, predict_presence

CLASSES = ("a", "b")


class FakeSegmentation:
    """Fold k predicts class 0 = red / 255 * (k + 1) / 2, class 1 = 1 - that; counts calls."""

    def __init__(self, n_folds: int = 2, head: bool = False) -> None:
        self.n_folds = n_folds
        self.fold = -1
        self.head = head
        self.batches: list[int] = []

    def use_fold(self, fold: int) -> None:
        self.fold = fold

    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        self.batches.append(len(batch))
        red = batch[..., 0] / 255.0 * (self.fold + 1) / 2
        masks = np.stack([red, 1.0 - red], axis=-1).astype(np.float32)
        presence = np.full((len(batch), 2), 0.25 * (self.fold + 1), np.float32)
        return masks, presence if self.head else None

    def accepts(self, height: int, width: int) -> bool:
        return True


class FakePresence:
    """Fold k says class a is present with probability 0.2 + 0.4 k."""

    n_folds = 2

    def __init__(self) -> None:
        self.fold = -1

    def use_fold(self, fold: int) -> None:
        self.fold = fold

    def forward(self, batch: np.ndarray) -> np.ndarray:
        return np.tile(np.array([0.2 + 0.4 * self.fold, 0.5], np.float32), (len(batch), 1))

    def accepts(self, height: int, width: int) -> bool:
        return height == width


def plan(**changes: object) -> PredictionPlan:
    settings: dict[str, object] = {
        "classes": CLASSES,
        "input_size": (4, 6),
        "views": ("identity", "hflip", "vflip"),
        "merge": "mean",
        "batch_size": 2,
        "postprocess": {name: PostprocessParams(threshold=0.5, min_area=0) for name in CLASSES},
        "at_least_one": False,
        "gate_source": None,
        "csv_format": "image_label",
        "submission_size": None,
    }
    settings.update(changes)
    return PredictionPlan(**settings)  # type: ignore[arg-type]


def images() -> np.ndarray:
    """3 images (4, 6): image i's red channel is a ramp over x, scaled by i."""
    ramp = np.tile(np.arange(6, dtype=np.float64) * 51, (4, 1))  # 0 .. 255 over x
    out = np.zeros((3, 4, 6, 3), np.uint8)
    for i in range(3):
        out[i, ..., 0] = (ramp * (i + 1) / 3).astype(np.uint8)
    return out


def test_folds_and_views_merge_to_the_mean_of_the_folds(tmp_path: Path) -> None:
    engine = FakeSegmentation(head=True)
    predictor = Predictor(plan(), engine)
    batch = images()
    accumulator = FoldAccumulator(tmp_path / "merge.npy", (3, 4, 6, 2), 2, "mean")
    head = predictor.predict_probs(batch, accumulator, StageClock())
    merged = accumulator.merged(0, 3)
    red = batch[..., 0] / 255.0
    expected = red * (0.5 + 1.0) / 2  # folds 0 and 1 scale red by 0.5 and 1.0
    np.testing.assert_allclose(merged[..., 0], expected, atol=2e-4)
    np.testing.assert_allclose(merged[..., 1], 1 - expected, atol=2e-4)
    # Each fold: 2 batches (2 + 1 images), one call of 3 views each (one orientation).
    assert engine.batches == [6, 3, 6, 3]
    np.testing.assert_allclose(head, np.full((3, 2), 0.375), atol=1e-6)
    accumulator.close()


def test_the_classifier_presence_is_the_mean_over_folds_and_views() -> None:
    square = np.zeros((3, 4, 4, 3), np.uint8)
    views = ("identity", "hflip", "rot90")
    presence = predict_presence(FakePresence(), square, views, 2, StageClock())
    np.testing.assert_allclose(presence, np.tile([0.4, 0.5], (3, 1)), atol=1e-6)
    with pytest.raises(ValueError, match="no classifier was given"):
        gated = {"a": PostprocessParams(0.5, 0, gate="classifier", gate_threshold=0.5)}
        gated["b"] = PostprocessParams(0.5, 0)
        Predictor(plan(postprocess=gated, gate_source="classifier", presence_size=(4, 4)),
                  FakeSegmentation())  # fmt: skip


def test_encode_applies_the_gate_and_the_sizes(tmp_path: Path) -> None:
    gated = {
        "a": PostprocessParams(0.5, 0, gate="classifier", gate_threshold=0.5),
        "b": PostprocessParams(0.5, 0),
    }
    the_plan = plan(postprocess=gated, gate_source="classifier", presence_size=(4, 4))
    predictor = Predictor(the_plan, FakeSegmentation(), FakePresence())
    accumulator = FoldAccumulator(tmp_path / "merge.npy", (3, 4, 6, 2), 2, "mean")
    predictor.predict_probs(images(), accumulator, StageClock())
    sizes = np.array([[4, 6], [8, 12], [4, 6]])
    presence = np.array([[0.9, 0.5], [0.1, 0.5], [0.9, 0.5]])
    table = predictor.encode(["x", "y", "z"], sizes, accumulator, presence)
    accumulator.close()
    rows = {(r.image_id, r.class_name): r.rle for r in table.itertuples()}
    assert rows[("y", "a")] == ""  # gated off: presence 0.1 < 0.5
    mask = rle.decode(rows[("z", "a")], (4, 6))
    assert mask.shape == (4, 6) and mask[:, -1].all() and not mask[:, 0].any()
    assert rle.decode(rows[("y", "b")], (8, 12)).shape == (8, 12)  # its own size


def test_a_plan_round_trips_and_names_what_is_wrong() -> None:
    original = plan(submission_size=(8, 12), at_least_one=True)
    assert PredictionPlan.from_dict(original.to_dict()) == original
    broken = original.to_dict()
    del broken["merge"]
    with pytest.raises(ValueError, match="manifest: missing key 'merge'"):
        PredictionPlan.from_dict(broken, "manifest")
    with pytest.raises(ValueError, match="must be the plan's classes"):
        plan(classes=("b", "a"))
    with pytest.raises(ValueError, match="merge must be one of"):
        plan(merge="median")
