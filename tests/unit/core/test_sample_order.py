"""The training stream is a pure function of (seed, sample number)."""

import numpy as np
import pytest

from pipeline.core.sample_order import SampleOrder, batches_per_pass, first_sample


def test_each_pass_visits_every_image_once_in_a_seeded_order():
    rows = np.array([10, 11, 12, 13, 14])
    order = SampleOrder(rows, seed=3)
    stream = [int(order(n)) for n in range(15)]
    for p in range(3):
        assert sorted(stream[5 * p : 5 * p + 5]) == rows.tolist()
    assert stream[:5] != stream[5:10]  # a new order each pass
    again = SampleOrder(rows, seed=3)
    assert [int(again(n)) for n in (14, 7, 0)] == [stream[14], stream[7], stream[0]]
    assert [int(SampleOrder(rows, seed=4)(n)) for n in range(5)] != stream[:5]


def test_first_sample_and_errors():
    assert first_sample(2, steps_per_epoch=5, global_batch=8) == 80
    with pytest.raises(ValueError, match="must not be empty"):
        SampleOrder([], seed=0)
    with pytest.raises(ValueError, match=">= 0"):
        SampleOrder([1], seed=0)(-1)


def test_an_epoch_is_a_pass_that_sees_every_image() -> None:
    # The last batch is filled from the next pass instead of leaving images out.
    assert batches_per_pass(354, 8) == 45
    assert batches_per_pass(312, 8) == 39
    assert batches_per_pass(3, 8) == 1
    order = SampleOrder(np.arange(354), seed=0)
    seen = {int(order(n)) for n in range(batches_per_pass(354, 8) * 8)}
    assert seen == set(range(354))
