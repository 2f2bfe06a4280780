"""bench_quality's summary: per class, split into frequent and sparse classes, and the
mean validation curve (#33). Pure figures, no training."""

from __future__ import annotations

import numpy as np

from benchmarks.bench_quality import frequent_classes, summarise


def test_frequent_and_sparse_classes_are_summarised_apart() -> None:
    classes = ["road", "car"]
    # road in all 10 images, car in 3 of them.
    rles = {f"i{k}": ["1 5", "1 2" if k < 3 else ""] for k in range(10)}
    assert frequent_classes(classes, rles) == ["road"]
    ids = list(rles)
    seed_a = np.column_stack([np.full(10, 0.9), np.full(10, 0.5)])
    seed_b = np.column_stack([np.full(10, 0.7), np.full(10, 0.3)])
    runs = [
        (ids, seed_a, [8], [[0.8, 0.6, 0.5]]),
        (ids, seed_b, [7], [[0.6, 0.4]]),  # stopped early: a shorter curve
    ]
    summary = summarise(runs, classes, rles)
    assert summary["by_frequency"]["frequent"] == {
        "classes": ["road"],
        "mean": 0.8,
        "std": 0.1,
    }
    assert summary["by_frequency"]["sparse"]["mean"] == 0.4
    assert summary["per_class"] == {"road": 0.8, "car": 0.4}
    assert summary["val_loss_by_epoch"] == [0.7, 0.5, 0.5]
    assert summary["best_epochs"] == [[8], [7]]
