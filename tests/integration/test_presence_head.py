"""model.classification_head through the real CLIs: train, tune, predict, evaluate,
pseudo_label and lr_find on a tiny generated set."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import load_config
from pipeline.core.postprocess import PostprocessParams, load_postprocess, save_postprocess
from pipeline.nn.classifier import presence_labels
from pipeline.run.experiment import open_experiment
from tests.conftest import REPO, write_tiny_config

pytestmark = pytest.mark.slow


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=900
    )


def test_the_head_trains_gates_the_tuning_and_the_prediction(tmp_path, tiny_data):
    config = write_tiny_config(
        tmp_path,
        tiny_data,
        model={"classification_head": True, "classification_head_weight": 0.5},
        postprocess={"gates": ["classifier"]},  # every class gated by the head
    )
    run = tmp_path / "runs" / "tiny"
    done = run_cli("pipeline.train", "--config", str(config), "--all")
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = load_config(config)
    exp = open_experiment(loaded)
    for k in (0, 1):
        history = pd.read_csv(run / f"fold_{k}" / "history.csv")
        # The masks' metrics under their single-output names, the head's loss beside them.
        assert {"val_dice", "val_kaggle_dice", "presence_loss", "val_presence_loss"} <= set(
            history.columns
        )
        assert not any(c.startswith(("prob_", "val_prob_")) and "loss" not in c for c in history)
        oof = pd.read_csv(run / f"fold_{k}" / "oof_presence.csv", dtype={"image_id": str})
        assert oof["image_id"].tolist() == exp.members(k)[1]
        assert list(oof.columns) == ["image_id", *exp.classes]
        values = oof[exp.classes].to_numpy()
        assert ((values >= 0) & (values <= 1)).all()
        metrics = json.loads((run / f"fold_{k}" / "metrics.json").read_text())
        truth = presence_labels(exp.table, exp.classes, oof["image_id"].tolist())
        head = metrics["presence_head"]
        assert set(head["oof_auc_per_class"]) == set(exp.classes)
        assert head["oof_accuracy_050"] == pytest.approx(
            float(((values >= 0.5) == truth.astype(bool)).mean())
        )

    done = run_cli("pipeline.tune", "--config", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    params, extra = load_postprocess(run / "postprocess.json", exp.classes)
    assert extra["classifier_used"] is True and extra["gate_source"] == "head"
    assert "the presence head" in done.stderr

    done = run_cli("pipeline.predict", "--config", str(config), "--out", str(tmp_path / "s.csv"))
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((run / "predict.json").read_text())
    gated = [name for name, p in params.items() if p.uses_classifier]
    assert record["classifier_gate"] == gated == exp.classes
    assert record["gate_source"] == "head"
    presence = pd.read_csv(run / "test_presence.csv", dtype={"image_id": str})
    assert len(presence) == 6 and list(presence.columns) == ["image_id", *exp.classes]
    assert np.isfinite(presence[exp.classes].to_numpy()).all()
    assert not (run / "classifier").exists()  # no separate classifier was needed

    done = run_cli("pipeline.evaluate", "--config", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((run / "report" / "metrics.json").read_text())
    assert report["classifier_auc"] is not None  # the head's OOF presence
    assert "presence head" in (run / "report" / "report.md").read_text()

    # The head's test presence is what pseudo_label reads (a tiny model may keep no
    # image: exit 2 with its message, nothing written).
    done = run_cli("pipeline.pseudo_label", "--config", str(config))
    assert "presence probabilities from the presence head" in done.stderr
    assert done.returncode == 0 or (
        done.returncode == 2 and "no test image has every class" in done.stderr
    ), done.stderr[-3000:]

    # The LR finder trains the same two-output model.
    done = run_cli("pipeline.lr_find", "--config", str(config), "--set", "lr_find.steps=6")
    assert done.returncode == 0, done.stderr[-3000:]

    # Fold 0 retrained without the head: its head table goes (it would be stale), and the
    # head-gated tuning can no longer be evaluated with that config, even forced.
    no_head = ("--set", "model.classification_head=false")
    done = run_cli("pipeline.train", "--config", str(config), "--fold", "0", "--force", *no_head)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (run / "fold_0" / "oof_presence.csv").exists()
    assert (run / "fold_1" / "oof_presence.csv").exists()
    done = run_cli("pipeline.evaluate", "--config", str(config), "--force", *no_head)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "gates" in done.stderr and "model.classification_head is false" in done.stderr


def test_a_config_without_the_head_cannot_predict_a_head_gated_run(tmp_path, tiny_data):
    """A hand-written postprocess.json gated by the head, predicted by a config
    without one: exit 2 and a message, nothing written."""
    config = write_tiny_config(tmp_path, tiny_data)
    run = tmp_path / "runs" / "tiny"
    (run / "fold_0").mkdir(parents=True)
    (run / "fold_1").mkdir()
    for k in (0, 1):
        h5py.File(run / f"fold_{k}" / "best_weights.h5", "w").close()
        (run / f"fold_{k}" / "metrics.json").write_text("{}")
    gated = PostprocessParams(0.5, 0, gate="classifier", gate_threshold=0.5)
    extra = {
        "scores": {"tuned": 0.5, "tuned_nested": 0.5},
        "size": [40, 60],
        "classifier_used": True,
        "gate_source": "head",
    }
    classes = ["Fish", "Flower", "Gravel", "Sugar"]
    save_postprocess(run / "postprocess.json", dict.fromkeys(classes, gated), extra)
    before = sorted(p.name for p in run.rglob("*"))
    done = run_cli("pipeline.predict", "--config", str(config))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "model.classification_head is false" in done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in run.rglob("*")) == before
