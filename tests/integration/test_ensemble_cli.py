"""The real ensemble CLI on two tiny trained experiments with different backbones: the
members' predicts run when their test outputs are missing (the classifier's too, for the
ensemble's classifier gate), then are reused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core.config import load_config
from pipeline.core.layout import ENSEMBLE, PREDICT, TEST_CLS, TEST_PROBS
from pipeline.core.submission_check import read_submission
from tests.conftest import REPO, write_tiny_config

pytestmark = pytest.mark.slow


def run_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_ensemble_of_two_backbones_writes_a_valid_submission(tmp_path: Path, tiny_data: Path):
    member = write_tiny_config(tmp_path, tiny_data, train={"epochs": 1})
    other = ["--set", "experiment=tiny_b", "--set", "model.backbone=efficientnetb0"]
    for extra in ([], other):
        out = run_cli("pipeline.train", "--config", str(member), "--all", *extra)
        assert out.returncode == 0, out.stderr[-3000:]
    # The first member's classifier: the ensemble's classifier gate reads its presence.
    out = run_cli("pipeline.train_classifier", "--config", str(member), "--all")
    assert out.returncode == 0, out.stderr[-3000:]
    ensemble = tmp_path / "ensemble.yaml"
    ensemble.write_text(
        yaml.safe_dump(
            {
                "base": str(member),
                "experiment": "tiny_blend",
                "ensemble": {
                    "members": [
                        str(member),
                        {"config": str(member), "set": [o for o in other if o != "--set"]},
                    ],
                    "weight_step": 0.5,
                },
                # Every class gated by the classifier; the at-least-one rule searched.
                "postprocess": {"gates": ["classifier"], "at_least_one": "search"},
            }
        )
    )
    subs = tmp_path / "subs"
    out = run_cli("pipeline.ensemble", "--config", str(ensemble), "--submissions-dir", str(subs))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "predicting its test probs" in out.stderr
    assert "ensemble OOF Kaggle Dice: nested" in out.stdout
    config = load_config(ensemble)
    record = json.loads((config.run_dir / ENSEMBLE).read_text())
    assert [m["experiment"] for m in record["members"]] == ["tiny", "tiny_b"]
    assert record["blends_per_class"] == 3
    assert set(record["scores"]) == {"tiny", "tiny_b", "ensemble"}
    assert record["presence"] == {"tiny": "classifier"}
    assert (
        record["at_least_one"]["choice"] == "search" and "fold_decisions" in record["at_least_one"]
    )
    for name in ("tiny", "tiny_b"):
        assert (tmp_path / "runs" / name / TEST_PROBS).is_dir()
    # The first member's predict ran its classifier for the gate (--with-classifier).
    assert (tmp_path / "runs" / "tiny" / TEST_CLS).is_file()
    assert not (tmp_path / "runs" / "tiny_b" / TEST_CLS).exists()
    submission = Path(json.loads((config.run_dir / PREDICT).read_text())["submission"])
    sample = tiny_data / "sample_submission.csv"
    check = run_cli("pipeline.submission", "check", str(submission), "--sample", str(sample),
                    "--shape", "40x60")  # fmt: skip
    assert check.returncode == 0, check.stderr
    assert len(read_submission(submission)) == len(read_submission(sample))
    # A second run reuses both members' stored test probs.
    again = run_cli("pipeline.ensemble", "--config", str(ensemble), "--submissions-dir", str(subs))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("reusing its test outputs") == 2
