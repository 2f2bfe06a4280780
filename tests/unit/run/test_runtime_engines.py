"""Which engine ``auto`` takes (``run.runtime_engines.choose_engine``), on this environment
(TensorFlow, OpenVINO and onnxruntime all installed by ``make setup``)."""

from __future__ import annotations

import pytest

from pipeline.run.runtime_engines import available_engines, choose_engine


def test_auto_takes_openvino_first_where_the_networks_are_converted() -> None:
    # A bundle: OpenVINO in bfloat16 and in float32 (measured fastest at low load).
    assert available_engines() == ["openvino", "onnxruntime", "tensorflow"]
    assert choose_engine("auto", precision="bfloat16") == "openvino"
    assert choose_engine("auto", precision="float32") == "openvino"
    assert choose_engine("auto", ["tensorflow", "onnxruntime"], "float32") == "onnxruntime"
    assert choose_engine("tensorflow", precision="bfloat16") == "tensorflow"


def test_predict_converting_the_folds_takes_tensorflow_in_every_precision() -> None:
    # The first conversion costs more than a whole prediction on TensorFlow saves.
    assert choose_engine("auto", precision="float32", converting=True) == "tensorflow"
    assert choose_engine("auto", precision="bfloat16", converting=True) == "tensorflow"
    assert choose_engine("auto", ["openvino"], "bfloat16", converting=True) == "openvino"
    assert choose_engine("auto", ["openvino"], "float32", converting=True) == "openvino"


def test_auto_takes_onnxruntime_after_openvino_and_before_tensorflow_for_a_bundle() -> None:
    # A bundle's whole process: slower than OpenVINO, faster than TensorFlow (whose import
    # and loading cost more than its forward saves); no bfloat16 kernels here.
    assert choose_engine("auto", ["openvino", "onnxruntime"], "float32") == "openvino"
    assert choose_engine("auto", ["openvino", "onnxruntime"], "bfloat16") == "openvino"
    assert choose_engine("auto", ["onnxruntime", "tensorflow"], "bfloat16") == "onnxruntime"
    assert choose_engine("auto", ["onnxruntime", "tensorflow"], "float32") == "onnxruntime"
    assert choose_engine("auto", ["onnxruntime"], "float32") == "onnxruntime"
    assert choose_engine("onnxruntime", precision="float32") == "onnxruntime"


def test_an_unknown_or_unoffered_engine_is_bad_input() -> None:
    with pytest.raises(ValueError, match="engine must be one of"):
        choose_engine("tflite")
    with pytest.raises(ValueError, match="no engine installed for"):
        choose_engine("auto", [])
