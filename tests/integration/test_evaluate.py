"""The CV report on a tiny run whose training outputs are faked (OOF stores written by hand)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import tune
from pipeline.core.config import load_config
from pipeline.core.images import cache_path, read_image_size, resolve_image_path
from pipeline.core.masks import truth_masks
from pipeline.core.postprocess import PostprocessParams, save_postprocess
from pipeline.core.probstore import ProbWriter
from pipeline.evaluate import evaluate, main
from pipeline.run.experiment import open_experiment
from pipeline.run.json_files import write_json
from pipeline.run.report_data import load_oof_example, open_run
from tests.conftest import REPO, write_tiny_config

pytestmark = pytest.mark.slow

PNGS = [
    "scores.png",
    "confusion.png",
    "curves_segmentation.png",
    "curves_classifier.png",
    "roc.png",
    "worst.png",
]


def make_fake_run(tmp_path: Path, data: Path, classifier: bool = True) -> Path:
    """A finished 2-fold run of the tiny config, without training: returns the config path.

    Per fold: an OOF store (truth pixels 0.45..0.95, background 0..0.5, and on some
    images a false 12x16 blob at 0.8 in a class whose truth is empty), ``history.csv``
    and ``metrics.json``; the training image cache's ``index.csv``; with ``classifier``,
    each classifier fold's ``oof_cls.csv`` (presence separable at 0.5), history and
    metrics.
    """
    config_path = write_tiny_config(tmp_path, data)
    config = load_config(config_path, [])
    exp = open_experiment(config)
    rng = np.random.default_rng(11)
    rles = exp.rles()
    sizes = {
        i: read_image_size(resolve_image_path(config.data.train_images, i)) for i in exp.image_ids
    }
    index = cache_path(exp.cache_dir, "train", config.data.image_size)
    index.mkdir(parents=True)
    rows = [(i, *sizes[i]) for i in exp.image_ids]
    pd.DataFrame(rows, columns=["image_id", "height", "width"]).to_csv(
        index / "index.csv", index=False
    )
    history = {"epoch": [1, 2, 3], "loss": [0.9, 0.7, 0.6], "val_loss": [1.0, 0.8, 0.8]}
    history |= {"val_dice": [0.3, 0.4, 0.5], "dice": [0.3, 0.5, 0.6], "lr": [1e-3, 1e-3, 5e-4]}
    for k in range(exp.n_folds):
        fold_dir = config.fold_dir(k)
        _, val_ids = exp.members(k)
        with ProbWriter(fold_dir / "oof", exp.classes) as writer:
            for n, image_id in enumerate(val_ids):
                truth = truth_masks(rles[image_id], sizes[image_id], (40, 60)).astype(np.float32)
                prob = 0.45 * truth + rng.uniform(0, 0.5, truth.shape).astype(np.float32)
                empty = np.flatnonzero(truth.sum(axis=(0, 1)) == 0)
                if n % 2 == 0 and len(empty):
                    prob[10:22, 20:36, empty[0]] = 0.8
                writer.add(image_id, prob)
        pd.DataFrame(history).to_csv(fold_dir / "history.csv", index=False)
        write_json(
            fold_dir / "metrics.json",
            {"fold": k, "n_val": len(val_ids), "best_epoch": 3, "epochs_run": 3}
            | {"oof_kaggle_dice_050": 0.5, "train_seconds": 360.0, "oof_seconds": 3.6}
            | {"device": "CPU"},
        )
        if not classifier:
            continue
        clf_dir = config.fold_dir(k, "classifier")
        clf_dir.mkdir(parents=True)
        present = np.array([[r != "" for r in rles[i]] for i in val_ids], dtype=np.float64)
        probs = 0.6 * present + rng.uniform(0, 0.4, present.shape)
        frame = pd.DataFrame(probs, columns=exp.classes)
        frame.insert(0, "image_id", val_ids)
        frame.to_csv(clf_dir / "oof_cls.csv", index=False, float_format="%.6f")
        pd.DataFrame(history).to_csv(clf_dir / "history.csv", index=False)
        write_json(
            clf_dir / "metrics.json",
            {"fold": k, "train_seconds": 1800.0, "oof_seconds": 0.0, "device": "1 x NVIDIA T4"},
        )
    return config_path


def test_cli_writes_every_file_and_matches_tune(tmp_path, tiny_data):
    config_path = make_fake_run(tmp_path, tiny_data)
    tuned = tune.tune(load_config(config_path, []))
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.evaluate", "--config", str(config_path), "--worst", "3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report_dir = tmp_path / "runs" / "tiny" / "report"
    assert f"report: {report_dir / 'report.html'}" in out.stdout
    assert "plain" in out.stdout and "gated" in out.stdout and "Fish" in out.stdout
    for name in ["report.md", "report.html", "metrics.json", *PNGS]:
        assert (report_dir / name).is_file(), name
    for name in PNGS:
        assert (report_dir / name).read_bytes()[:4] == b"\x89PNG"
    page = (report_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(PNGS)
    assert '<img src="' not in page.replace('<img src="data:', "")  # nothing linked
    markdown = (report_dir / "report.md").read_text()
    assert all(f"]({name})" in markdown for name in PNGS)

    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert list(metrics["summary"]) == ["plain", "tuned", "gated"]
    assert metrics["fold_sizes"] == [9, 9]
    # The numbers are tune's exactly: the same rules on the same uint8 probs.
    for name, result in tuned.result.per_class.items():
        scores = metrics["summary"]
        assert scores["plain"][name]["kaggle_dice"]["pooled"] == pytest.approx(result.plain_score)
        assert scores["tuned"][name]["kaggle_dice"]["pooled"] == pytest.approx(result.no_gate_score)
        assert scores["gated"][name]["kaggle_dice"]["pooled"] == pytest.approx(result.score)
        assert scores["gated"][name]["kaggle_dice"]["mean"] == pytest.approx(
            np.mean(result.fold_scores)
        )
    assert all(abs(r["difference"]) < 1e-9 for r in metrics["tune_check"])
    assert len(metrics["worst_images"]) == 3
    energy = {r["run"]: r for r in metrics["energy"]["runs"]}
    # 363.6 s on CPU at 65 W, PUE 1.2; 1800 s on one GPU at 300 W.
    assert energy["segmentation fold 0"]["kwh"] == pytest.approx(363.6 / 3600 * 0.065 * 1.2)
    assert energy["classifier fold 1"]["kwh"] == pytest.approx(0.5 * 0.3 * 1.2)
    assert energy["total"]["g_co2e"] == pytest.approx(
        400 * 1.2 * (2 * 363.6 / 3600 * 0.065 + 2 * 0.5 * 0.3)
    )
    aucs = {r["fold"]: r for r in metrics["classifier_auc"]}
    assert set(aucs) == {"0", "1", "pooled"} and aucs["pooled"]["Fish"] == 1.0


def test_the_report_scores_the_at_least_one_rule_as_tune_did(tmp_path, tiny_data):
    config_path = make_fake_run(tmp_path, tiny_data)
    # Areas no mask reaches: every image is emptied, so the rule keeps a class in each.
    overrides = [
        "postprocess.at_least_one=always",
        "postprocess.min_areas=[100000]",
        "postprocess.gates=[none]",
    ]
    tuned = tune.tune(load_config(config_path, overrides))
    rule = tuned.at_least_one
    assert rule["applied"] and rule["images_changed"]["in_sample"] == 18
    metrics = evaluate(load_config(config_path, overrides))
    gated = metrics["summary"]["gated"]
    for name, figures in rule["per_class"].items():
        assert gated[name]["kaggle_dice"]["pooled"] == pytest.approx(figures["tuned"])
    assert all(abs(r["difference"]) < 1e-9 for r in metrics["tune_check"])
    assert tuned.oof_scores()[0] == pytest.approx(rule["in_sample"]["with"])
    assert rule["in_sample"]["with"] > rule["in_sample"]["without"]


def test_report_degrades_without_classifier_and_tuning(tmp_path, tiny_data):
    config = load_config(make_fake_run(tmp_path, tiny_data, classifier=False), [])
    metrics = evaluate(config, n_worst=2)
    assert list(metrics["summary"]) == ["plain"]
    assert metrics["classifier_auc"] is None and metrics["tune_check"] is None
    assert any("foldseg tune" in note for note in metrics["notes"])
    assert any("foldseg train-classifier" in note for note in metrics["notes"])
    markdown = (config.run_dir / "report" / "report.md").read_text()
    assert "not available: run `foldseg train-classifier" in markdown
    assert "not available: run `foldseg tune" in markdown
    assert "prediction: not run" in markdown
    assert not (config.run_dir / "report" / "roc.png").exists()
    by_fold = pd.read_csv(config.run_dir / "report" / "scores_by_fold.csv")
    assert set(by_fold["stage"]) == {"plain"} and set(by_fold["fold"]) == {0, 1}


def test_missing_fold_names_the_fold_and_the_command(tmp_path, tiny_data, capsys):
    config_path = make_fake_run(tmp_path, tiny_data, classifier=False)
    (tmp_path / "runs/tiny/fold_1/metrics.json").unlink()
    assert main(["--config", str(config_path)]) == 2
    err = capsys.readouterr().err
    assert "segmentation fold 1 is not finished" in err
    assert f"foldseg train --config {config_path} --fold 1" in err


def test_classifier_gate_without_classifier_oof_is_an_error(tmp_path, tiny_data):
    config = load_config(make_fake_run(tmp_path, tiny_data, classifier=False), [])
    gate = PostprocessParams(0.5, 0, gate="classifier", gate_threshold=0.5)
    params = {name: gate for name in open_experiment(config).classes}
    save_postprocess(config.run_dir / "postprocess.json", params)
    with pytest.raises(FileNotFoundError, match="foldseg train-classifier"):
        open_run(config)


def test_oof_example_matches_the_scores(tmp_path, tiny_data):
    config = load_config(make_fake_run(tmp_path, tiny_data), [])
    tune.tune(config)
    run = open_run(config)
    image_id = run.readers[1].image_ids[0]
    example = load_oof_example(run, image_id)
    assert example.fold == 1
    assert example.image.shape == (40, 60, 3) and example.image.dtype == np.uint8
    assert example.truth.shape == example.prob.shape == (40, 60, 4)
    assert list(example.masks) == ["plain", "tuned", "gated"]
    plain = (example.prob >= 128 / 255 - 1e-6).astype(np.uint8)
    np.testing.assert_array_equal(example.masks["plain"], plain)
    assert len(example.panels()) == 5
    with pytest.raises(KeyError, match="no fold's OOF store"):
        load_oof_example(run, "nope.jpg")


def test_evaluate_does_not_import_tensorflow():
    code = (
        "import sys, pipeline.evaluate\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'tf_keras', 'keras', 'segmentation_models'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
