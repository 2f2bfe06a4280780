"""The real ``python -m pipeline.tune`` CLI on a hand-made experiment (no training)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.core.postprocess import load_postprocess
from tests.unit.stages.test_tune import CLASSES, false_positive_case, make_experiment

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def run_tune(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.tune", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_writes_postprocess_and_prints_the_table(tmp_path: Path) -> None:
    truth, probs, classifier = false_positive_case()
    config = make_experiment(tmp_path, truth, probs, classifier)
    done = run_tune("--config", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "handmade"
    params, extra = load_postprocess(run / "postprocess.json", CLASSES)
    assert params["Fish"].gate == "classifier" and extra["scores"]["tuned"] == 1.0
    assert pd.read_csv(run / "postprocess_table.csv")["class"].tolist() == [*CLASSES, "overall"]
    assert (run / "postprocess_grid.csv").is_file()
    lines = done.stdout.splitlines()
    assert lines[0].startswith("post-processing tuned on 12 out-of-fold images (3 folds)")
    assert any(line.startswith("overall") for line in lines)


def test_cli_overrides_and_errors(tmp_path: Path) -> None:
    truth, probs, classifier = false_positive_case()
    config = make_experiment(tmp_path, truth, probs, classifier, unfinished=(2,))
    done = run_tune("--config", str(config))
    assert done.returncode == 2
    assert "segmentation fold 2 is not finished" in done.stderr
    (tmp_path / "runs" / "handmade" / "fold_2" / "metrics.json").write_text("{}")
    done = run_tune("--config", str(config), "--set", "postprocess.gates=[none]")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gates searched: none" in done.stdout
