"""Strategy choice: auto is the plain default strategy on one device."""

import pytest

from pipeline.nn.devices import make_strategy
from pipeline.nn.keras_backend import tf


def test_auto_without_gpus_is_the_default_strategy_not_a_wrapper():
    if tf.config.list_logical_devices("GPU"):
        pytest.skip("a GPU is visible")
    strategy = make_strategy("auto")
    assert strategy is tf.distribute.get_strategy()
    assert strategy.num_replicas_in_sync == 1
    assert isinstance(make_strategy("one_device"), tf.distribute.OneDeviceStrategy)


def test_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"train.strategy must be one of \['auto'"):
        make_strategy("tpu")
