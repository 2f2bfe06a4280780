"""model.activation softmax end to end through the real CLIs on a generated index-coded
set (5 mutually exclusive classes, void pixels): train, tune, predict, evaluate; the
submission validates and holds one class per pixel; void pixels never change a score;
and overlapping CSV masks are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.core import rle
from pipeline.core.config import CONFIG_DIR
from pipeline.core.probstore import ProbReader, ProbWriter
from pipeline.core.submission_check import read_submission
from pipeline.run.process import framework_of_process
from tests.conftest import REPO, write_tiny_config
from tests.exclusive_data import VOID, indexed_data_section, make_indexed_data

N_CLASSES = 5


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


def softmax_config(tmp_path: Path, data: Path) -> Path:
    config = {
        "base": str(CONFIG_DIR / "demo.yaml"),
        "experiment": "softmax",
        "runs_dir": str(tmp_path / "runs"),
        "framework": framework_of_process(),
        "data": {**indexed_data_section(data, N_CLASSES), "image_size": [32, 32]},
        "folds": {"n_splits": 2},
        "model": {"backbone": "resnet18", "encoder_weights": None, "activation": "softmax"},
        "train": {
            "crop_size": [32, 32],
            "batch_size": 4,
            "accumulation_steps": 1,
            "epochs": 1,
            "verbose": 0,
            "parallel_folds": 1,
        },
        "tta": {"views": ["identity", "hflip"], "batch_size": 8},
        "postprocess": {"min_areas": [0, 20], "min_components": [0, 8]},
    }
    config["data"]["submission_size"] = None
    path = tmp_path / "softmax.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def void_of(data: Path, image_id: str) -> np.ndarray:
    return np.asarray(Image.open(data / "masks" / image_id)) == VOID


def rewrite_oof(run_dir: Path, data: Path, at_void: bool) -> None:
    """Every OOF store's class maps rewritten at the void pixels (or, ``at_void`` False,
    at the first non-void row of pixels): all mass on the last class."""
    for store in sorted(run_dir.glob("fold_*/oof")):
        reader = ProbReader(store)
        items = [(image_id, np.array(q)) for image_id, q in reader.iter()]
        classes = [f"c{k}" for k in range(1, N_CLASSES + 1)]
        with ProbWriter(store, classes, overwrite=True) as writer:
            for image_id, q in items:
                where = void_of(data, image_id)
                if not at_void:
                    where = np.zeros_like(where)
                    where[: where.shape[0] // 2] = ~void_of(data, image_id)[: where.shape[0] // 2]
                q[:, where] = 0
                q[-1, where] = 255
                writer.add(image_id, q.transpose(1, 2, 0))


def tuned_scores(config: Path) -> dict[str, float]:
    done = run_cli("pipeline.tune", "--config", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((config.parent / "runs/softmax/postprocess.json").read_text())
    return {k: v for k, v in saved["extra"]["scores"].items() if isinstance(v, float)}


@pytest.mark.slow
def test_softmax_trains_predicts_and_ignores_void_pixels(tmp_path: Path) -> None:
    data = make_indexed_data(tmp_path / "data", n_train=12, n_test=3, height=32, width=32)
    assert any(void_of(data, p.name).any() for p in (data / "masks").iterdir())
    config = softmax_config(tmp_path, data)
    done = run_cli("pipeline.train", "--config", str(config), "--all")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OOF Kaggle Dice at 0.5" in done.stdout
    scores = tuned_scores(config)
    grid = json.loads((tmp_path / "runs/softmax/postprocess.json").read_text())
    # Thresholds do not apply to argmax masks: tune searched 0.5 only.
    assert {p["threshold"] for p in grid["classes"].values()} == {0.5}

    subs = tmp_path / "subs"
    done = run_cli("pipeline.predict", "--config", str(config), "--submissions-dir", str(subs))
    assert done.returncode == 0, done.stderr[-3000:]
    (written,) = subs.glob("softmax_*.csv")
    sample = data / "sample_submission.csv"
    check = run_cli("pipeline.submission", "check", str(written), "--sample", str(sample),
                    "--images", str(data / "test_images"))  # fmt: skip
    assert check.returncode == 0, check.stderr
    frame = read_submission(written)
    assert len(frame) == 3 * N_CLASSES  # one row per image and class
    for image in sorted((data / "test_images").iterdir()):
        rows = frame[frame["Image_Label"].str.startswith(image.name + "_")]
        masks = [rle.decode(text, (32, 32)) for text in rows["EncodedPixels"].fillna("")]
        assert np.stack(masks).sum(axis=0).max() <= 1  # one class per pixel

    done = run_cli("pipeline.evaluate", "--config", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs/softmax/report/metrics.json").read_text())
    confusion = np.array(metrics["pixel_confusion"]["counts"])
    assert confusion.shape == (N_CLASSES + 1, N_CLASSES + 1)
    n_valid = sum(int((~void_of(data, p.name)).sum()) for p in (data / "train_images").iterdir())
    assert confusion.sum() == n_valid  # every non-void OOF pixel once, void none
    assert "Pixel confusion matrix" in (tmp_path / "runs/softmax/report/report.md").read_text()

    # Void pixels never change a score: predictions rewritten there score the same ...
    rewrite_oof(tmp_path / "runs/softmax", data, at_void=True)
    assert tuned_scores(config) == scores
    # ... while the same rewrite of labelled pixels does change them.
    rewrite_oof(tmp_path / "runs/softmax", data, at_void=False)
    assert tuned_scores(config) != scores


def test_softmax_refuses_overlapping_masks_and_other_merges(
    tmp_path: Path, tiny_data: Path
) -> None:
    config = write_tiny_config(tmp_path, tiny_data, model={"activation": "softmax"})
    done = run_cli("pipeline.train", "--config", str(config), "--fold", "0")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "has pixels in both class" in done.stderr and "mutually exclusive" in done.stderr
    assert "image '" in done.stderr
    assert not (tmp_path / "runs/tiny/folds.csv").exists()
    # A merge other than the mean is refused too: the background is 1 - sum of the rest.
    done = run_cli("pipeline.train", "--config", str(config), "--fold", "0",
                   "--set", "tta.merge=gmean")  # fmt: skip
    assert done.returncode == 2 and "set tta.merge: mean" in done.stderr, done.stderr[-3000:]
