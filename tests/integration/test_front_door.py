"""The front door: ``foldseg STAGE`` for every stage, and ``foldseg run`` end to end.

``foldseg`` is the console script ``make setup`` installs beside the interpreter; each
subcommand is its stage's ``python -m pipeline.X`` form (same arguments, same function,
same exit codes).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import pipeline
from pipeline import cli, workflow
from pipeline.core.commands import STAGES, command_line, find_stage
from pipeline.core.config import load_config
from tests.conftest import REPO, write_tiny_config

FOLDSEG = str(Path(sys.executable).parent / "foldseg")


def foldseg(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FOLDSEG, *args], capture_output=True, text=True, cwd=cwd, timeout=900)


def test_help_lists_every_stage_and_its_module() -> None:
    done = foldseg("--help")
    assert done.returncode == 0, done.stderr
    for stage in STAGES:
        assert f"  {stage.name} " in done.stdout
        assert f"python -m {stage.module}" in done.stdout
    assert "foldseg run --config configs/demo.yaml" in done.stdout


def test_help_cut_short_by_its_reader_ends_quietly() -> None:
    """``foldseg --help | head -1``: the closed pipe ends the output, with no traceback."""
    process = subprocess.Popen([FOLDSEG, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # the reader is gone before the first line is written
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141
    assert stderr == ""


def test_version_and_a_bare_call() -> None:
    done = foldseg("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"foldseg {pipeline.__version__}"
    bare = foldseg()
    assert bare.returncode == 2 and "stages:" in bare.stdout


def test_an_unknown_stage_is_bad_input_naming_the_stages() -> None:
    done = foldseg("trian", "--fold", "0")
    assert done.returncode == 2
    assert "unknown command 'trian'" in done.stderr and "train-classifier" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("stage", [stage.name for stage in STAGES])
def test_every_stage_has_help_with_an_example(stage: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([stage, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: foldseg {stage}" in out
    assert f"examples:\n  foldseg {stage}" in out


def test_underscored_names_and_the_module_form_are_the_same_command() -> None:
    assert find_stage("train_classifier") is find_stage("train-classifier")
    assert command_line("train", "--fold 0", config="c.yaml") == (
        "foldseg train --config c.yaml --fold 0"
    )
    assert command_line("tune", config="") == "foldseg tune --config <config>"
    module = subprocess.run(
        [sys.executable, "-m", "pipeline.tune", "--help"], capture_output=True, text=True
    )
    assert module.returncode == 0 and "usage: python -m pipeline.tune" in module.stdout


def test_bad_input_through_the_front_door_is_one_line_and_exit_2(
    tmp_path: Path, tiny_data: Path
) -> None:
    config = write_tiny_config(tmp_path, tiny_data)
    done = foldseg("train", "--config", str(config), "--fold", "7")
    assert done.returncode == 2
    assert "fold must be in [0, 1]; got 7" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()
    wrong = foldseg("tune", "--config", str(config), "--set", "train.epochs=0")
    assert wrong.returncode == 2 and "train.epochs" in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_the_demo_data_is_made_where_the_config_says(tmp_path: Path, monkeypatch) -> None:
    small = {**workflow.DEMO_DEFAULTS, "n_train": 4, "n_test": 2, "height": 32, "width": 48}
    monkeypatch.setattr(workflow, "DEMO_DEFAULTS", small)
    data = tmp_path / "demo"
    config = load_config(
        write_tiny_config(tmp_path, data, data={"demo": True, "submission_size": [16, 24]})
    )
    workflow._make_demo_data(config)
    assert (data / "train.csv").is_file() and len(list((data / "test_images").iterdir())) == 2
    truth = (data / "test_truth.csv").read_text()
    assert truth.startswith("Image_Label,EncodedPixels")
