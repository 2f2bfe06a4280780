"""``foldseg plan`` on the tiny generated set: a config with a reason beside each chosen
key and its fingerprint beside it, which ``foldseg run`` then runs end to end; and its
bad input (exit 2, nothing written)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def foldseg(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "foldseg"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,
    )


def plan_args(data: Path, out: Path) -> list[str]:
    return [
        "plan",
        "--images", str(data / "train_images"),
        "--csv", str(data / "train.csv"),
        "--test-images", str(data / "test_images"),
        "--sample", str(data / "sample_submission.csv"),
        "--hours", "0.02",
        "--submission-size", "40x60",
        "--set", f"data.test_truth={data / 'test_truth.csv'}",
        "--out", str(out),
    ]  # fmt: skip


def test_plan_writes_a_config_that_runs(tmp_path: Path, tiny_data: Path) -> None:
    out = tmp_path / "planned.yaml"
    done = foldseg(*plan_args(tiny_data, out))
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    for key in ("image_size", "crop_size", "batch_size", "epochs", "method", "gates", "loss"):
        line = next(line for line in text.splitlines() if line.strip().startswith(f"{key}:"))
        assert "  # " in line, line  # its reason beside it
        assert f"{key} = " in done.stdout  # and printed
    record = json.loads((tmp_path / "planned.fingerprint.json").read_text())
    assert record["fingerprint"]["images"]["count"] == 18
    assert record["train_step"]["s_per_step"] > 0 and record["machine"]["cores"] >= 1
    planned = yaml.safe_load(text)
    assert planned["data"]["image_size"][0] % 32 == 0
    # Runs unattended (shortened: one epoch each, the planned everything else).
    done = foldseg(
        "run", "--config", str(out), "--set", f"runs_dir={tmp_path / 'runs'}",
        "--set", "train.epochs=1", "--set", "classifier.epochs=1",
        "--set", "tta.views=[identity]", "--submissions-dir", str(tmp_path / "subs"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "nested" in done.stdout
    assert list((tmp_path / "subs").glob("*.csv"))


def test_plan_bad_input_writes_nothing(tmp_path: Path, tiny_data: Path) -> None:
    out = tmp_path / "planned.yaml"
    args = plan_args(tiny_data, out)
    args[args.index("--csv") + 1] = str(tmp_path / "missing.csv")
    done = foldseg(*args)
    assert done.returncode == 2 and "missing.csv" in done.stderr
    assert "Traceback" not in done.stderr and not out.exists()
