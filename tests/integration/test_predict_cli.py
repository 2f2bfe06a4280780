"""The real prediction CLI on a tiny generated set: folds x TTA -> post-processing -> CSV."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import load_config
from pipeline.core.postprocess import PostprocessParams, save_postprocess
from pipeline.core.submission_check import read_submission
from tests.conftest import REPO, write_tiny_config

pytestmark = pytest.mark.slow

CLASSES = ["Fish", "Flower", "Gravel", "Sugar"]


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_data) -> Path:
    """A run directory with 2 segmentation folds trained for 1 epoch by the real CLI."""
    tmp = tmp_path_factory.mktemp("trained")
    config = write_tiny_config(tmp, tiny_data, train={"epochs": 1})
    out = run_cli("pipeline.train", "--config", str(config), "--all")
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp / "runs" / "tiny"


def copy_run(trained_run: Path, tmp_path: Path, tiny_data: Path, **sections: dict) -> Path:
    """A config of its own over a copy of the trained run, so tests do not share files."""
    config = write_tiny_config(tmp_path, tiny_data, train={"epochs": 1}, **sections)
    shutil.copytree(trained_run, tmp_path / "runs" / "tiny")
    return config


def test_predict_writes_a_valid_scored_recorded_submission(tmp_path, trained_run, tiny_data):
    config = copy_run(trained_run, tmp_path, tiny_data)
    subs = tmp_path / "subs"
    run_dir = tmp_path / "runs" / "tiny"

    # The error and the untuned path in-process: each CLI run pays for a TensorFlow start.
    from pipeline.predict import predict

    loaded = load_config(config)
    with pytest.raises(FileNotFoundError, match=r"postprocess.json not found.*foldseg tune"):
        predict(loaded, None, subs)
    # No sample (every file in the folder), masks at each image's own size, no truth.
    own_size = load_config(
        config,
        ["data.sample_submission=null", "data.submission_size=null", "data.test_truth=null"],
    )
    plain = tmp_path / "plain.csv"
    untuned = predict(own_size, plain, subs, use_postprocess=False)
    assert untuned["submission"] == str(plain) and untuned["postprocess"] == "threshold 0.5"
    assert untuned["test_score"] is None
    fold_metrics = [json.loads((run_dir / f"fold_{k}/metrics.json").read_text()) for k in (0, 1)]
    assert untuned["oof_score"] == pytest.approx(
        sum(m["oof_kaggle_dice_050"] * m["n_val"] for m in fold_metrics) / 18
    )
    sample = tiny_data / "sample_submission.csv"
    check = run_cli("pipeline.submission", "check", str(plain), "--sample", str(sample),
                    "--images", str(tiny_data / "test_images"))  # fmt: skip
    assert check.returncode == 0, check.stderr
    assert sorted(read_submission(plain)["Image_Label"]) == sorted(
        read_submission(sample)["Image_Label"]
    )

    tuned = run_cli("pipeline.tune", "--config", str(config))
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    out = run_cli("pipeline.predict", "--config", str(config), "--submissions-dir", str(subs))
    assert out.returncode == 0, out.stderr[-3000:]
    written = sorted(subs.glob("tiny_*.csv"))
    assert len(written) == 1 and f"submission: {written[0]}" in out.stdout

    truth = tiny_data / "test_truth.csv"
    check = run_cli("pipeline.submission", "check", str(written[0]), "--sample", str(sample),
                    "--shape", "40x60")  # fmt: skip
    assert check.returncode == 0, check.stderr
    score = run_cli("pipeline.submission", "score", str(written[0]), "--truth", str(truth),
                    "--shape", "40x60")  # fmt: skip
    assert score.returncode == 0, score.stderr
    # Every test image and class exactly once, in the sample's order.
    frame = read_submission(written[0])
    assert frame["Image_Label"].tolist() == read_submission(sample)["Image_Label"].tolist()

    summary = json.loads((run_dir / "predict.json").read_text())
    tuned = json.loads((run_dir / "postprocess.json").read_text())["extra"]["scores"]
    tuned_oof, nested = tuned["tuned"], tuned["tuned_nested"]
    assert summary["oof_score"] == pytest.approx(tuned_oof)
    assert summary["oof_score_nested"] == pytest.approx(nested)
    assert f"OOF Kaggle Dice: nested {nested:.4f} (honest" in out.stdout
    assert f"in-sample {tuned_oof:.4f}" in out.stdout
    assert f"test Kaggle Dice: {summary['test_score']:.4f}" in out.stdout
    assert score.stdout.strip().endswith(f"({summary['n_images']} images)")
    assert f"kaggle dice overall: {summary['test_score']:.6f}" in score.stdout
    assert summary["n_images"] == 6 and summary["folds"] == 2
    assert {"cache", "build_model", "load_weights", "network", "postprocess", "write"} <= set(
        summary["stage_seconds"]
    )
    assert not (run_dir / "predict_tmp").exists()  # the fold merge is cleaned up

    rows = (subs / "history.md").read_text().splitlines()
    assert rows[-2].startswith(f"| {plain} | tiny | ")  # outside the folder: full path
    assert rows[-2].endswith(" | - |")  # no truth, no test score
    assert rows[-1].startswith(f"| {written[0].name} | tiny | {nested:.4f} | {tuned_oof:.4f} | ")


def test_classifier_gate_blanks_the_gated_classes(tmp_path, trained_run, tiny_data):
    from pipeline.nn.classifier import build_classifier_from_config, classifier_fold_dir
    from pipeline.nn.weights import save_weights_atomic
    from pipeline.predict import predict

    config_path = copy_run(trained_run, tmp_path, tiny_data, classifier={"image_size": [32, 64]})
    config = load_config(config_path)
    classifier = build_classifier_from_config(config, len(CLASSES))
    # A zero head: presence exactly 0.5 whatever the (random) backbone says, where a
    # random ResNet can saturate the sigmoid to 1.0.
    head = classifier.get_layer("presence")
    head.set_weights([np.zeros_like(w) for w in head.get_weights()])
    for fold in range(2):
        fold_dir = classifier_fold_dir(config, fold)
        fold_dir.mkdir(parents=True)
        save_weights_atomic(classifier, fold_dir / "best_weights.h5")
        (fold_dir / "metrics.json").write_text("{}")
    # Every pixel on; presence 0.5: gate 0 keeps, gate 1 blanks.
    on = {"threshold": 0.0, "min_area": 0}
    params = {
        "Fish": PostprocessParams(**on, gate="classifier", gate_threshold=0.0),
        "Flower": PostprocessParams(**on, gate="classifier", gate_threshold=1.0),
        "Gravel": PostprocessParams(**on),
        "Sugar": PostprocessParams(**on, gate="classifier", gate_threshold=1.0),
    }
    save_postprocess(config.run_dir / "postprocess.json", params, {"scores": {"tuned": 0.5}})
    result = predict(config, tmp_path / "gated.csv", tmp_path / "subs")
    assert result["classifier_gate"] == ["Fish", "Flower", "Sugar"]
    assert "classifier" in result["stage_seconds"]
    frame = read_submission(tmp_path / "gated.csv")
    rle = frame.set_index("Image_Label")["EncodedPixels"]
    full = "1 2400"  # all 40 x 60 pixels
    for image_id in pd.unique(frame["Image_Label"].str.rsplit("_", n=1).str[0]):
        assert rle[f"{image_id}_Fish"] == full and rle[f"{image_id}_Gravel"] == full
        assert rle[f"{image_id}_Flower"] == "" and rle[f"{image_id}_Sugar"] == ""


def test_predict_applies_the_at_least_one_rule_tune_recorded(tmp_path, trained_run, tiny_data):
    from pipeline.predict import predict

    config = load_config(copy_run(trained_run, tmp_path, tiny_data))
    # Every pixel on, but areas no mask reaches: every image is left empty...
    params = {name: PostprocessParams(threshold=0.0, min_area=10**6) for name in CLASSES}
    extra = {"scores": {"tuned": 0.5}, "at_least_one": {"choice": "always", "applied": False}}
    save_postprocess(config.run_dir / "postprocess.json", params, extra)
    predict(config, tmp_path / "off.csv", tmp_path / "subs")
    off = read_submission(tmp_path / "off.csv")
    assert (off["EncodedPixels"] == "").all()
    # ... and with the rule on, each keeps exactly one class, whole (its area waived).
    extra["at_least_one"]["applied"] = True
    save_postprocess(config.run_dir / "postprocess.json", params, extra)
    result = predict(config, tmp_path / "on.csv", tmp_path / "subs")
    assert result["at_least_one"] is True
    on = read_submission(tmp_path / "on.csv")
    on["image"] = on["Image_Label"].str.rsplit("_", n=1).str[0]
    kept = on[on["EncodedPixels"] != ""]
    assert sorted(kept["image"]) == sorted(on["image"].unique())
    assert (kept["EncodedPixels"] == "1 2400").all()


def test_missing_fold_weights_name_the_fold_and_the_command(tmp_path, tiny_data):
    from pipeline.predict import predict

    config = load_config(write_tiny_config(tmp_path, tiny_data))
    with pytest.raises(
        FileNotFoundError, match=r"fold 0 has no weights .*fold_0.*best_weights\.h5"
    ):
        predict(config, tmp_path / "x.csv", tmp_path / "subs", use_postprocess=False)
    with pytest.raises(FileNotFoundError, match="foldseg train --config .* --fold 0"):
        predict(config, tmp_path / "x.csv", tmp_path / "subs", use_postprocess=False)


def test_pseudo_labels_round_trains_on_them_but_never_validates_on_them(
    tmp_path, trained_run, tiny_data
):
    """predict -> pseudo_label -> a next round whose folds train on the pseudo-labelled
    test images while validation and the OOF hold only training images."""
    from pipeline.core.layout import OOF, PSEUDO_LABELS, PSEUDO_LABELS_JSON
    from pipeline.core.probstore import ProbReader

    # Thresholds that accept nearly every class (no tiny 1-epoch model is confident).
    config = copy_run(
        trained_run, tmp_path, tiny_data, pseudo_label={"positive": 0.0, "negative": 1.0}
    )
    run_dir = tmp_path / "runs" / "tiny"
    missing = run_cli("pipeline.pseudo_label", "--config", str(config))
    assert missing.returncode == 2 and "foldseg predict" in missing.stderr
    for stage in ("pipeline.tune", "pipeline.predict"):
        out = run_cli(stage, "--config", str(config), *(
            ["--submissions-dir", str(tmp_path / "subs")] if stage == "pipeline.predict" else []
        ))  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
    none = run_cli("pipeline.pseudo_label", "--config", str(config), "--set",
                   "pseudo_label.positive=1.0", "--set", "pseudo_label.negative=0.0")  # fmt: skip
    assert none.returncode == 2 and "nothing was written" in none.stderr
    assert not (run_dir / PSEUDO_LABELS).exists()
    out = run_cli("pipeline.pseudo_label", "--config", str(config))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / PSEUDO_LABELS_JSON).read_text())
    kept = summary["kept_images"]
    assert summary["test_images"] == 6 and kept >= 1
    assert sum(summary["per_class"]["Fish"].values()) == kept
    table = pd.read_csv(run_dir / PSEUDO_LABELS, keep_default_na=False)
    assert len(table) == kept * len(CLASSES)
    assert "next round" in out.stdout
    round1 = run_cli(
        "pipeline.train", "--config", str(config), "--fold", "0",
        "--set", "experiment=tiny_pl1",
        "--set", f"data.pseudo_labels={run_dir / PSEUDO_LABELS}",
    )  # fmt: skip
    assert round1.returncode == 0, round1.stderr[-3000:]
    assert f"+ {kept} pseudo-labelled training images" in round1.stderr
    loaded = load_config(config, ["experiment=tiny_pl1"])
    train_ids = set(pd.read_csv(tiny_data / "train.csv")["Image_Label"].str.rsplit("_", n=1).str[0])
    test_ids = set(table["Image_Label"].str.rsplit("_", n=1).str[0])
    oof_ids = set(ProbReader(loaded.fold_dir(0) / OOF).image_ids)
    assert oof_ids and oof_ids <= train_ids and not oof_ids & test_ids
    # A pseudo-label table naming a training image is refused.
    bad = tmp_path / "bad.csv"
    renamed = table["Image_Label"].str.replace(next(iter(test_ids)), min(train_ids), regex=False)
    table.assign(Image_Label=renamed).to_csv(bad, index=False)
    refused = run_cli(
        "pipeline.train", "--config", str(config), "--fold", "1",
        "--set", "experiment=tiny_pl_bad", "--set", f"data.pseudo_labels={bad}",
    )  # fmt: skip
    assert refused.returncode == 2 and "labels training images" in refused.stderr
