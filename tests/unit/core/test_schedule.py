"""Training phases from encoder freezing and the progressive unfreezing schedule."""

import pytest

from pipeline.core.schedule import Phase, training_phases


def test_no_freezing_is_one_phase():
    assert training_phases(10, 0, []) == [Phase(0, 1.0)]


def test_warm_up_freezing():
    assert training_phases(10, 3, []) == [Phase(0, 0.0), Phase(3, 1.0)]


def test_progressive_schedule_starts_frozen():
    schedule = [
        {"epoch": 2, "fraction": 0.3, "lr": 3e-4},
        {"epoch": 5, "fraction": 1.0, "lr": None},
    ]
    assert training_phases(10, 0, schedule) == [
        Phase(0, 0.0),
        Phase(2, 0.3, 3e-4),
        Phase(5, 1.0, None),
    ]


def test_stage_at_epoch_zero_replaces_the_frozen_start():
    schedule = [
        {"epoch": 0, "fraction": 0.25, "lr": None},
        {"epoch": 4, "fraction": 1.0, "lr": 1e-4},
    ]
    assert training_phases(6, 0, schedule) == [Phase(0, 0.25), Phase(4, 1.0, 1e-4)]


def test_stages_past_the_last_epoch_are_dropped():
    schedule = [
        {"epoch": 2, "fraction": 0.5, "lr": None},
        {"epoch": 9, "fraction": 1.0, "lr": None},
    ]
    assert training_phases(5, 0, schedule) == [Phase(0, 0.0), Phase(2, 0.5)]


def test_freeze_epochs_combined_with_a_later_schedule():
    schedule = [{"epoch": 4, "fraction": 1.0, "lr": 1e-4}]
    assert training_phases(8, 2, schedule) == [Phase(0, 0.0), Phase(2, 1.0), Phase(4, 1.0, 1e-4)]


def test_schedule_before_the_warm_up_ends_is_an_error():
    with pytest.raises(ValueError, match="must start after epoch"):
        training_phases(8, 3, [{"epoch": 1, "fraction": 0.5, "lr": None}])
