"""Choosing the Keras layer: config key ``framework``, applied once per process.

Each case runs in a fresh interpreter, since the door module picks its Keras at import.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.core.config import ConfigError, load_config
from pipeline.run.process import FRAMEWORK_ENV

REPO = Path(__file__).resolve().parents[3]


def run_python(code: str, env_framework: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != FRAMEWORK_ENV}
    if env_framework is not None:
        env[FRAMEWORK_ENV] = env_framework
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_config_key_accepts_the_two_frameworks_only():
    assert load_config(overrides=["framework=keras3"]).framework == "keras3"
    assert load_config().framework == "tf_keras"
    with pytest.raises(ConfigError, match="framework"):
        load_config(overrides=["framework=pytorch"])


def test_before_keras_is_imported_the_config_picks_the_door_s_keras():
    result = run_python(
        """
        import json, sys
        from pipeline.core.config import load_config
        from pipeline.run.process import enter_framework
        enter_framework(load_config(overrides=["framework=keras3"]))
        from pipeline.nn import keras_backend as door
        print(json.dumps([door.FRAMEWORK, door.keras.__version__.split(".")[0],
                          door.sm.__name__, "tf_keras" in sys.modules]))
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    framework, major, library, _ = json.loads(result.stdout.strip().splitlines()[-1])
    assert (framework, major, library) == ("keras3", "3", "segmodels_keras")


def test_the_default_is_tf_keras_with_segmentation_models():
    result = run_python(
        """
        import json
        from pipeline.nn import keras_backend as door
        print(json.dumps([door.FRAMEWORK, door.keras.__name__, door.sm.__name__]))
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [
        "tf_keras",
        "tf_keras",
        "segmentation_models",
    ]


def test_a_library_caller_already_on_the_other_keras_gets_a_clear_error():
    result = run_python(
        """
        from pipeline.nn import keras_backend
        from pipeline.core.config import load_config
        from pipeline.run.process import enter_framework
        try:
            enter_framework(load_config(overrides=["framework=keras3"]))
        except ValueError as exc:
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "framework 'keras3', but this process already runs 'tf_keras'" in result.stdout
    assert "FOLDSEG_FRAMEWORK=keras3" in result.stdout


def test_training_or_predicting_with_the_other_keras_in_process_is_refused(tmp_path):
    """A library call (a benchmark, a notebook) that never went through a stage command
    must not train or predict silently on the process's other Keras."""
    result = run_python(
        f"""
        from pipeline.core.config import load_config
        from pipeline.predict import predict
        from pipeline.train import train_fold
        config = load_config(overrides=["framework=keras3", "runs_dir={tmp_path}"])
        for call in (lambda: train_fold(config, 0), lambda: predict(config)):
            try:
                call()
            except ValueError as exc:
                print(exc)
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("framework 'keras3', but this process runs 'tf_keras'") == 2
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_an_unknown_framework_in_the_environment_is_named():
    result = run_python("from pipeline.nn import keras_backend", env_framework="keras4")
    assert result.returncode != 0
    assert "FOLDSEG_FRAMEWORK='keras4': expected one of tf_keras, keras3" in result.stderr


@pytest.mark.parametrize(("writer", "reader"), [("tf_keras", "keras3"), ("keras3", "tf_keras")])
def test_weights_of_one_framework_are_refused_by_the_other(tmp_path, writer, reader):
    build = """
        from pipeline.nn.model import build_segmentation_model
        model = build_segmentation_model("Unet", "resnet18", 2, decoder_filters=[8] * 5)
    """
    saved = run_python(
        build
        + f"""
        from pathlib import Path
        from pipeline.nn.weights import save_weights_atomic
        save_weights_atomic(model, Path({str(tmp_path / "best_weights.h5")!r}))
        """,
        env_framework=writer,
    )
    assert saved.returncode == 0, saved.stderr[-2000:]
    loaded = run_python(
        build
        + f"""
        from pathlib import Path
        from pipeline.nn.weights import load_best_weights
        try:
            load_best_weights(model, Path({str(tmp_path / "best_weights.h5")!r}))
        except ValueError as exc:
            print(exc)
        """,
        env_framework=reader,
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert f"was written by {writer}, and this run uses {reader}" in loaded.stdout
