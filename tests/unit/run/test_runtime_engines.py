"""Which engine ``auto`` takes (``run.runtime_engines.choose_engine``), on this environment
(TensorFlow and OpenVINO both installed by ``make setup``)."""

from __future__ import annotations

import pytest

from pipeline.run.runtime_engines import available_engines, choose_engine


def test_auto_takes_openvino_in_bfloat16_and_tensorflow_in_float32() -> None:
    assert available_engines() == ["openvino", "tensorflow"]
    assert choose_engine("auto", precision="bfloat16") == "openvino"
    assert choose_engine("auto", precision="float32") == "tensorflow"
    # A bundle with OpenVINO IR only (or an environment without TensorFlow): OpenVINO.
    assert choose_engine("auto", ["openvino"], "float32") == "openvino"
    assert choose_engine("tensorflow", precision="bfloat16") == "tensorflow"


def test_an_unknown_or_unoffered_engine_is_bad_input() -> None:
    with pytest.raises(ValueError, match="engine must be one of"):
        choose_engine("onnxruntime")
    with pytest.raises(ValueError, match="no engine installed for"):
        choose_engine("auto", [])
